//! One row through ordo: a producer and the projectors on the row's fresh stand-ins, the load
//! written, and the wait until every event is applied (or the row's time is up).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use mongodb::bson::Document;
use ordo_core::metrics;
use ordo_e2e::stack::Stack;
use ordo_e2e::stats::percentile;
use serde_json::{json, Value};

use crate::ceilings::MongoCeilings;
use crate::latency::{latency_json, InsertTimes, ReadModelWatch};
use crate::load::{write_load, Load};
use crate::processes::{processes_json, ConnectionSampler, MachineCpu};
use crate::{Args, RowResult};

pub(crate) async fn run_ordo(
    stack: &mut Stack,
    args: &Args,
    load: &Load,
    ceilings: &MongoCeilings,
) -> anyhow::Result<RowResult> {
    let pids = spawn_daemons(stack, args).await?;
    let broker = stack.bus.emulator()?.address();
    let sampler = ConnectionSampler::start(pids.iter().map(|p| p.1).collect(), broker);
    let times: InsertTimes = Arc::default();
    let watch = ReadModelWatch::start(stack, times.clone()).await?;
    let events = stack.db().collection::<Document>("events");
    let machine = MachineCpu::start(stack.mongo.server_pid().or(args.secantus_pid));
    let started = Instant::now();
    let write = write_load(&events, load, usize::MAX, false, &times);
    let (written, write_done) = write.await?;
    let Applied { applied, complete } = wait_applied(stack, args, written, write_done).await?;
    let secs = started.elapsed().as_secs_f64();
    let machine = machine.finish(secs);
    let connections = sampler.finish().await;
    let published = stack.metric(metrics::EVENTS_PUBLISHED).await;
    let duplicates = stack.metric(metrics::DUPLICATES).await;
    let mut lat = watch.finish().await?;
    let missing = applied.min(written).saturating_sub(lat.len());
    let aggregates = times.lock().unwrap_or_else(|e| e.into_inner()).len();
    let processes = processes_json(&pids, &connections, applied.max(1));
    let producer_cpu = pids
        .first()
        .and_then(|(_, pid)| ordo_testkit::bench::cpu_seconds(*pid))
        .map(|c| c / written.max(1) as f64);
    let verified = if complete && load.rate.is_none() {
        verify(stack).await?;
        Some(true)
    } else {
        None
    };
    let histogram = lag_histogram(stack).await;
    stack.producer = None;
    stack.projectors.clear();
    let events_per_s = applied as f64 / secs;
    let p99 = percentile(&mut lat, 0.99);
    let json = json!({
        "events": written,
        "applied": applied,
        "complete": complete,
        "seconds": secs,
        "write_seconds": write_done.duration_since(started).as_secs_f64(),
        "events_per_s": events_per_s,
        "sessions_per_s": aggregates as f64 / secs,
        "published": published,
        "duplicates": duplicates,
        "latency_seconds": latency_json(&mut lat, missing),
        "latency_measured_as": "insert → the read model write (its lastUpdatedAt), for every event, from a change stream on the read-model collections",
        "end_to_end_lag_histogram_seconds": histogram,
        "processes": processes,
        "machine": machine,
        "producer_cpu_ms_per_1000_events": producer_cpu.map(|c| c * 1e6),
        "producer_cpu_vs_bare_reader": producer_cpu.map(|c| c / ceilings.reader_cpu_per_event),
        "verified": verified,
    });
    Ok(RowResult {
        json,
        events_per_s,
        p99,
    })
}

