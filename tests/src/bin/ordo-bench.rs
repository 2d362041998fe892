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

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType};
use mongodb::Collection;
use ordo_core::envelope::{Envelope, EventFields};
use ordo_core::metrics;
use ordo_core::secret::Secret;
use ordo_core::servicebus::sender::{Publisher, PublisherFactory, ServiceBusPublisherFactory};
use ordo_e2e::chart::{render_bars, BarPanel};
use ordo_e2e::sample::{insert, Generator, Workload};
use ordo_e2e::stack::{emulator_config, Stack, TestServiceBus};
use ordo_e2e::stats::percentile;
use ordo_projection::Projection;
use ordo_servicebus_emulator::{EmulatorConfig, SubscriptionConfig, TopicConfig};
use serde_json::{json, Value};

/// A workload shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Shape {
    /// Few aggregates with many events each, written as a burst.
    Hot,
    /// Many aggregates with few events each (new orders, changed e-mails), as a burst.
    Churn,
    /// Inserts paced by the clock at a fraction of the hot shape's measured capacity.
    Steady,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Hot => "hot",
            Shape::Churn => "churn",
            Shape::Steady => "steady",
        }
    }
}

/// Every workload shape through ordo and through the seed design, side by side.
#[derive(Debug, Parser)]
#[command(name = "ordo-bench")]
struct Args {
    /// Shapes to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["hot", "churn", "steady"])]
    shapes: Vec<Shape>,
    /// Broker round trips (milliseconds, emulator `[namespace] round_trip`) to run every shape
    /// with, comma-separated.
    #[arg(long, value_delimiter = ',', default_values = ["0", "3"])]
    round_trip_ms: Vec<u64>,
    /// Aggregates of the hot shape (half User, half Order).
    #[arg(long, default_value_t = 500)]
    hot_aggregates: usize,
    /// Events per aggregate of the hot shape.
    #[arg(long, default_value_t = 40)]
    hot_events_per_aggregate: usize,
    /// Aggregates of the churn shape.
    #[arg(long, default_value_t = 10_000)]
    churn_aggregates: usize,
    /// Events per aggregate of the churn shape.
    #[arg(long, default_value_t = 2)]
    churn_events_per_aggregate: usize,
    /// How long the steady shape inserts (30 s by default, to keep the whole run near 10
    /// minutes on 2 cores; the latency percentiles settle within it).
    #[arg(long, default_value_t = 30)]
    steady_secs: u64,
    /// Offered load of the steady shape as a fraction of the hot shape's events/s measured with
    /// the same round trip.
    #[arg(long, default_value_t = 0.5)]
    steady_fraction: f64,
    /// Offered load of the steady shape in events/s, when the hot shape is not run.
    #[arg(long)]
    steady_rate: Option<f64>,
    /// Aggregates the steady shape's events are spread over.
    #[arg(long, default_value_t = 500)]
    steady_aggregates: usize,
    /// Projector processes (and seed consumers).
    #[arg(long, default_value_t = 2)]
    projectors: usize,
    /// A row that has not caught up this many seconds after its last write stops and reports
    /// the rate it reached (marked `complete: false`), so a slow shape cannot stall the run.
    #[arg(long, default_value_t = 60)]
    max_row_secs: u64,
    /// Skip the seed design.
    #[arg(long)]
    no_seed: bool,
    /// Events of each shape the seed design is measured on: the same shape with proportionally
    /// fewer aggregates (the steady shape: its first events at the same pace). At about 9
    /// events/s the seed cannot do the whole workload in a bounded run.
    #[arg(long, default_value_t = 400)]
    seed_events: usize,
    /// How long the seed design gets per row; events not applied by then count with the time
    /// they had waited (their latency is at least that).
    #[arg(long, default_value_t = 25)]
    seed_secs: u64,
    /// The seed design's directory (`npm ci` there first).
    #[arg(long, default_value = "bench/seed-baseline")]
    seed_dir: PathBuf,
    /// Events of the stand-ins' ceiling measurements.
    #[arg(long, default_value_t = 10_000)]
    ceiling_events: usize,
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
/// A subscription of the seed design's topic nobody receives from: its per-session message
/// counts say how many messages were published, so published minus still active is how many
/// the seed's consumers completed.
const TAP_SUBSCRIPTION: &str = "bench-tap";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Before the runtime starts: this sets the variable the test kit reads.
    let server = ordo_testkit::bench::RustSecantus::start_if_available(args.secantus_bin.clone());
    let mongo_kind = if server.is_some() {
        "secantusd-rs"
    } else if std::env::var_os("ORDO_TEST_MONGODB_URI").is_some() {
        "external"
    } else {
        "secantusd-py"
    };
    if mongo_kind == "secantusd-py" {
        eprintln!("bench: MongoDB stand-in is the Python SecantusDB (slower; scripts/bench.sh --rust-secantus builds secantusd-rs)");
    }
    let rt = ordo_core::cli::runtime()?;
    let result = rt.block_on(run(args, mongo_kind));
    drop(server);
    result
}

