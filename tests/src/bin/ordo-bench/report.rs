//! The run's outputs: a line per row, the table, the goals checked against the rows,
//! `summary.json` and `chart.svg`.

use std::collections::BTreeMap;

use ordo_e2e::chart::{render_bars, BarPanel};
use serde_json::{json, Value};

use crate::ceilings::MongoCeilings;
use crate::Args;

fn fmt_opt(v: Option<f64>, scale: f64, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{:.*}", digits, v * scale))
}

fn get_f(v: &Value, path: &[&str]) -> Option<f64> {
    let mut v = v;
    for p in path {
        v = v.get(p)?;
    }
    v.as_f64()
}

fn max_over_processes(row: &Value, side: &str, field: &str, prefix: &str) -> Option<f64> {
    row.get(side)?
        .get("processes")?
        .as_object()?
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .filter_map(|(_, p)| p.get(field)?.as_f64())
        .reduce(f64::max)
}

/// The seed design's p99, marked `≥` when some of its events were never applied (censored:
/// counted with the time they had waited, so the percentile is a lower bound).
fn seed_p99(row: &Value) -> String {
    let p99 = fmt_opt(get_f(row, &["seed", "latency_seconds", "p99"]), 1000.0, 0);
    match get_f(row, &["seed", "latency_seconds", "censored"]) {
        Some(c) if c > 0.0 => format!("≥{p99}"),
        _ => p99,
    }
}

pub(crate) fn print_row(row: &Value) {
    eprintln!("bench: {}", serde_json::to_string(row).unwrap_or_default());
}

pub(crate) fn print_table(rows: &[Value]) {
    println!(
        "{:<14} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6} {:>5}",
        "row", "ordo/s", "seed/s", "×seed", "sess/s", "p50 ms", "p95 ms", "p99 ms", "seed p99", "prodCPU", "projCPU", "RSS", "conns", "×guard", "prod×rd", "busy"
    );
    for r in rows {
        println!(
            "{:<14} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6} {:>5}",
            r["row"].as_str().unwrap_or(""),
            fmt_opt(get_f(r, &["ordo", "events_per_s"]), 1.0, 0),
            fmt_opt(get_f(r, &["seed", "events_per_s"]), 1.0, 1),
            fmt_opt(get_f(r, &["ratios", "events_per_s_vs_seed"]), 1.0, 0),
            fmt_opt(get_f(r, &["ordo", "sessions_per_s"]), 1.0, 0),
            fmt_opt(get_f(r, &["ordo", "latency_seconds", "p50"]), 1000.0, 0),
            fmt_opt(get_f(r, &["ordo", "latency_seconds", "p95"]), 1000.0, 0),
            fmt_opt(get_f(r, &["ordo", "latency_seconds", "p99"]), 1000.0, 0),
            seed_p99(r),
            fmt_opt(max_over_processes(r, "ordo", "cpu_ms_per_1000_events", "ordo-producer"), 1.0, 0),
            fmt_opt(max_over_processes(r, "ordo", "cpu_ms_per_1000_events", "ordo-projector"), 1.0, 0),
            fmt_opt(max_over_processes(r, "ordo", "peak_rss_mib", "ordo"), 1.0, 0),
            fmt_opt(max_over_processes(r, "ordo", "amqp_connections", "ordo"), 1.0, 0),
            fmt_opt(get_f(r, &["ratios", "vs_guarded_update_ceiling"]), 1.0, 2),
            fmt_opt(get_f(r, &["ordo", "producer_cpu_vs_bare_reader"]), 1.0, 1),
            fmt_opt(get_f(r, &["ordo", "machine", "busy_fraction"]), 100.0, 0),
        );
    }
    println!("(ordo/s, seed/s: events applied per second; ×seed: ordo/seed; p50-p99: insert → read model, ordo; seed p99: ≥ when some of its events were never applied; prodCPU/projCPU: CPU ms per 1,000 events, producer / busiest projector; RSS: largest peak MiB of an ordo process; conns: most AMQP connections of an ordo process; ×guard: ordo/guarded-update ceiling; prod×rd: producer CPU per event / bare change-stream reader's; busy: % of all cores busy during the ordo row, stand-ins included)");
}

