//! One row through the seed design it replaces (`bench/seed-baseline`, Node with Microsoft's
//! SDK): its producer and consumers on a broker of their own, measured by what its consumers
//! complete on the broker within a bounded window.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mongodb::bson::{doc, DateTime, Document};
use mongodb::Collection;
use ordo_e2e::stack::{emulator_config, Stack, TestServiceBus};
use ordo_e2e::stats::percentile;
use ordo_servicebus_emulator::SubscriptionConfig;
use serde_json::json;

use crate::latency::{latency_json, InsertTimes};
use crate::load::{write_load, Load};
use crate::node::{uri_with_db, NodeProcess};
use crate::processes::{processes_json, ConnectionSampler};
use crate::{split, Args, RowResult, TAP_SUBSCRIPTION};

/// The seed consumer projects `UserRegisteredEvent` (payload `name`, `email`) and
/// `UserEmailUpdatedEvent` (payload `newEmail`); the same user events under those names. Every
/// other event it receives and completes without a write, which flatters it.
pub(crate) fn to_seed_vocabulary(d: &mut Document) {
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

pub(crate) async fn run_seed(
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
    let bus = SeedBus::start(round_trip).await?;
    let broker = bus.bus.emulator()?.address();
    let db_name = ordo_testkit::mongo::unique_db_name();
    let env = bus.env(&uri_with_db(stack.mongo.uri(), &db_name));
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
    bus.wait_for_first_publish(&events).await?;
    let consumers = start_consumers(&dir, &env, logs.path(), args.projectors.max(1)).await?;
    let mut pids = vec![("seed-producer".to_string(), producer.pid())];
    for (i, c) in consumers.iter().enumerate() {
        pids.push((format!("seed-consumer-{}", i + 1), c.pid()));
    }
    let sampler = ConnectionSampler::start(pids.iter().map(|p| p.1).collect(), broker);
    let times: InsertTimes = Arc::default();
    let started = Instant::now();
    let done_at = bus
        .write_and_track(&events, args, load, &times, started)
        .await?;
    let end_ms = DateTime::now().timestamp_millis();
    let connections = sampler.finish().await;
    let times = times.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let written: usize = times.values().map(Vec::len).sum();
    let Outcome {
        mut latencies,
        censored,
        completed,
        secs,
    } = Outcome::of(&times, &done_at, end_ms);
    let processes = processes_json(&pids, &connections, completed.max(1));
    let events_per_s = completed as f64 / secs.max(1e-3);
    let p99 = percentile(&mut latencies, 0.99);
    drop(consumers);
    drop(producer);
    let json = json!({
        "events": written,
        "applied": completed,
        "complete": censored == 0,
        "seconds": secs,
        "events_per_s": events_per_s,
        "sessions_per_s": done_at.values().filter(|d| !d.is_empty()).count() as f64 / secs.max(1e-3),
        "latency_seconds": latency_json(&mut latencies, censored),
        "latency_measured_as": "insert → the seed consumer's completion on the broker (after its write), polled every 200 ms; an event not applied within the window counts with the time it waited (a lower bound, counted in `censored`)",
        "processes": processes,
    });
    Ok(RowResult {
        json,
        events_per_s,
        p99,
    })
}

/// The same shape at the scale the seed can finish in its window: proportionally fewer
/// aggregates with the same events each; the steady shape keeps its aggregates and pace and
/// stops after `seed_events`.
fn seed_load(args: &Args, load: &Load) -> Load {
    let mut seed_load = Load {
        workload: load.workload,
        rate: load.rate,
        secs: load.secs,
        padding: load.padding,
    };
    if load.rate.is_none() {
        let per = load.workload.events_per_aggregate.max(1);
        seed_load.workload = split((args.seed_events / per).max(1), per, load.workload.seed);
    }
    seed_load
}

/// Starts `n` seed consumers and waits for each one's start line.
async fn start_consumers(
    dir: &Path,
    env: &[(&str, String)],
    logs: &Path,
    n: usize,
) -> anyhow::Result<Vec<NodeProcess>> {
    let mut consumers = Vec::new();
    for i in 0..n {
        let mut c = NodeProcess::spawn(
            dir,
            "consumer.js",
            env,
            logs.join(format!("consumer-{i}.log")),
        )?;
        c.wait_for_line("seed consumer started", Duration::from_secs(60))
            .await?;
        consumers.push(c);
    }
    Ok(consumers)
}

/// The seed design's broker: its topic with a tap subscription nobody receives from.
struct SeedBus {
    bus: TestServiceBus,
    /// The subscription the seed consumers receive from.
    sub_path: String,
    /// [`TAP_SUBSCRIPTION`]: per session, how many messages were published.
    tap_path: String,
}

impl SeedBus {
    async fn start(round_trip: Duration) -> anyhow::Result<Self> {
        let mut cfg = emulator_config(Duration::from_secs(30));
        cfg.namespace.round_trip = round_trip;
        let mut tap: SubscriptionConfig = cfg.topics[0].subscriptions[0].clone();
        tap.name = TAP_SUBSCRIPTION.into();
        cfg.topics[0].subscriptions.push(tap);
        let bus = TestServiceBus::start_with(cfg).await?;
        let sub_path = format!("{}/Subscriptions/{}", bus.topic(), bus.subscription());
        let tap_path = format!("{}/Subscriptions/{TAP_SUBSCRIPTION}", bus.topic());
        Ok(Self {
            bus,
            sub_path,
            tap_path,
        })
    }

    /// The seed processes' environment.
    fn env(&self, mongo_uri: &str) -> Vec<(&'static str, String)> {
        let bus = &self.bus;
        vec![
            ("MONGODB_URI", mongo_uri.to_string()),
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
        ]
    }

    /// The Node driver opens the change stream on first iteration, after its start line: probe
    /// events go in until one reaches the topic, so no measured event is written before it.
    async fn wait_for_first_publish(&self, events: &Collection<Document>) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut probes = 0i64;
        loop {
            probes += 1;
            events
                .insert_one(doc! {"aggregateId": "bench-probe", "aggregateType": "Probe", "eventId": probes, "eventType": "Probe", "payload": {}, "timestamp": DateTime::now()})
                .await?;
            let seen = tokio::time::timeout(Duration::from_secs(1), async {
                loop {
                    if self
                        .session_counts(&self.tap_path)
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
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the seed producer published no probe event within 60s");
            }
        }
    }

    /// Writes the seed's load and polls the broker every 200 ms until every event is completed
    /// or `seed_secs` from `started` are over. Returns, per aggregate, when each of its events
    /// was seen completed (Unix ms, as the insert times).
    async fn write_and_track(
        &self,
        events: &Collection<Document>,
        args: &Args,
        load: &Load,
        times: &InsertTimes,
        started: Instant,
    ) -> anyhow::Result<HashMap<String, Vec<i64>>> {
        let window = Duration::from_secs(args.seed_secs);
        let mut done_at: HashMap<String, Vec<i64>> = HashMap::new();
        let seed_load = seed_load(args, load);
        let write = write_load(events, &seed_load, args.seed_events, true, times);
        tokio::pin!(write);
        let mut written = false;
        let mut poll = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                r = &mut write, if !written => { r?; written = true; }
                _ = poll.tick() => {
                    let all = self.record_completions(times, &mut done_at, written)?;
                    if all || started.elapsed() > window {
                        break;
                    }
                }
            }
        }
        Ok(done_at)
    }

    /// Per session of `entity`, its active messages.
    fn session_counts(&self, entity: &str) -> anyhow::Result<HashMap<String, usize>> {
        let stats = self.bus.emulator()?.stats();
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

    /// Notes, per aggregate, when each of its events is first seen completed (published on the
    /// tap minus still active on the consumers' subscription); true once the load is `written`
    /// and every inserted event is completed.
    fn record_completions(
        &self,
        times: &InsertTimes,
        done_at: &mut HashMap<String, Vec<i64>>,
        written: bool,
    ) -> anyhow::Result<bool> {
        let tap = self.session_counts(&self.tap_path)?;
        let sub = self.session_counts(&self.sub_path)?;
        let now = DateTime::now().timestamp_millis();
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
        Ok(all)
    }
}

/// The seed's events at the end of its window: a latency for each, censored when it was not
/// completed (then the time it waited, a lower bound).
struct Outcome {
    latencies: Vec<f64>,
    censored: usize,
    completed: usize,
    /// From the first insert to the last completion, or to the end of the window when some
    /// event was not completed.
    secs: f64,
}

impl Outcome {
    fn of(
        times: &HashMap<String, Vec<i64>>,
        done_at: &HashMap<String, Vec<i64>>,
        end_ms: i64,
    ) -> Self {
        let first_ms = times.values().flatten().copied().min().unwrap_or(end_ms);
        let mut latencies = Vec::new();
        let mut censored = 0;
        let mut completed = 0;
        let mut last_done = first_ms;
        for (id, inserted) in times {
            let d = done_at.get(id).map(Vec::as_slice).unwrap_or(&[]);
            for (k, ins) in inserted.iter().enumerate() {
                match d.get(k) {
                    Some(t) => {
                        completed += 1;
                        last_done = last_done.max(*t);
                        latencies.push((t - ins).max(0) as f64 / 1000.0);
                    }
                    None => {
                        censored += 1;
                        latencies.push((end_ms - ins).max(0) as f64 / 1000.0);
                    }
                }
            }
        }
        let secs = if censored == 0 {
            (last_done - first_ms) as f64 / 1000.0
        } else {
            (end_ms - first_ms) as f64 / 1000.0
        };
        Self {
            latencies,
            censored,
            completed,
            secs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