fn split(aggregates: usize, events_per_aggregate: usize, seed: u64) -> Workload {
    Workload {
        users: aggregates / 2,
        orders: aggregates - aggregates / 2,
        events_per_aggregate,
        seed,
    }
}

// ---------------------------------------------------------------------------------------------
// Ceilings

#[derive(Debug, Clone, Copy, Default)]
struct MongoCeilings {
    insert: f64,
    change_stream: f64,
    guarded_updates: f64,
    /// CPU seconds per event of a bare change-stream reader doing the producer's decoding.
    reader_cpu_per_event: f64,
}

/// CPU seconds the calling thread has used, from `/proc/thread-self/stat`.
fn thread_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// Insert → change-stream ceiling, and the CPU a bare change-stream reader spends per event
/// doing what the producer does with each change (the envelope and the wire message). The
/// reader runs alone on its own thread and runtime, so that thread's CPU time is its cost.
async fn change_stream_ceiling(stack: &Stack, events: usize) -> anyhow::Result<(f64, f64, f64)> {
    let coll = stack.db().collection::<Document>("ceiling_events");
    let w = split((events / 20).max(2), 20.min(events.max(1)), 99);
    let total = w.total_events();
    let uri = stack.mongo.uri().to_string();
    let db_name = stack.mongo.db_name().to_string();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let reader = std::thread::spawn(move || -> anyhow::Result<(Instant, f64)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let client = mongodb::Client::with_uri_str(&uri).await?;
            let coll = client
                .database(&db_name)
                .collection::<Document>("ceiling_events");
            let mut stream = coll.watch().await?;
            let _ = ready_tx.send(());
            let cpu0 = thread_cpu_seconds().unwrap_or(0.0);
            let fields = EventFields::default();
            let mut n = 0;
            let mut bytes = 0usize;
            while n < total {
                let change: ChangeStreamEvent<Document> = match stream.next().await {
                    Some(c) => c?,
                    None => bail!("change stream ended"),
                };
                if let Some(d) = change.full_document {
                    let m =
                        Envelope::from_event(&d, &fields, &db_name, "ceiling_events")?.to_message();
                    bytes += m.body.len();
                    n += 1;
                }
            }
            let cpu = thread_cpu_seconds().unwrap_or(0.0) - cpu0;
            anyhow::ensure!(bytes > 0, "decoded nothing");
            Ok((Instant::now(), cpu))
        })
    });
    ready_rx.await.context("the bare reader did not start")?;
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
    let (done, cpu) = tokio::task::spawn_blocking(move || reader.join())
        .await?
        .map_err(|_| anyhow::anyhow!("bare reader panicked"))??;
    let drained = done.duration_since(started).as_secs_f64();
    Ok((
        total as f64 / inserted,
        total as f64 / drained,
        cpu / total as f64,
    ))
}

/// Raw batched sends to a topic without subscriptions, one batch per session, `senders` in
/// parallel — the producer's publishing pattern without the producer.
async fn send_ceiling(bus: &TestServiceBus, events: usize, senders: usize) -> anyhow::Result<f64> {
    let w = split((events / 20).max(2), 20.min(events.max(1)), 98);
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
        connection_string: Secret::new(bus.connection_string().to_string()),
        topic: CEILING_TOPIC.into(),
        identifier: "ordo-bench".into(),
        max_batch_bytes: None,
        send_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(10),
    };
    let queue = Arc::new(tokio::sync::Mutex::new(batches));
    let mut publishers = Vec::new();
    for _ in 0..senders {
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

// ---------------------------------------------------------------------------------------------
// Per-process accounting

/// AMQP connections process `pid` holds to `broker`: its sockets (`/proc/<pid>/fd`) that
/// `/proc/<pid>/net/tcp` lists as established to that address.
fn amqp_connections(pid: u32, broker: SocketAddr) -> Option<usize> {
    let IpAddr::V4(ip) = broker.ip() else {
        return None;
    };
    // The kernel prints the address as the in-memory (network order) word read as a host
    // integer, and the port in host order.
    let remote = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(ip.octets()),
        broker.port()
    );
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                inodes.insert(inode.to_string());
            }
        }
    }
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    Some(
        table
            .lines()
            .skip(1)
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 9 && f[2] == remote && f[3] == "01" && inodes.contains(f[9])
            })
            .count(),
    )
}

