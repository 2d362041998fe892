//! Side-by-side benchmark (`scripts/bench.sh`): every workload shape users have, run through
//! ordo and through the seed design it replaces (`bench/seed-baseline`, Node with Microsoft's
//! SDK), on the same stand-ins and the same events, next to the stand-ins' raw ceilings
//! measured in the same run.
//!
//! Shapes: hot aggregates (500 × 40), churn (10,000 × 2), steady load at a fraction of the
//! capacity the hot run measured; each with every requested broker round trip (the emulator's
//! `[namespace] round_trip`). Every row gets a fresh MongoDB stand-in, a fresh emulator and
//! fresh daemons, so CPU, peak RSS and connection counts belong to that row alone.
//!
//! Writes `--out`/summary.json (one object per row plus the run's environment and the issue's
//! goals checked against the numbers) and `--out`/chart.svg, and prints a table.
//!
//! Layout (`ordo-bench/`): `args` the arguments and shapes; `ceilings` the stand-ins' raw rates; `load` what a row writes;
//! `latency` insert → read model of every event; `processes` CPU, RSS and connections per
//! process; `ordo` and `seed` one row through each design (`node` the seed's processes);
//! `report` the table, the goals, `summary.json` and `chart.svg`; this file the run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use ordo_e2e::sample::Workload;
use ordo_e2e::stack::{emulator_config, Stack};
use ordo_servicebus_emulator::{EmulatorConfig, TopicConfig};
use serde_json::{json, Value};

mod args;
mod ceilings;
mod latency;
mod load;
mod node;
mod ordo;
mod processes;
mod report;
mod seed;

pub(crate) use args::{Args, Shape};
use ceilings::{change_stream_ceiling, guarded_update_ceiling, send_ceiling, MongoCeilings};
use load::{load_for, Load};
use report::{print_goals, print_row, print_table, write_outputs, Bar};

/// The embedded emulator and the load writer encode and decode AMQP frames and BSON documents,
/// allocating many small buffers each: with glibc malloc they took a larger share of the
/// benchmark machine's two cores from the daemons under test than a broker elsewhere would.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub(crate) const CEILING_TOPIC: &str = "ordo-bench-ceiling";
/// A subscription of the seed design's topic nobody receives from: its per-session message
/// counts say how many messages were published, so published minus still active is how many
/// the seed's consumers completed.
pub(crate) const TAP_SUBSCRIPTION: &str = "bench-tap";

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    // The test kit's watchdog reports a test process still running after 240 s as hung; a
    // benchmark runs longer by design, so it only reports after a day unless told otherwise.
    if std::env::var_os("ORDO_TEST_WATCHDOG_SECS").is_none() {
        std::env::set_var("ORDO_TEST_WATCHDOG_SECS", "86400");
    }
    // Before the runtime starts: this sets the variable the test kit reads.
    let server = ordo_testkit::bench::RustSecantus::start_if_available(args.secantus_bin.clone());
    args.secantus_pid = server.as_ref().map(ordo_testkit::bench::RustSecantus::pid);
    let mongo_kind = if server.is_some() {
        "secantusd-rs"
    } else if std::env::var_os("ORDO_TEST_MONGODB_URI").is_some() {
        "external"
    } else {
        "secantusd-py"
    };
    if mongo_kind == "secantusd-py" {
        eprintln!("bench: MongoDB stand-in is the Python SecantusDB (one core; every row measures it more than ordo: scripts/bench.sh without --python-secantus uses secantusd-rs)");
    }
    let rt = ordo_core::cli::runtime()?;
    let result = rt.block_on(run(args, mongo_kind));
    drop(server);
    result
}

pub(crate) fn split(aggregates: usize, events_per_aggregate: usize, seed: u64) -> Workload {
    Workload {
        users: aggregates / 2,
        orders: aggregates - aggregates / 2,
        events_per_aggregate,
        seed,
    }
}

/// One row's result on one side.
pub(crate) struct RowResult {
    pub(crate) json: Value,
    pub(crate) events_per_s: f64,
    pub(crate) p99: Option<f64>,
}

fn ordo_emulator(round_trip: Duration) -> EmulatorConfig {
    let mut cfg = emulator_config(Duration::from_secs(30));
    cfg.namespace.round_trip = round_trip;
    // Without duplicate detection: a partitioned topic with it refuses batches of distinct
    // message ids, and the ceiling is the broker's batched-send rate.
    cfg.topics.push(TopicConfig {
        name: CEILING_TOPIC.into(),
        subscriptions: Vec::new(),
        duplicate_detection_window: None,
        ..cfg.topics[0].clone()
    });
    cfg
}

/// What one run has measured so far.
#[derive(Default)]
struct Measured {
    mongo_ceilings: Option<MongoCeilings>,
    send_ceilings: BTreeMap<u64, f64>,
    rows: Vec<Value>,
    hot_rate: BTreeMap<u64, f64>,
    bars: Vec<Bar>,
}

