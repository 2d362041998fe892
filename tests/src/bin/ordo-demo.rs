//! The main job, end to end, in one command (`scripts/demo.sh`).
//!
//! Starts the stand-ins (SecantusDB, the Service Bus emulator) or uses the services named by
//! `MONGODB_URI` / `AZURE_SERVICEBUS_CONNECTION_STRING`, one producer and two projectors; writes
//! a stream of sample User and Order events while printing progress; kills one projector with
//! SIGKILL half-way and starts it again; then checks that every read model equals the fold of
//! the events collection and prints the verdict with the throughput and latency it saw.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use mongodb::bson::{doc, Document};
use ordo_core::metrics;
use ordo_e2e::sample::{insert, Generator, Workload};
use ordo_e2e::stack::Stack;
use ordo_e2e::stats::percentile;

/// Runs ordo end to end on sample events and checks the read models.
#[derive(Debug, Parser)]
#[command(name = "ordo-demo")]
struct Args {
    /// User aggregates to generate.
    #[arg(long, default_value_t = 150)]
    users: usize,
    /// Order aggregates to generate.
    #[arg(long, default_value_t = 150)]
    orders: usize,
    /// Events per aggregate.
    #[arg(long, default_value_t = 10)]
    events_per_aggregate: usize,
    /// Events written per second.
    #[arg(long, default_value_t = 300)]
    rate: usize,
    /// Seed of the workload.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Give up waiting for the read models after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

fn use_real_services_from_env() {
    // The demo honours the variables a migrating team already has; the harness reads the
    // ORDO_TEST_* names, so map them across.
    for (from, to) in [
        ("MONGODB_URI", "ORDO_TEST_MONGODB_URI"),
        (
            "AZURE_SERVICEBUS_CONNECTION_STRING",
            "ORDO_TEST_SERVICEBUS_CONNECTION_STRING",
        ),
        ("AZURE_SERVICEBUS_TOPIC_NAME", "ORDO_TEST_SERVICEBUS_TOPIC"),
        (
            "AZURE_SERVICEBUS_SUBSCRIPTION_NAME",
            "ORDO_TEST_SERVICEBUS_SUBSCRIPTION",
        ),
    ] {
        if let (Ok(v), Err(_)) = (std::env::var(from), std::env::var(to)) {
            // Still single-threaded here: the runtime starts after this.
            std::env::set_var(to, v);
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    use_real_services_from_env();
    let rt = ordo_core::cli::runtime()?;
    rt.block_on(run(args))
}

async fn progress(
    stack: &Stack,
    written: usize,
    total: usize,
    started: Instant,
) -> anyhow::Result<(usize, usize)> {
    let published = stack.metric(metrics::EVENTS_PUBLISHED).await;
    let applied = stack.metric(metrics::EVENTS_APPLIED).await;
    let (done, aggregates) = stack.caught_up().await?;
    let lag = newest_lag_secs(stack).await.unwrap_or(0.0);
    println!(
        "[{:>5.1}s] written {written:>6}/{total}  published {published:>6.0}  applied {applied:>6.0}  read models caught up {done:>4}/{aggregates}  lag {lag:.2}s",
        started.elapsed().as_secs_f64()
    );
    Ok((done, aggregates))
}

/// Now minus the timestamp of the oldest event not yet in its read model, approximated by the
/// newest event applied (read models carry lastUpdatedAt, events carry timestamp).
async fn newest_lag_secs(stack: &Stack) -> Option<f64> {
    let db = stack.db();
    let newest_event = db
        .collection::<Document>("events")
        .find_one(doc! {})
        .sort(doc! {"_id": -1})
        .await
        .ok()??;
    let t = newest_event
        .get_datetime("timestamp")
        .ok()?
        .timestamp_millis();
    let mut newest_applied = 0;
    for coll in ["users", "orders"] {
        if let Ok(Some(d)) = db
            .collection::<Document>(coll)
            .find_one(doc! {})
            .sort(doc! {"lastUpdatedAt": -1})
            .await
        {
            if let Ok(at) = d.get_datetime("lastUpdatedAt") {
                newest_applied = newest_applied.max(at.timestamp_millis());
            }
        }
    }
    Some(((t - newest_applied).max(0)) as f64 / 1000.0)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let workload = Workload {
        users: args.users,
        orders: args.orders,
        events_per_aggregate: args.events_per_aggregate,
        seed: args.seed,
    };
    let total = workload.total_events();
    println!(
        "ordo demo: {} aggregates x {} events = {total} events, {} events/s, seed {}",
        args.users + args.orders,
        args.events_per_aggregate,
        args.rate,
        args.seed
    );
    let mut stack = start().await?;
    let started = Instant::now();
    write_events(&mut stack, workload, args.rate, started).await?;
    let write_secs = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    loop {
        stack.check_alive()?;
        let (done, aggregates) = progress(&stack, total, total, started).await?;
        if done == aggregates {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "read models did not catch up within {}s ({done}/{aggregates})",
                args.timeout_secs
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!();
    println!("events written      {total} in {write_secs:.1}s");
    let total_secs = started.elapsed().as_secs_f64();
    println!(
        "all applied after   {total_secs:.1}s  ({:.0} events/s end to end)",
        total as f64 / total_secs
    );
    report(&stack).await
}

/// The stand-ins, one producer and two projectors.
async fn start() -> anyhow::Result<Stack> {
    let mut stack = Stack::start(Duration::from_secs(10)).await?;
    println!(
        "stand-ins: MongoDB {} (database {}), Service Bus {}",
        if stack.mongo.is_external() {
            "external"
        } else {
            "SecantusDB"
        },
        stack.mongo.db_name(),
        if stack.bus.is_external() {
            "external"
        } else {
            "ordo-servicebus-emulator"
        }
    );
    stack
        .spawn_producer()
        .await
        .context("start ordo-producer")?;
    stack
        .spawn_projector(0)
        .await
        .context("start ordo-projector #1")?;
    stack
        .spawn_projector(1)
        .await
        .context("start ordo-projector #2")?;
    println!("started: 1 producer, 2 projectors");
    Ok(stack)
}

/// Inserts the workload's events at `rate` per second, killing projector #2 with SIGKILL
/// halfway and starting it again.
async fn write_events(
    stack: &mut Stack,
    workload: Workload,
    rate: usize,
    started: Instant,
) -> anyhow::Result<()> {
    let total = workload.total_events();
    let events = stack.db().collection::<Document>("events");
    let mut generator = Generator::new(workload, "");
    let per_tick = (rate / 10).max(1);
    let mut written = 0;
    let mut killed = false;
    let mut last_report = Instant::now();
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    while written < total {
        interval.tick().await;
        let batch = generator.next_batch(per_tick);
        written += batch.len();
        insert(&events, batch)
            .await
            .context("insert sample events")?;
        if !killed && written >= total / 2 {
            killed = true;
            if let Some(p) = stack.projectors[1].take() {
                p.kill9()?;
                println!("[{:>5.1}s] killed projector #2 with SIGKILL; its sessions move when their locks expire", started.elapsed().as_secs_f64());
            }
            stack
                .spawn_projector(1)
                .await
                .context("restart ordo-projector #2")?;
            println!(
                "[{:>5.1}s] restarted projector #2",
                started.elapsed().as_secs_f64()
            );
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            progress(stack, written, total, started).await?;
        }
    }
    Ok(())
}

/// Latencies, duplicates and the verdict: every read model equals the fold of its events.
async fn report(stack: &Stack) -> anyhow::Result<()> {
    let verdict = stack.verify().await?;
    let mut latencies = stack.final_latencies().await?;
    let mut p = |q| percentile(&mut latencies, q).unwrap_or(f64::NAN);
    let blocked = stack.blocked().await?;
    println!(
        "end-to-end latency  p50 {:.0} ms  p95 {:.0} ms  p99 {:.0} ms  (insert -> read model, last event of each aggregate)",
        p(0.5) * 1000.0,
        p(0.95) * 1000.0,
        p(0.99) * 1000.0,
    );
    println!(
        "duplicates absorbed {:.0}",
        stack.metric(metrics::DUPLICATES).await
    );
    println!("blocked aggregates  {blocked}");
    if verdict.ok() && blocked == 0 {
        println!(
            "VERDICT: OK - {} read models equal the fold of {} events",
            verdict.aggregates, verdict.events
        );
        Ok(())
    } else {
        for m in verdict.mismatches.iter().take(10) {
            println!("  mismatch: {m}");
        }
        bail!(
            "VERDICT: FAILED - {} mismatching read models, {blocked} blocked",
            verdict.mismatches.len()
        )
    }
}