/// Samples the AMQP connections of a set of processes every half second and keeps each one's
/// maximum, until stopped.
struct ConnectionSampler {
    stop: Arc<AtomicBool>,
    max: Arc<Mutex<BTreeMap<u32, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnectionSampler {
    fn start(pids: Vec<u32>, broker: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(Mutex::new(BTreeMap::new()));
        let task = tokio::spawn({
            let (stop, max) = (stop.clone(), max.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    for &pid in &pids {
                        if let Some(n) = amqp_connections(pid, broker) {
                            let mut m = max.lock().unwrap_or_else(|e| e.into_inner());
                            let e = m.entry(pid).or_insert(0);
                            *e = (*e).max(n);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        });
        Self { stop, max, task }
    }

    async fn finish(self) -> BTreeMap<u32, usize> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let m = self.max.lock().unwrap_or_else(|e| e.into_inner());
        m.clone()
    }
}

fn process_json(pid: u32, events: usize, connections: Option<usize>) -> Value {
    let cpu = ordo_testkit::bench::cpu_seconds(pid);
    let rss = ordo_testkit::bench::peak_rss_bytes(pid);
    let per_k = 1000.0 / events.max(1) as f64;
    json!({
        "pid": pid,
        "cpu_seconds": cpu,
        "cpu_ms_per_1000_events": cpu.map(|c| c * 1000.0 * per_k),
        "peak_rss_mib": rss.map(|r| r as f64 / 1048576.0),
        "peak_rss_kib_per_1000_events": rss.map(|r| r as f64 / 1024.0 * per_k),
        "amqp_connections": connections,
    })
}

// ---------------------------------------------------------------------------------------------
// Latency of every event, insert → read model

/// Insert time (Unix ms) of every event, by aggregate, in eventId order.
type InsertTimes = Arc<Mutex<HashMap<String, Vec<i64>>>>;

/// Inserts `batch`, recording each event's insert time.
async fn insert_timed(
    coll: &Collection<Document>,
    batch: Vec<Document>,
    times: &InsertTimes,
) -> anyhow::Result<usize> {
    let n = batch.len();
    let now = DateTime::now().timestamp_millis();
    {
        let mut t = times.lock().unwrap_or_else(|e| e.into_inner());
        for d in &batch {
            let id = d.get_str("aggregateId").unwrap_or_default().to_string();
            t.entry(id).or_default().push(now);
        }
    }
    insert(coll, batch).await?;
    Ok(n)
}

fn bson_i64(v: Option<&Bson>) -> Option<i64> {
    match v? {
        Bson::Int64(v) => Some(*v),
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Double(v) => Some(*v as i64),
        _ => None,
    }
}

/// Watches ordo's read-model collections: every write carries the model's new `lastEventId`
/// and the projector's `lastUpdatedAt`, so each event between the previous and the new version
/// reached the read model at that time. Collects those latencies (seconds) until stopped.
struct ReadModelWatch {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    latencies: Arc<Mutex<Vec<f64>>>,
}

impl ReadModelWatch {
    async fn start(stack: &Stack, times: InsertTimes) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let versions: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
        let mut tasks = Vec::new();
        for p in stack.projections()? {
            let coll = stack.db().collection::<Document>(p.collection());
            let mut stream = coll
                .watch()
                .max_await_time(Duration::from_millis(100))
                .await?;
            let (stop, latencies, versions, times) = (
                stop.clone(),
                latencies.clone(),
                versions.clone(),
                times.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let change: ChangeStreamEvent<Document> =
                        match tokio::time::timeout(Duration::from_millis(250), stream.next()).await
                        {
                            Err(_) => continue,
                            Ok(None) => return Ok(()),
                            Ok(Some(c)) => c?,
                        };
                    let fields = match change.operation_type {
                        OperationType::Update => {
                            change.update_description.map(|u| u.updated_fields)
                        }
                        OperationType::Insert | OperationType::Replace => change.full_document,
                        _ => None,
                    };
                    let (Some(fields), Some(key)) = (fields, change.document_key) else {
                        continue;
                    };
                    let (Some(v), Ok(at)) = (
                        bson_i64(fields.get("lastEventId")),
                        fields.get_datetime("lastUpdatedAt"),
                    ) else {
                        continue;
                    };
                    let id = key.get_str("_id").unwrap_or_default().to_string();
                    let prev = {
                        let mut vs = versions.lock().unwrap_or_else(|e| e.into_inner());
                        let e = vs.entry(id.clone()).or_insert(0);
                        let prev = *e;
                        *e = (*e).max(v);
                        prev
                    };
                    if v <= prev {
                        continue;
                    }
                    let t = times.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(inserted) = t.get(&id) {
                        let mut l = latencies.lock().unwrap_or_else(|e| e.into_inner());
                        for k in prev..v.min(inserted.len() as i64) {
                            l.push(
                                (at.timestamp_millis() - inserted[k as usize]).max(0) as f64
                                    / 1000.0,
                            );
                        }
                    }
                }
                Ok(())
            }));
        }
        Ok(Self {
            stop,
            tasks,
            latencies,
        })
    }

    async fn finish(self) -> anyhow::Result<Vec<f64>> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await??;
        }
        let l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        Ok(l.clone())
    }
}

fn latency_json(lat: &mut [f64], censored: usize) -> Value {
    json!({
        "samples": lat.len(),
        "p50": percentile(lat, 0.5),
        "p95": percentile(lat, 0.95),
        "p99": percentile(lat, 0.99),
        "max": percentile(lat, 1.0),
        "censored": censored,
    })
}

// ---------------------------------------------------------------------------------------------
// ordo