/// The goals, checked against the rows of this run.
fn goals(rows: &[Value]) -> Vec<Value> {
    let find = |shape: &str, rt: u64| {
        rows.iter()
            .find(|r| r["shape"] == shape && r["round_trip_ms"].as_u64() == Some(rt))
    };
    let mut out = Vec::new();
    let rts: Vec<u64> = {
        let mut v: Vec<u64> = rows
            .iter()
            .filter_map(|r| r["round_trip_ms"].as_u64())
            .collect();
        v.dedup();
        v
    };
    for rt in rts {
        if let (Some(h), Some(c)) = (find("hot", rt), find("churn", rt)) {
            let ratio = get_f(c, &["ordo", "events_per_s"])
                .zip(get_f(h, &["ordo", "events_per_s"]))
                .map(|(c, h)| c / h);
            out.push(json!({"goal": format!("churn ≥ 50 % of hot ({rt} ms round trip)"), "value": ratio, "met": ratio.map(|r| r >= 0.5)}));
        }
        if let Some(s) = find("steady", rt) {
            let p99 = get_f(s, &["ordo", "latency_seconds", "p99"]);
            let limit = 0.25 + 10.0 * rt as f64 / 1000.0;
            out.push(json!({
                "goal": format!("steady p99 < {:.0} ms ({rt} ms round trip)", limit * 1000.0),
                "value": p99,
                "met": p99.map(|p| p < limit),
                "cores": cores_used(s),
            }));
        }
        if let Some(h) = find("hot", rt) {
            let r = get_f(h, &["ratios", "vs_guarded_update_ceiling"]);
            out.push(json!({
                "goal": format!("hot ≥ 70 % of the guarded-write ceiling ({rt} ms round trip)"),
                "value": r,
                "met": r.map(|r| r >= 0.7),
                "cores": cores_used(h),
            }));
        }
    }
    let conns = rows
        .iter()
        .filter_map(|r| max_over_processes(r, "ordo", "amqp_connections", "ordo"))
        .reduce(f64::max);
    out.push(json!({"goal": "≤ 4 AMQP connections per process", "value": conns, "met": conns.map(|c| c <= 4.0)}));
    let rss = rows
        .iter()
        .filter_map(|r| max_over_processes(r, "ordo", "peak_rss_mib", "ordo"))
        .reduce(f64::max);
    out.push(json!({"goal": "producer and projector < 50 MB peak RSS", "value_mib": rss, "met": rss.map(|r| r * 1048576.0 < 50e6)}));
    let worst = rows
        .iter()
        .filter_map(|r| get_f(r, &["ratios", "events_per_s_vs_seed"]))
        .reduce(f64::min);
    out.push(json!({"goal": "≥ 20× the seed design on every shape (events/s)", "value": worst, "met": worst.map(|w| w >= 20.0)}));
    out
}

/// Where a row's cores went: the machine's busy fraction, and the cores the stand-ins and
/// ordo's processes used on average. On a machine near fully busy a latency is queueing for
/// cores and a rate is the machine's, and on a small machine the stand-ins are most of that
/// (the guarded-write ceiling is measured with the database alone on every core).
fn cores_used(row: &Value) -> Value {
    let secs = get_f(row, &["ordo", "seconds"]);
    let ordo_cpu: Option<f64> = row["ordo"]["processes"]
        .as_object()
        .map(|ps| ps.values().filter_map(|p| p["cpu_seconds"].as_f64()).sum());
    let stand_ins = get_f(row, &["ordo", "machine", "secantusdb_cores"])
        .zip(get_f(row, &["ordo", "machine", "emulator_and_load_cores"]))
        .map(|(a, b)| a + b);
    json!({
        "machine_busy_fraction": get_f(row, &["ordo", "machine", "busy_fraction"]),
        "stand_ins": stand_ins,
        "ordo": ordo_cpu.zip(secs).map(|(c, s)| c / s),
    })
}

/// The goals, one line each: met or not, and for a row's goal where the cores went.
pub(crate) fn print_goals(rows: &[Value]) {
    for g in goals(rows) {
        let value = g
            .get("value")
            .or_else(|| g.get("value_mib"))
            .and_then(Value::as_f64)
            .map_or("-".into(), |v| format!("{v:.3}"));
        let verdict = match g["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "not measured",
        };
        let cores = match (
            get_f(&g, &["cores", "machine_busy_fraction"]),
            get_f(&g, &["cores", "stand_ins"]),
            get_f(&g, &["cores", "ordo"]),
        ) {
            (Some(b), Some(s), Some(o)) => format!(
                " (machine {:.0} % busy; cores used: stand-ins {s:.2}, ordo's processes {o:.2})",
                b * 100.0
            ),
            _ => String::new(),
        };
        println!(
            "goal: {}: {value}, {verdict}{cores}",
            g["goal"].as_str().unwrap_or("")
        );
    }
}

pub(crate) type Bar = (String, Option<f64>, Option<f64>, Option<f64>, Option<f64>);

pub(crate) fn write_outputs(
    args: &Args,
    mongo_kind: &str,
    mongo_ceilings: &Option<MongoCeilings>,
    send_ceilings: &BTreeMap<u64, f64>,
    rows: &[Value],
    bars: &[Bar],
) -> anyhow::Result<()> {
    let c = mongo_ceilings.unwrap_or_default();
    let summary = json!({
        "environment": {
            "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
            "mongodb": mongo_kind,
            "servicebus": "ordo-servicebus-emulator",
            "round_trips_ms": args.round_trip_ms,
            "projectors": args.projectors,
            "seed_consumers": args.projectors.max(1),
        },
        "ceilings": {
            "insert_events_per_s": c.insert,
            "change_stream_events_per_s": c.change_stream,
            "guarded_updates_per_s": c.guarded_updates,
            "batched_sends_messages_per_s_by_round_trip_ms": send_ceilings,
            "bare_reader_cpu_ms_per_1000_events": c.reader_cpu_per_event * 1e6,
        },
        "rows": rows,
        "goals": goals(rows),
    });
    std::fs::write(
        args.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    let groups: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let svg = render_bars(
        &format!(
            "ordo vs the seed design, {} projector process(es), MongoDB {mongo_kind}, {} cores",
            args.projectors,
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        ),
        &["ordo", "seed design"],
        &groups,
        &[
            BarPanel {
                title: "events/s applied (higher is better, log scale)".into(),
                values: bars.iter().map(|b| vec![b.1, b.2]).collect(),
                unit: "/s".into(),
            },
            BarPanel {
                title: "p99 insert → read model, seconds (lower is better, log scale)".into(),
                values: bars.iter().map(|b| vec![b.3, b.4]).collect(),
                unit: "s".into(),
            },
        ],
    );
    std::fs::write(args.out.join("chart.svg"), svg)?;
    Ok(())
}
