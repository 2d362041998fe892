//! Apply throughput of one `ordo-projector` process: batched sessions against the same
//! projector one event at a time (`max_concurrent_sessions = 1`, `batch_size = 1`), measured
//! in the same run on the same workload.
//!
//! `cargo bench -p ordo-projector --bench apply` (release). Reports applied events/s, p50/p99
//! latency of one batch (receive to settled, from the projector's `batch settled` log events)
//! and CPU seconds of the projector process per 1,000 events (`/proc/<pid>/stat`
//! utime+stime). Uses the Rust SecantusDB server at `.ordo/tools/bin/secantusd-rs` when
//! present (started here on a free port), else the Python one the test kit provisions, and
//! says which. `ORDO_BENCH_AGGREGATES` (default 100) aggregates of 20 events each.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use ordo_core::metrics as m;
use ordo_testkit::{free_health_addr, Daemon};

const PER_AGGREGATE: i64 = 20;

/// The batched projector: the test defaults with these settings.
fn batched() -> ProjectorSection {
    ProjectorSection {
        max_concurrent_sessions: 16,
        batch_size: 100,
        session_idle_timeout: Duration::from_millis(100),
        receive_wait: Duration::from_millis(50),
        ..tuning()
    }
}

/// The same projector, one event at a time.
fn one_at_a_time() -> ProjectorSection {
    ProjectorSection {
        max_concurrent_sessions: 1,
        batch_size: 1,
        ..batched()
    }
}

fn main() {
    // Before any thread starts: the test kit reads the variable this sets.
    let server = ordo_testkit::bench::RustSecantus::start_if_available(None);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(bench(server.is_some()));
    drop(server);
}

struct Measured {
    mode: &'static str,
    events: usize,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    batches: usize,
    cpu_s_per_1000: f64,
}

fn cpu_seconds(pid: u32) -> f64 {
    ordo_testkit::bench::cpu_seconds(pid).unwrap_or(0.0)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i]
}

/// Batch latencies (ms) from the projector's JSON log.
fn batch_latencies(logs: &str) -> Vec<f64> {
    let mut out: Vec<f64> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        // The daemon's JSON logs put an event's fields at the top level.
        .filter(|v| v["message"] == "batch settled")
        .filter_map(|v| v["elapsed_us"].as_u64())
        .map(|us| us as f64 / 1000.0)
        .collect();
    out.sort_by(f64::total_cmp);
    out
}

async fn measure(
    mode: &'static str,
    prefix: &str,
    projector: ProjectorSection,
    n: usize,
) -> Measured {
    let env = start(Duration::from_secs(30)).await;
    let events = workload(prefix, n, PER_AGGREGATE);
    env.insert_events(&events).await;
    env.publish(&events).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.active() < events.len() {
        assert!(
            Instant::now() < deadline,
            "messages not on the subscription"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let health = free_health_addr();
    // JSON logs, so the per-batch `batch settled` events can be read back.
    let config = env
        .projector_config(health, &projector)
        .set("telemetry", "log_format", "json")
        .render();
    let mut proj = Daemon::spawn(&bin(), &config, health, &[]).expect("spawn projector");
    proj.wait_ready(Duration::from_secs(30)).await.unwrap();
    let total = events.len() as f64;
    // The window starts with the first applied event (connecting is not applying).
    let (t0, applied0, cpu0) = loop {
        let applied = proj.metric(m::EVENTS_APPLIED).await;
        if applied > 0.0 {
            break (Instant::now(), applied, cpu_seconds(proj.pid()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let deadline = Instant::now() + Duration::from_secs(900);
    while proj.metric(m::EVENTS_APPLIED).await < total {
        assert!(Instant::now() < deadline, "{mode}: not done within 15 min");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu_s = cpu_seconds(proj.pid()) - cpu0;
    let counted = total - applied0;
    proj.sigterm().unwrap();
    proj.wait_exit(Duration::from_secs(20)).await.unwrap();
    let expected = env.expected().await;
    assert!(env.converged(&expected).await, "{mode}: read models differ");
    let lat = batch_latencies(&proj.logs());
    Measured {
        mode,
        events: events.len(),
        rate: counted / secs,
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        batches: lat.len(),
        cpu_s_per_1000: cpu_s / counted * 1000.0,
    }
}

async fn bench(rust_server: bool) {
    let db = match (rust_server, std::env::var("ORDO_TEST_MONGODB_URI")) {
        (true, _) => "SecantusDB (Rust, secantusd-rs)".to_string(),
        (false, Ok(uri)) if !uri.is_empty() => "MongoDB named by ORDO_TEST_MONGODB_URI".into(),
        _ => "SecantusDB (Python, provisioned by the test kit)".into(),
    };
    let n = std::env::var("ORDO_BENCH_AGGREGATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    println!("ordo-projector apply bench: {n} aggregates x {PER_AGGREGATE} events, database: {db}");
    let batched = measure("batched", "b", batched(), n).await;
    let single = measure("one-at-a-time", "s", one_at_a_time(), n).await;
    println!(
        "{:<14} {:>7} {:>10} {:>9} {:>9} {:>8} {:>14}",
        "mode", "events", "events/s", "p50 ms", "p99 ms", "batches", "cpu s/1000 ev"
    );
    for r in [&batched, &single] {
        println!(
            "{:<14} {:>7} {:>10.0} {:>9.2} {:>9.2} {:>8} {:>14.3}",
            r.mode, r.events, r.rate, r.p50_ms, r.p99_ms, r.batches, r.cpu_s_per_1000
        );
    }
    let ratio = batched.rate / single.rate;
    println!(
        "speed-up: {ratio:.1}x the one-at-a-time rate (goal: at least 5x) {}",
        if ratio >= 5.0 { "ok" } else { "BELOW GOAL" }
    );
}