struct Load {
    workload: Workload,
    /// Events/s for the steady shape; None for a burst.
    rate: Option<f64>,
    secs: u64,
}

fn load_for(args: &Args, shape: Shape, rate: Option<f64>) -> Load {
    match shape {
        Shape::Hot => Load {
            workload: split(args.hot_aggregates, args.hot_events_per_aggregate, 1),
            rate: None,
            secs: 0,
        },
        Shape::Churn => Load {
            workload: split(args.churn_aggregates, args.churn_events_per_aggregate, 2),
            rate: None,
            secs: 0,
        },
        Shape::Steady => {
            let r = rate.unwrap_or(1.0).max(1.0);
            let per = ((r * args.steady_secs as f64) / args.steady_aggregates.max(1) as f64).ceil()
                as usize
                + 1;
            Load {
                workload: split(args.steady_aggregates, per, 3),
                rate: Some(r),
                secs: args.steady_secs,
            }
        }
    }
}

/// Writes the load into `coll`: a burst in batches of 500, or paced by the clock at `rate`
/// for `secs` (at most `limit` events). Returns the events written and when the last was.
async fn write_load(
    coll: &Collection<Document>,
    load: &Load,
    limit: usize,
    translate: bool,
    times: &InsertTimes,
) -> anyhow::Result<(usize, Instant)> {
    let mut g = Generator::new(load.workload, "");
    let total = load.workload.total_events().min(limit);
    let mut written = 0;
    let started = Instant::now();
    match load.rate {
        None => {
            while written < total {
                let mut batch = g.next_batch(500.min(total - written));
                if batch.is_empty() {
                    break;
                }
                if translate {
                    batch.iter_mut().for_each(to_seed_vocabulary);
                }
                written += insert_timed(coll, batch, times).await?;
            }
        }
        Some(rate) => {
            let end = Duration::from_secs(load.secs);
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while started.elapsed() < end && written < total {
                tick.tick().await;
                let due = ((started.elapsed().as_secs_f64() * rate) as usize).min(total);
                if due > written {
                    let mut batch = g.next_batch(due - written);
                    if batch.is_empty() {
                        break;
                    }
                    if translate {
                        batch.iter_mut().for_each(to_seed_vocabulary);
                    }
                    written += insert_timed(coll, batch, times).await?;
                }
            }
        }
    }
    Ok((written, Instant::now()))
}

struct RowResult {
    json: Value,
    events_per_s: f64,
    p99: Option<f64>,
}