/// Starts the producer (from now, with the row's settings) and the projectors; returns their
/// names and pids, the producer first.
async fn spawn_daemons(stack: &mut Stack, args: &Args) -> anyhow::Result<Vec<(String, u32)>> {
    stack.producer_settings.start_at = "now".into();
    if let Some(bytes) = args.max_in_flight_bytes {
        stack.producer_settings.max_in_flight_bytes = bytes;
    }
    if let Some(n) = args.read_batch_size {
        stack.producer_settings.read_batch_size = n;
    }
    stack.spawn_producer().await?;
    for slot in 0..args.projectors {
        stack.spawn_projector(slot).await?;
    }
    let mut pids: Vec<(String, u32)> = Vec::new();
    if let Some(p) = &stack.producer {
        pids.push(("ordo-producer".into(), p.pid()));
    }
    for (i, p) in stack.projectors.iter().flatten().enumerate() {
        pids.push((format!("ordo-projector-{}", i + 1), p.pid()));
    }
    Ok(pids)
}

/// Where an incomplete row's events are: how many aggregates' read models caught up, the
/// emulator's sessions that still hold messages, with their lock holders, and each entity's
/// dead letters.
async fn report_stuck(stack: &mut Stack) {
    match stack.caught_up().await {
        Ok((done, aggregates)) => {
            eprintln!("bench: {done}/{aggregates} aggregates' read models caught up")
        }
        Err(e) => eprintln!("bench: read models not checked: {e:#}"),
    }
    let Ok(emulator) = stack.bus.emulator() else {
        return;
    };
    for entity in emulator.stats().entities {
        let waiting: Vec<_> = entity.sessions.iter().filter(|s| s.active > 0).collect();
        if waiting.is_empty() && entity.dead_lettered == 0 {
            continue;
        }
        eprintln!(
            "bench: {}: {} active, {} locked, {} dead-lettered",
            entity.path, entity.active, entity.locked, entity.dead_lettered
        );
        for s in waiting.iter().take(20) {
            eprintln!("bench:   session {s:?}");
        }
    }
}

/// How far the projectors got.
struct Applied {
    /// Events applied (the projectors' counter).
    applied: usize,
    /// Every written event applied and every aggregate caught up.
    complete: bool,
}

/// Waits until the `written` events are applied and every aggregate caught up, or
/// `max_row_secs` after the last write. Burst rows wait until every event is applied; the
/// steady row waits for the tail.
async fn wait_applied(
    stack: &mut Stack,
    args: &Args,
    written: usize,
    write_done: Instant,
) -> anyhow::Result<Applied> {
    // From the last write: on a slow stand-in the writes alone can take longer than the limit.
    let deadline = write_done + Duration::from_secs(args.max_row_secs);
    loop {
        stack.check_alive()?;
        let applied = stack.metric(metrics::EVENTS_APPLIED).await as usize;
        if applied >= written {
            let (done, aggregates) = stack.caught_up().await?;
            if done == aggregates {
                return Ok(Applied {
                    applied,
                    complete: true,
                });
            }
        }
        if Instant::now() > deadline {
            eprintln!(
                "bench: stopped waiting {}s after the last write: {applied}/{written} applied",
                args.max_row_secs
            );
            report_stuck(stack).await;
            return Ok(Applied {
                applied,
                complete: false,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Fails the run when a read model differs from the fold of its events.
async fn verify(stack: &Stack) -> anyhow::Result<()> {
    let v = stack.verify().await?;
    if !v.ok() {
        bail!(
            "{} read models differ from the fold: {:?}",
            v.mismatches.len(),
            v.mismatches.first()
        );
    }
    Ok(())
}

/// The projectors' own histogram (bucket upper bounds): a cross-check of the watched
/// latencies that needs no change stream.
async fn lag_histogram(stack: &Stack) -> Value {
    let mut texts = Vec::new();
    for d in stack.projectors.iter().flatten() {
        if let Ok((200, text)) = d.http_get("/metrics").await {
            texts.push(text);
        }
    }
    let joined = texts.join("\n");
    let q = |x| ordo_testkit::prom::histogram_quantile(&joined, metrics::END_TO_END_LAG, x);
    json!({"p50_at_most": q(0.5), "p95_at_most": q(0.95), "p99_at_most": q(0.99)})
}
