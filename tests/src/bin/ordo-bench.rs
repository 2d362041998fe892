//! End-to-end benchmark (`scripts/bench.sh`): the stand-ins' raw ceiling and the whole
//! pipeline, measured in the same run on the same machine.
//!
//! Prints a JSON summary (events/s per stage, end-to-end latency percentiles, CPU seconds and
//! peak RSS per daemon per 1,000 events, the ceilings) and writes it with an SVG chart of
//! throughput and lag over time to `--out` (default `target/ordo-bench/`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{doc, Document};
use ordo_core::envelope::{Envelope, EventFields};
use ordo_core::metrics;
use ordo_core::secret::Secret;
use ordo_core::servicebus::sender::{Publisher, PublisherFactory, ServiceBusPublisherFactory};
use ordo_e2e::chart::{render, Series};
use ordo_e2e::sample::{insert, Generator, Workload};
use ordo_e2e::stack::{emulator_config, Stack};
use ordo_e2e::stats::percentile;
use ordo_servicebus_emulator::TopicConfig;
use serde_json::json;

/// Measures ordo end to end next to the raw ceiling of its stand-ins.
#[derive(Debug, Parser)]
#[command(name = "ordo-bench")]
struct Args {
    /// Aggregates in the workload (half User, half Order).
    #[arg(long, default_value_t = 500)]
    aggregates: usize,
    /// Events per aggregate.
    #[arg(long, default_value_t = 40)]
    events_per_aggregate: usize,
    /// Projector processes.
    #[arg(long, default_value_t = 2)]
    projectors: usize,
    /// Concurrent senders for the raw send ceiling (the producer's `senders` default).
    #[arg(long, default_value_t = 8)]
    senders: usize,
    /// The Rust SecantusDB server; default `.ordo/tools/bin/secantusd-rs` when present,
    /// otherwise the Python server (slower; said in the output).
    #[arg(long, env = "ORDO_BENCH_SECANTUS_BIN")]
    secantus_bin: Option<PathBuf>,
    /// Where the JSON summary and the SVG chart go.
    #[arg(long, default_value = "target/ordo-bench")]
    out: PathBuf,
}

const CEILING_TOPIC: &str = "ordo-bench-ceiling";

/// CPU seconds and peak RSS of a running process.
fn process_usage(pid: u32) -> Option<(f64, u64)> {
    Some((
        ordo_testkit::bench::cpu_seconds(pid)?,
        ordo_testkit::bench::peak_rss_bytes(pid)?,
    ))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Before the runtime starts: this sets the variable the test kit reads.
    let server = ordo_testkit::bench::RustSecantus::start_if_available(args.secantus_bin.clone());
    let mongo_kind = if server.is_some() {
        "secantusd-rs"
    } else if std::env::var_os("ORDO_TEST_MONGODB_URI").is_some() {
        "external"
    } else {
        "secantusd-py (slower stand-in: run scripts/bench.sh to provision secantusd-rs)"
    };
    let rt = ordo_core::cli::runtime()?;
    let result = rt.block_on(run(args, mongo_kind));
    drop(server);
    result
}

fn workload(args: &Args, seed: u64) -> Workload {
    Workload {
        users: args.aggregates / 2,
        orders: args.aggregates - args.aggregates / 2,
        events_per_aggregate: args.events_per_aggregate,
        seed,
    }
}

/// Insert → change-stream ceiling: how fast the stand-in takes inserts and how fast a change
/// stream drains them, with no ordo in between.
async fn change_stream_ceiling(stack: &Stack, args: &Args) -> anyhow::Result<(f64, f64)> {
    let coll = stack.db().collection::<Document>("ceiling_events");
    let w = workload(args, 99);
    let total = w.total_events();
    let mut stream = coll.watch().await?;
    let reader = tokio::spawn(async move {
        let mut n = 0;
        while n < total {
            match stream.next().await {
                Some(Ok(_)) => n += 1,
                Some(Err(e)) => return Err(anyhow::Error::from(e)),
                None => bail!("change stream ended"),
            }
        }
        Ok(Instant::now())
    });
    let mut g = Generator::new(w, "ceiling-");
    let started = Instant::now();
    loop {
        let batch = g.next_batch(1000);
        if batch.is_empty() {
            break;
        }
        insert(&coll, batch).await?;
    }
    let inserted = started.elapsed().as_secs_f64();
    let drained = reader.await??.duration_since(started).as_secs_f64();
    Ok((total as f64 / inserted, total as f64 / drained))
}