async fn run_ordo(
    stack: &mut Stack,
    args: &Args,
    load: &Load,
    ceilings: &MongoCeilings,
) -> anyhow::Result<RowResult> {
    stack.start_at = "now".into();
    stack.spawn_producer().await?;
    for slot in 0..args.projectors {
        stack.spawn_projector(slot).await?;
    }
    let broker = stack.bus.emulator()?.address();
    let mut pids: Vec<(String, u32)> = Vec::new();
    if let Some(p) = &stack.producer {
        pids.push(("ordo-producer".into(), p.pid()));
    }
    for (i, p) in stack.projectors.iter().flatten().enumerate() {
        pids.push((format!("ordo-projector-{}", i + 1), p.pid()));
    }
    let sampler = ConnectionSampler::start(pids.iter().map(|p| p.1).collect(), broker);
    let times: InsertTimes = Arc::default();
    let watch = ReadModelWatch::start(stack, times.clone()).await?;
    let events = stack.db().collection::<Document>("events");
    let started = Instant::now();
    let write = write_load(&events, load, usize::MAX, false, &times);
    let (written, write_done) = write.await?;
    // From the last write: on a slow stand-in the writes alone can take longer than the limit.
    let deadline = write_done + Duration::from_secs(args.max_row_secs);
    // Burst rows wait until every event is applied; the steady row waits for the tail.
    let mut applied;
    let mut complete = false;
    loop {
        stack.check_alive()?;
        applied = stack.metric(metrics::EVENTS_APPLIED).await as usize;
        if applied >= written {
            let (done, aggregates) = stack.caught_up().await?;
            if done == aggregates {
                complete = true;
                break;
            }
        }
        if Instant::now() > deadline {
            eprintln!(
                "bench: stopped waiting {}s after the last write: {applied}/{written} applied",
                args.max_row_secs
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let connections = sampler.finish().await;
    let published = stack.metric(metrics::EVENTS_PUBLISHED).await;
    let duplicates = stack.metric(metrics::DUPLICATES).await;
    let mut lat = watch.finish().await?;
    let missing = applied.min(written).saturating_sub(lat.len());
    let aggregates = times.lock().unwrap_or_else(|e| e.into_inner()).len();
    let mut processes = BTreeMap::new();
    for (name, pid) in &pids {
        processes.insert(
            name.clone(),
            process_json(*pid, applied.max(1), connections.get(pid).copied()),
        );
    }
    let producer_cpu = pids
        .first()
        .and_then(|(_, pid)| ordo_testkit::bench::cpu_seconds(*pid))
        .map(|c| c / written.max(1) as f64);
    let verified = if complete && load.rate.is_none() {
        let v = stack.verify().await?;
        if !v.ok() {
            bail!(
                "{} read models differ from the fold: {:?}",
                v.mismatches.len(),
                v.mismatches.first()
            );
        }
        Some(true)
    } else {
        None
    };
    // The projectors' own histogram (bucket upper bounds): a cross-check of the watched
    // latencies that needs no change stream.
    let mut texts = Vec::new();
    for d in stack.projectors.iter().flatten() {
        if let Ok((200, text)) = d.http_get("/metrics").await {
            texts.push(text);
        }
    }
    let joined = texts.join("\n");
    let q = |x| ordo_e2e::prom::histogram_quantile(&joined, metrics::END_TO_END_LAG, x);
    let histogram = json!({"p50_at_most": q(0.5), "p95_at_most": q(0.95), "p99_at_most": q(0.99)});
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

// ---------------------------------------------------------------------------------------------
// The seed design

/// The seed consumer projects `UserRegisteredEvent` (payload `name`, `email`) and
/// `UserEmailUpdatedEvent` (payload `newEmail`); the same user events under those names. Every
/// other event it receives and completes without a write, which flatters it.
fn to_seed_vocabulary(d: &mut Document) {
    match d.get_str("eventType").unwrap_or_default() {
        "UserRegistered" => {
            d.insert("eventType", "UserRegisteredEvent");
        }
        "UserEmailUpdated" => {
            d.insert("eventType", "UserEmailUpdatedEvent");
            let email = d
                .get_document("payload")
                .ok()
                .and_then(|p| p.get_str("email").ok())
                .unwrap_or_default()
                .to_string();
            d.insert("payload", doc! {"newEmail": email});
        }
        _ => {}
    }
}

fn uri_with_db(uri: &str, db: &str) -> String {
    let (base, query) = match uri.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (uri, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{db}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

struct NodeProcess {
    child: tokio::process::Child,
    log: PathBuf,
}

impl NodeProcess {
    fn spawn(
        dir: &Path,
        script: &str,
        env: &[(&str, String)],
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let out = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new("node")
            .arg(script)
            .current_dir(dir)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting node {script} in {}", dir.display()))?;
        Ok(Self { child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    async fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited ({status}): {text}", self.log.display());
            }
            if Instant::now() > deadline {
                bail!(
                    "no {needle:?} from {} within {timeout:?}: {text}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Per session of `entity`, its active messages.
fn session_counts(bus: &TestServiceBus, entity: &str) -> anyhow::Result<HashMap<String, usize>> {
    let stats = bus.emulator()?.stats();
    Ok(stats
        .entity(entity)
        .map(|e| {
            e.sessions
                .iter()
                .map(|s| (s.id.clone(), s.active))
                .collect()
        })
        .unwrap_or_default())
}

async fn run_seed(
    stack: &Stack,
    args: &Args,
    load: &Load,
    round_trip: Duration,
) -> anyhow::Result<RowResult> {
    let dir = std::fs::canonicalize(&args.seed_dir)
        .with_context(|| format!("seed design directory {}", args.seed_dir.display()))?;
    anyhow::ensure!(
        dir.join("node_modules/@azure/service-bus").exists(),
        "run `npm ci` in {} first",
        dir.display()
    );
    let mut cfg = emulator_config(Duration::from_secs(30));
    cfg.namespace.round_trip = round_trip;
    let mut tap: SubscriptionConfig = cfg.topics[0].subscriptions[0].clone();
    tap.name = TAP_SUBSCRIPTION.into();
    cfg.topics[0].subscriptions.push(tap);
    let bus = TestServiceBus::start_with(cfg).await?;
    let broker = bus.emulator()?.address();
    let sub_path = format!("{}/Subscriptions/{}", bus.topic(), bus.subscription());
    let tap_path = format!("{}/Subscriptions/{TAP_SUBSCRIPTION}", bus.topic());
    let db_name = ordo_testkit::mongo::unique_db_name();
    let env = vec![
        ("MONGODB_URI", uri_with_db(stack.mongo.uri(), &db_name)),
        (
            "AZURE_SERVICEBUS_CONNECTION_STRING",
            bus.connection_string().to_string(),
        ),
        ("AZURE_SERVICEBUS_TOPIC_NAME", bus.topic().to_string()),
        (
            "AZURE_SERVICEBUS_SUBSCRIPTION_NAME",
            bus.subscription().to_string(),
        ),
        ("READ_MODEL_COLLECTION", "readModelCollection".to_string()),
    ];
    let logs = tempfile::tempdir()?;
    let mut producer =
        NodeProcess::spawn(&dir, "producer.js", &env, logs.path().join("producer.log"))?;
    producer
        .wait_for_line("seed producer started", Duration::from_secs(60))
        .await?;
    let events = stack
        .mongo
        .client()
        .database(&db_name)
        .collection::<Document>("events");
    // The Node driver opens the change stream on first iteration, after its start line: probe
    // events go in until one reaches the topic, so no measured event is written before it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut probes = 0i64;
    loop {
        probes += 1;
        events
            .insert_one(doc! {"aggregateId": "bench-probe", "aggregateType": "Probe", "eventId": probes, "eventType": "Probe", "payload": {}, "timestamp": DateTime::now()})
            .await?;
        let seen = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                if session_counts(&bus, &tap_path)
                    .map(|c| c.contains_key("bench-probe"))
                    .unwrap_or(false)
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if seen.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the seed producer published no probe event within 60s");
        }
    }
    let mut consumers = Vec::new();
    for i in 0..args.projectors.max(1) {
        let mut c = NodeProcess::spawn(
            &dir,
            "consumer.js",
            &env,
            logs.path().join(format!("consumer-{i}.log")),
        )?;
        c.wait_for_line("seed consumer started", Duration::from_secs(60))
            .await?;
        consumers.push(c);
    }
    let mut pids = vec![("seed-producer".to_string(), producer.pid())];
    for (i, c) in consumers.iter().enumerate() {
        pids.push((format!("seed-consumer-{}", i + 1), c.pid()));
    }
    let sampler = ConnectionSampler::start(pids.iter().map(|p| p.1).collect(), broker);
    let times: InsertTimes = Arc::default();
    let started = Instant::now();
    let window = Duration::from_secs(args.seed_secs);
    let now_ms = || DateTime::now().timestamp_millis();
    // Per aggregate, when each of its events was seen completed (Unix ms, as the insert times).
    let mut done_at: HashMap<String, Vec<i64>> = HashMap::new();
    // The same shape at the scale the seed can finish in its window: proportionally fewer
    // aggregates with the same events each; the steady shape keeps its aggregates and pace and
    // stops after `seed_events`.
    let mut seed_load = Load {
        workload: load.workload,
        rate: load.rate,
        secs: load.secs,
    };
    if load.rate.is_none() {
        let per = load.workload.events_per_aggregate.max(1);
        seed_load.workload = split((args.seed_events / per).max(1), per, load.workload.seed);
    }
    {
        let write = write_load(&events, &seed_load, args.seed_events, true, &times);
        tokio::pin!(write);
        let mut written = false;
        let mut poll = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                r = &mut write, if !written => { r?; written = true; }
                _ = poll.tick() => {
                    let tap = session_counts(&bus, &tap_path)?;
                    let sub = session_counts(&bus, &sub_path)?;
                    let now = now_ms();
                    let t = times.lock().unwrap_or_else(|e| e.into_inner());
                    let mut all = written;
                    for (id, inserted) in t.iter() {
                        let published = tap.get(id).copied().unwrap_or(0);
                        let completed = published.saturating_sub(sub.get(id).copied().unwrap_or(0));
                        let d = done_at.entry(id.clone()).or_default();
                        while d.len() < completed.min(inserted.len()) {
                            d.push(now);
                        }
                        all &= d.len() >= inserted.len();
                    }
                    if all || started.elapsed() > window {
                        break;
                    }
                }
            }
        }
    }
    let end_ms = now_ms();
    let connections = sampler.finish().await;
    let times = times.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let first_ms = times.values().flatten().copied().min().unwrap_or(end_ms);
    let written: usize = times.values().map(Vec::len).sum();
    let mut lat = Vec::new();
    let mut censored = 0;
    let mut completed = 0;
    let mut last_done = first_ms;
    for (id, inserted) in &times {
        let d = done_at.get(id).map(Vec::as_slice).unwrap_or(&[]);
        for (k, ins) in inserted.iter().enumerate() {
            match d.get(k) {
                Some(t) => {
                    completed += 1;
                    last_done = last_done.max(*t);
                    lat.push((t - ins).max(0) as f64 / 1000.0);
                }
                None => {
                    censored += 1;
                    lat.push((end_ms - ins).max(0) as f64 / 1000.0);
                }
            }
        }
    }
    let secs = if censored == 0 {
        (last_done - first_ms) as f64 / 1000.0
    } else {
        (end_ms - first_ms) as f64 / 1000.0
    };
    let mut processes = BTreeMap::new();
    for (name, pid) in &pids {
        processes.insert(
            name.clone(),
            process_json(*pid, completed.max(1), connections.get(pid).copied()),
        );
    }
    let events_per_s = completed as f64 / secs.max(1e-3);
    let p99 = percentile(&mut lat, 0.99);
    drop(consumers);
    drop(producer);
    let json = json!({
        "events": written,
        "applied": completed,
        "complete": censored == 0,
        "seconds": secs,
        "events_per_s": events_per_s,
        "sessions_per_s": done_at.values().filter(|d| !d.is_empty()).count() as f64 / secs.max(1e-3),
        "latency_seconds": latency_json(&mut lat, censored),
        "latency_measured_as": "insert → the seed consumer's completion on the broker (after its write), polled every 200 ms; an event not applied within the window counts with the time it waited (a lower bound, counted in `censored`)",
        "processes": processes,
    });
    Ok(RowResult {
        json,
        events_per_s,
        p99,
    })
}

// ---------------------------------------------------------------------------------------------
// The run

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

fn fmt_opt(v: Option<f64>, scale: f64, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{:.*}", digits, v * scale))
}

async fn run(args: Args, mongo_kind: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let run_started = Instant::now();
    let mut mongo_ceilings: Option<MongoCeilings> = None;
    let mut send_ceilings: BTreeMap<u64, f64> = BTreeMap::new();
    let mut rows: Vec<Value> = Vec::new();
    let mut hot_rate: BTreeMap<u64, f64> = BTreeMap::new();
    let mut bars: Vec<Bar> = Vec::new();
    for &rt_ms in &args.round_trip_ms {
        let round_trip = Duration::from_millis(rt_ms);
        for &shape in &args.shapes {
            let rate = match shape {
                Shape::Steady => Some(
                    hot_rate
                        .get(&rt_ms)
                        .map(|r| r * args.steady_fraction)
                        .or(args.steady_rate)
                        .context(
                            "the steady shape needs the hot shape in the same run or --steady-rate",
                        )?,
                ),
                _ => None,
            };
            let load = load_for(&args, shape, rate);
            let label = if rt_ms == 0 {
                shape.name().to_string()
            } else {
                format!("{} +{rt_ms}ms", shape.name())
            };
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
            if mongo_ceilings.is_none() {
                let (insert, change_stream, reader) =
                    change_stream_ceiling(&stack, args.ceiling_events).await?;
                let guarded_updates = guarded_update_ceiling(&stack).await?;
                let c = MongoCeilings {
                    insert,
                    change_stream,
                    guarded_updates,
                    reader_cpu_per_event: reader,
                };
                eprintln!("bench: ceilings: insert {insert:.0}/s, change stream {change_stream:.0}/s, guarded updates {guarded_updates:.0}/s, bare reader {:.3} CPU ms/event", reader * 1000.0);
                mongo_ceilings = Some(c);
            }
            if let std::collections::btree_map::Entry::Vacant(e) = send_ceilings.entry(rt_ms) {
                let s = send_ceiling(&stack.bus, args.ceiling_events, args.senders).await?;
                eprintln!("bench: batched send ceiling at {rt_ms} ms round trip: {s:.0}/s");
                e.insert(s);
            }
            let ceilings = mongo_ceilings.unwrap_or_default();
            let send = send_ceilings.get(&rt_ms).copied().unwrap_or(f64::NAN);
            let ordo = run_ordo(&mut stack, &args, &load, &ceilings).await?;
            if shape == Shape::Hot {
                hot_rate.insert(rt_ms, ordo.events_per_s);
            }
            let seed = if args.no_seed {
                None
            } else {
                Some(run_seed(&stack, &args, &load, round_trip).await?)
            };
            drop(stack);
            let seed_rate = seed.as_ref().map(|s| s.events_per_s);
            let row = json!({
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
                "seed": seed.as_ref().map(|s| s.json.clone()),
                "ceilings": {
                    "insert_events_per_s": ceilings.insert,
                    "change_stream_events_per_s": ceilings.change_stream,
                    "guarded_updates_per_s": ceilings.guarded_updates,
                    "batched_sends_messages_per_s": send,
                },
                "ratios": {
                    "events_per_s_vs_seed": seed_rate.map(|s| ordo.events_per_s / s),
                    "p99_seed_over_ordo": seed.as_ref().and_then(|s| Some(s.p99? / ordo.p99?)),
                    "vs_guarded_update_ceiling": ordo.events_per_s / ceilings.guarded_updates,
                    "vs_change_stream_ceiling": ordo.events_per_s / ceilings.change_stream,
                    "vs_batched_send_ceiling": ordo.events_per_s / send,
                },
            });
            print_row(&row);
            bars.push((
                label,
                Some(ordo.events_per_s),
                seed_rate,
                ordo.p99,
                seed.as_ref().and_then(|s| s.p99),
            ));
            rows.push(row);
            // Written after every row, so a run cut short still leaves what it measured.
            write_outputs(
                &args,
                mongo_kind,
                &mongo_ceilings,
                &send_ceilings,
                &rows,
                &bars,
            )?;
        }
    }
    eprintln!(
        "bench: done in {:.0}s; wrote {}/summary.json and chart.svg",
        run_started.elapsed().as_secs_f64(),
        args.out.display()
    );
    println!();
    print_table(&rows);
    Ok(())
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

fn print_row(row: &Value) {
    eprintln!("bench: {}", serde_json::to_string(row).unwrap_or_default());
}

fn print_table(rows: &[Value]) {
    println!(
        "{:<14} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6}",
        "row", "ordo/s", "seed/s", "×seed", "sess/s", "p50 ms", "p95 ms", "p99 ms", "seed p99", "prodCPU", "projCPU", "RSS", "conns", "×guard", "prod×rd"
    );
    for r in rows {
        println!(
            "{:<14} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6}",
            r["row"].as_str().unwrap_or(""),
            fmt_opt(get_f(r, &["ordo", "events_per_s"]), 1.0, 0),
            fmt_opt(get_f(r, &["seed", "events_per_s"]), 1.0, 1),
            fmt_opt(get_f(r, &["ratios", "events_per_s_vs_seed"]), 1.0, 0),
            fmt_opt(get_f(r, &["ordo", "sessions_per_s"]), 1.0, 0),
            fmt_opt(get_f(r, &["ordo", "latency_seconds", "p50"]), 1000.0, 0),
            fmt_opt(get_f(r, &["ordo", "latency_seconds", "p95"]), 1000.0, 0),
            fmt_opt(get_f(r, &["ordo", "latency_seconds", "p99"]), 1000.0, 0),
            fmt_opt(get_f(r, &["seed", "latency_seconds", "p99"]), 1000.0, 0),
            fmt_opt(max_over_processes(r, "ordo", "cpu_ms_per_1000_events", "ordo-producer"), 1.0, 0),
            fmt_opt(max_over_processes(r, "ordo", "cpu_ms_per_1000_events", "ordo-projector"), 1.0, 0),
            fmt_opt(max_over_processes(r, "ordo", "peak_rss_mib", "ordo"), 1.0, 0),
            fmt_opt(max_over_processes(r, "ordo", "amqp_connections", "ordo"), 1.0, 0),
            fmt_opt(get_f(r, &["ratios", "vs_guarded_update_ceiling"]), 1.0, 2),
            fmt_opt(get_f(r, &["ordo", "producer_cpu_vs_bare_reader"]), 1.0, 1),
        );
    }
    println!("(ordo/s, seed/s: events applied per second; ×seed: ordo/seed; p50-p99: insert → read model, ordo; prodCPU/projCPU: CPU ms per 1,000 events, producer / busiest projector; RSS: largest peak MiB of an ordo process; conns: most AMQP connections of an ordo process; ×guard: ordo/guarded-update ceiling; prod×rd: producer CPU per event / bare change-stream reader's)");
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
            out.push(json!({"goal": format!("steady p99 < {:.0} ms ({rt} ms round trip)", limit * 1000.0), "value": p99, "met": p99.map(|p| p < limit)}));
        }
        if let Some(h) = find("hot", rt) {
            let r = get_f(h, &["ratios", "vs_guarded_update_ceiling"]);
            out.push(json!({"goal": format!("hot ≥ 70 % of the guarded-write ceiling ({rt} ms round trip)"), "value": r, "met": r.map(|r| r >= 0.7)}));
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

type Bar = (String, Option<f64>, Option<f64>, Option<f64>, Option<f64>);

fn write_outputs(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_this_process_established_connections_to_the_broker() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let broker = listener.local_addr().unwrap();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let pid = std::process::id();
        assert_eq!(amqp_connections(pid, broker), Some(0));
        let a = std::net::TcpStream::connect(broker).unwrap();
        let b = std::net::TcpStream::connect(broker).unwrap();
        let _elsewhere = std::net::TcpStream::connect(other.local_addr().unwrap()).unwrap();
        let (_sa, _) = listener.accept().unwrap();
        let (_sb, _) = listener.accept().unwrap();
        // The accepted ends are this process's too, but their remote is the client's port.
        assert_eq!(amqp_connections(pid, broker), Some(2));
        drop((a, b));
        assert_eq!(amqp_connections(u32::MAX, broker), None);
    }

    #[test]
    fn seed_uri_names_the_database_and_keeps_the_options() {
        assert_eq!(
            uri_with_db("mongodb://127.0.0.1:27017/?directConnection=true", "s1"),
            "mongodb://127.0.0.1:27017/s1?directConnection=true"
        );
        assert_eq!(uri_with_db("mongodb://h:1/old", "s2"), "mongodb://h:1/s2");
        assert_eq!(uri_with_db("mongodb://h:1", "s3"), "mongodb://h:1/s3");
    }

    #[test]
    fn seed_events_use_the_names_the_seed_consumer_projects() {
        let mut d = doc! {"eventType": "UserEmailUpdated", "payload": {"email": "a@b"}};
        to_seed_vocabulary(&mut d);
        assert_eq!(
            d,
            doc! {"eventType": "UserEmailUpdatedEvent", "payload": {"newEmail": "a@b"}}
        );
        let mut r = doc! {"eventType": "UserRegistered", "payload": {"email": "a@b", "name": "A"}};
        to_seed_vocabulary(&mut r);
        assert_eq!(r.get_str("eventType").unwrap(), "UserRegisteredEvent");
        assert_eq!(
            r.get_document("payload").unwrap(),
            &doc! {"email": "a@b", "name": "A"}
        );
        let mut o = doc! {"eventType": "OrderCreated", "payload": {"currency": "EUR"}};
        to_seed_vocabulary(&mut o);
        assert_eq!(o.get_str("eventType").unwrap(), "OrderCreated");
    }
}