async fn run(args: Args, mongo_kind: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let run_started = Instant::now();
    let mut m = Measured::default();
    for &rt_ms in &args.round_trip_ms {
        let round_trip = Duration::from_millis(rt_ms);
        for &shape in &args.shapes {
            let rate = offered_rate(&args, shape, m.hot_rate.get(&rt_ms).copied())?;
            let load = load_for(&args, shape, rate);
            let label = row_label(shape, rt_ms);
            eprintln!(
                "bench: [{:.0}s] {label}: {} aggregates × {} events{}",
                run_started.elapsed().as_secs_f64(),
                load.workload.users + load.workload.orders,
                load.workload.events_per_aggregate,
                rate.map_or(String::new(), |r| format!(
                    ", {r:.0} events/s for {}s",
                    load.secs
                )),
            );
            let mut stack = Stack::start_with(ordo_emulator(round_trip)).await?;
            measure_ceilings(&stack, &args, rt_ms, &mut m).await?;
            let ceilings = m.mongo_ceilings.unwrap_or_default();
            let send = m.send_ceilings.get(&rt_ms).copied().unwrap_or(f64::NAN);
            let ordo = ordo::run_ordo(&mut stack, &args, &load, &ceilings).await?;
            if shape == Shape::Hot {
                m.hot_rate.insert(rt_ms, ordo.events_per_s);
            }
            let seed = if args.no_seed {
                None
            } else {
                Some(seed::run_seed(&stack, &args, &load, round_trip).await?)
            };
            drop(stack);
            let seed_rate = seed.as_ref().map(|s| s.events_per_s);
            let row = Row {
                label: &label,
                shape,
                rt_ms,
                load: &load,
                rate,
                ordo: &ordo,
                seed: seed.as_ref(),
                ceilings,
                send,
            }
            .json();
            print_row(&row);
            m.bars.push((
                label,
                Some(ordo.events_per_s),
                seed_rate,
                ordo.p99,
                seed.as_ref().and_then(|s| s.p99),
            ));
            m.rows.push(row);
            // Written after every row, so a run cut short still leaves what it measured.
            write_outputs(
                &args,
                mongo_kind,
                &m.mongo_ceilings,
                &m.send_ceilings,
                &m.rows,
                &m.bars,
            )?;
        }
    }
    eprintln!(
        "bench: done in {:.0}s; wrote {}/summary.json and chart.svg",
        run_started.elapsed().as_secs_f64(),
        args.out.display()
    );
    println!();
    print_table(&m.rows);
    print_goals(&m.rows);
    Ok(())
}

/// The MongoDB ceilings once per run, the send ceiling once per round trip.
async fn measure_ceilings(
    stack: &Stack,
    args: &Args,
    rt_ms: u64,
    m: &mut Measured,
) -> anyhow::Result<()> {
    if m.mongo_ceilings.is_none() {
        let (insert, change_stream, reader) =
            change_stream_ceiling(stack, args.ceiling_events).await?;
        let guarded_updates = guarded_update_ceiling(stack).await?;
        let c = MongoCeilings {
            insert,
            change_stream,
            guarded_updates,
            reader_cpu_per_event: reader,
        };
        eprintln!("bench: ceilings: insert {insert:.0}/s, change stream {change_stream:.0}/s, guarded updates {guarded_updates:.0}/s, bare reader {:.3} CPU ms/event", reader * 1000.0);
        m.mongo_ceilings = Some(c);
    }
    if let std::collections::btree_map::Entry::Vacant(e) = m.send_ceilings.entry(rt_ms) {
        let s = send_ceiling(&stack.bus, args.ceiling_events, args.senders).await?;
        eprintln!("bench: batched send ceiling at {rt_ms} ms round trip: {s:.0}/s");
        e.insert(s);
    }
    Ok(())
}

/// The row's name: the shape, and the round trip when there is one.
fn row_label(shape: Shape, rt_ms: u64) -> String {
    if rt_ms == 0 {
        shape.name().to_string()
    } else {
        format!("{} +{rt_ms}ms", shape.name())
    }
}

/// The offered load of `shape` in events/s: for the steady shape, a fraction of the hot shape's
/// measured rate (`hot`) or `--steady-rate`; `None` for a burst.
fn offered_rate(args: &Args, shape: Shape, hot: Option<f64>) -> anyhow::Result<Option<f64>> {
    Ok(match shape {
        Shape::Steady => Some(
            hot.map(|r| r * args.steady_fraction)
                .or(args.steady_rate)
                .context("the steady shape needs the hot shape in the same run or --steady-rate")?,
        ),
        _ => None,
    })
}

/// One row of the summary: the workload, both designs' results, and the ceilings they ran
/// against.
struct Row<'a> {
    label: &'a str,
    shape: Shape,
    rt_ms: u64,
    load: &'a Load,
    /// The offered events/s of the steady shape.
    rate: Option<f64>,
    ordo: &'a RowResult,
    seed: Option<&'a RowResult>,
    ceilings: MongoCeilings,
    /// The batched send ceiling at this round trip.
    send: f64,
}

impl Row<'_> {
    fn json(&self) -> Value {
        let Row {
            label,
            shape,
            rt_ms,
            load,
            rate,
            ordo,
            seed,
            ceilings,
            send,
        } = *self;
        let seed_rate = seed.map(|s| s.events_per_s);
        json!({
            "row": label,
            "shape": shape.name(),
            "round_trip_ms": rt_ms,
            "workload": {
                "aggregates": load.workload.users + load.workload.orders,
                "events_per_aggregate": load.workload.events_per_aggregate,
                "offered_events_per_s": rate,
                "steady_secs": rate.map(|_| load.secs),
            },
            "ordo": ordo.json,
            "seed": seed.map(|s| s.json.clone()),
            "ceilings": {
                "insert_events_per_s": ceilings.insert,
                "change_stream_events_per_s": ceilings.change_stream,
                "guarded_updates_per_s": ceilings.guarded_updates,
                "batched_sends_messages_per_s": send,
            },
            "ratios": {
                "events_per_s_vs_seed": seed_rate.map(|s| ordo.events_per_s / s),
                "p99_seed_over_ordo": seed.and_then(|s| Some(s.p99? / ordo.p99?)),
                "vs_guarded_update_ceiling": ordo.events_per_s / ceilings.guarded_updates,
                "vs_insert_ceiling": ordo.events_per_s / ceilings.insert,
                "vs_change_stream_ceiling": ordo.events_per_s / ceilings.change_stream,
                "vs_batched_send_ceiling": ordo.events_per_s / send,
            },
        })
    }
}