/// Raw batched sends to a topic without subscriptions, one batch per session, `senders` in
/// parallel — the producer's publishing pattern without the producer.
async fn send_ceiling(stack: &Stack, args: &Args) -> anyhow::Result<f64> {
    let w = workload(args, 98);
    let mut g = Generator::new(w, "ceiling-");
    let mut by_session: BTreeMap<String, Vec<ordo_core::envelope::WireMessage>> = BTreeMap::new();
    loop {
        let batch = g.next_batch(1000);
        if batch.is_empty() {
            break;
        }
        for mut d in batch {
            d.insert("_id", mongodb::bson::oid::ObjectId::new());
            let m =
                Envelope::from_event(&d, &EventFields::default(), "bench", "events")?.to_message();
            by_session.entry(m.session_id.clone()).or_default().push(m);
        }
    }
    let mut batches: Vec<Vec<ordo_core::envelope::WireMessage>> = Vec::new();
    for msgs in by_session.into_values() {
        for chunk in msgs.chunks(100) {
            batches.push(chunk.to_vec());
        }
    }
    let total: usize = batches.iter().map(Vec::len).sum();
    let factory = ServiceBusPublisherFactory {
        connection_string: Secret::new(stack.bus.connection_string()),
        topic: CEILING_TOPIC.into(),
        identifier: "ordo-bench".into(),
        max_batch_bytes: None,
        send_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(10),
    };
    let queue = Arc::new(tokio::sync::Mutex::new(batches));
    let mut publishers = Vec::new();
    for _ in 0..args.senders {
        publishers.push(factory.open().await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut p in publishers {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let next = queue.lock().await.pop();
                let Some(batch) = next else {
                    return Ok::<_, anyhow::Error>(());
                };
                p.publish(&batch).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Guarded single-document updates, 8 in flight: the projector's write pattern without it.
async fn guarded_update_ceiling(stack: &Stack) -> anyhow::Result<f64> {
    let coll = stack.db().collection::<Document>("ceiling_models");
    let docs = 200;
    let rounds = 10;
    coll.insert_many((0..docs).map(|i| doc! {"_id": format!("m{i}"), "lastEventId": 0_i64}))
        .await?;
    let started = Instant::now();
    for r in 0..rounds {
        futures::stream::iter(0..docs)
            .map(|i| {
                let coll = coll.clone();
                async move {
                    coll.update_one(
                        doc! {"_id": format!("m{i}"), "lastEventId": r as i64},
                        doc! {"$set": {"lastEventId": r as i64 + 1, "v": r}},
                    )
                    .await
                }
            })
            .buffer_unordered(8)
            .try_collect::<Vec<_>>()
            .await?;
    }
    Ok((docs * rounds) as f64 / started.elapsed().as_secs_f64())
}

#[derive(Debug, Default, Clone)]
struct Sample {
    t: f64,
    written: f64,
    published: f64,
    applied: f64,
    lag: f64,
}

async fn run(args: Args, mongo_kind: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let mut emulator = emulator_config(Duration::from_secs(30));
    emulator.topics.push(TopicConfig {
        name: CEILING_TOPIC.into(),
        subscriptions: Vec::new(),
        ..emulator.topics[0].clone()
    });
    let mut stack = Stack::start_with(emulator).await?;
    eprintln!("bench: MongoDB stand-in {mongo_kind}; measuring ceilings");
    let (insert_rate, drain_rate) = change_stream_ceiling(&stack, &args).await?;
    let send_rate = if stack.bus.is_external() {
        f64::NAN
    } else {
        send_ceiling(&stack, &args).await?
    };
    let update_rate = guarded_update_ceiling(&stack).await?;
    eprintln!(
        "bench: ceilings: insert {insert_rate:.0}/s, change stream {drain_rate:.0}/s, batched sends {send_rate:.0}/s, guarded updates {update_rate:.0}/s"
    );

    stack.start_at = "now".into();
    stack.spawn_producer().await?;
    for slot in 0..args.projectors {
        stack.spawn_projector(slot).await?;
    }
    let w = workload(&args, 1);
    let total = w.total_events();
    let events = stack.db().collection::<Document>("events");
    let mut g = Generator::new(w, "");
    let started = Instant::now();
    let mut samples = vec![Sample::default()];
    let mut written = 0;
    let mut last_sample = Instant::now();
    let mut write_secs = None;
    let deadline = Instant::now() + Duration::from_secs(900);
    // The samples below are 0.25-0.5 s apart (and wait for the read-model check), too coarse to
    // time the producer, which publishes a run like this in well under a second: a second
    // probe watches the published count alone.
    let published_at = async {
        loop {
            if stack.metric(metrics::EVENTS_PUBLISHED).await >= total as f64 {
                return Some(started.elapsed().as_secs_f64());
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let run = async {
        loop {
            if written < total {
                let batch = g.next_batch(500);
                written += batch.len();
                insert(&events, batch).await?;
                if written >= total {
                    write_secs = Some(started.elapsed().as_secs_f64());
                }
            }
            if last_sample.elapsed() >= Duration::from_millis(500) || written >= total {
                last_sample = Instant::now();
                let applied = stack.metric(metrics::EVENTS_APPLIED).await;
                samples.push(Sample {
                    t: started.elapsed().as_secs_f64(),
                    written: written as f64,
                    published: stack.metric(metrics::EVENTS_PUBLISHED).await,
                    applied,
                    lag: stack.metric(metrics::CHANGE_STREAM_LAG).await,
                });
                if written >= total {
                    let (done, aggregates) = stack.caught_up().await?;
                    if done == aggregates {
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!("read models did not catch up: {done}/{aggregates}");
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        anyhow::Ok(())
    };
    let (run, published_at) = tokio::join!(run, published_at);
    run?;
    let all_secs = started.elapsed().as_secs_f64();
    let last = samples.last().cloned().unwrap_or_default();
    let time_to =
        |f: &dyn Fn(&Sample) -> f64, n: f64| samples.iter().find(|s| f(s) >= n).map(|s| s.t);
    let published_secs = published_at
        .or_else(|| time_to(&|s| s.published, total as f64))
        .unwrap_or(all_secs);

    let mut daemons = BTreeMap::new();
    let mut record = |name: String, pid: u32| {
        if let Some((cpu, rss)) = process_usage(pid) {
            daemons.insert(
                name,
                json!({
                    "cpu_seconds": cpu,
                    "cpu_ms_per_1000_events": cpu * 1000.0 / total as f64 * 1000.0,
                    "peak_rss_bytes": rss,
                    "peak_rss_bytes_per_1000_events": rss as f64 * 1000.0 / total as f64,
                }),
            );
        }
    };
    if let Some(p) = &stack.producer {
        record("ordo-producer".into(), p.pid());
    }
    for (i, p) in stack.projectors.iter().enumerate() {
        if let Some(p) = p {
            record(format!("ordo-projector-{}", i + 1), p.pid());
        }
    }
    let verdict = stack.verify().await?;
    let mut lat = Vec::new();
    for d in stack.projectors.iter().flatten() {
        if let Ok((200, text)) = d.http_get("/metrics").await {
            lat.push(text);
        }
    }
    let joined = lat.join("\n");
    let q = |x| ordo_e2e::prom::histogram_quantile(&joined, metrics::END_TO_END_LAG, x);
    let mut final_lat = stack.final_latencies().await?;
    let summary = json!({
        "workload": {"events": total, "aggregates": args.aggregates, "projectors": args.projectors},
        "stand_ins": {"mongodb": mongo_kind, "servicebus": if stack.bus.is_external() { "external" } else { "ordo-servicebus-emulator" }},
        "ceiling": {
            "insert_events_per_s": insert_rate,
            "change_stream_events_per_s": drain_rate,
            "batched_sends_messages_per_s": send_rate,
            "guarded_updates_per_s": update_rate,
        },
        "stages": {
            "written_events_per_s": total as f64 / write_secs.unwrap_or(all_secs),
            "published_events_per_s": total as f64 / published_secs,
            "applied_events_per_s": total as f64 / all_secs,
            "producer_vs_change_stream_ceiling": (total as f64 / published_secs) / drain_rate,
        },
        "end_to_end_latency_seconds": {
            "histogram_p50": q(0.5), "histogram_p95": q(0.95), "histogram_p99": q(0.99),
            "last_event_per_aggregate_p50": percentile(&mut final_lat, 0.5),
            "last_event_per_aggregate_p95": percentile(&mut final_lat, 0.95),
            "last_event_per_aggregate_p99": percentile(&mut final_lat, 0.99),
        },
        "daemons": daemons,
        "duplicates": stack.metric(metrics::DUPLICATES).await,
        "verified": verdict.ok(),
        "mismatches": verdict.mismatches.len(),
        "final": {"published": last.published, "applied": last.applied},
    });
    let text = serde_json::to_string_pretty(&summary)?;
    println!("{text}");
    std::fs::write(args.out.join("summary.json"), &text)?;
    let rate = |f: &dyn Fn(&Sample) -> f64| -> Vec<(f64, f64)> {
        samples
            .windows(2)
            .map(|w| {
                (
                    w[1].t,
                    (f(&w[1]) - f(&w[0])).max(0.0) / (w[1].t - w[0].t).max(1e-3),
                )
            })
            .collect()
    };
    let svg = render(
        &format!(
            "ordo: {total} events, {} projectors, MongoDB {}",
            args.projectors,
            mongo_kind.split(' ').next().unwrap_or("")
        ),
        "events/s",
        "change-stream lag (s)",
        &[
            Series {
                label: "written/s".into(),
                color: "#7f7f7f",
                points: rate(&|s| s.written),
                right_axis: false,
            },
            Series {
                label: "published/s".into(),
                color: "#1f77b4",
                points: rate(&|s| s.published),
                right_axis: false,
            },
            Series {
                label: "applied/s".into(),
                color: "#2ca02c",
                points: rate(&|s| s.applied),
                right_axis: false,
            },
            Series {
                label: "lag (s)".into(),
                color: "#d62728",
                points: samples.iter().map(|s| (s.t, s.lag)).collect(),
                right_axis: true,
            },
        ],
    );
    std::fs::write(args.out.join("chart.svg"), svg)?;
    eprintln!(
        "bench: wrote {}/summary.json and chart.svg",
        args.out.display()
    );
    if !verdict.ok() {
        bail!(
            "{} read models differ from the fold",
            verdict.mismatches.len()
        );
    }
    Ok(())
}
