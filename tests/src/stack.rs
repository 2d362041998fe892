//! A whole ordo deployment on one machine: the stand-ins (or real services), one producer and
//! any number of projectors as real processes, and the check that matters in the end: every
//! read model equals the fold of the events collection.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::Database;
use ordo_core::envelope::{Envelope, EventFields};
use ordo_projection::event_version;
use ordo_projection::{
    fold_history, DeclarativeProjection, HistoryError, Projection, ProjectionsFile, ReadModel,
};
use ordo_servicebus_emulator::EmulatorConfig;

use crate::sample::{insert, Generator, Workload};
use ordo_testkit::{
    bin_path, free_health_addr, paths::workspace_root, ConfigFile, Daemon, TestMongo,
};

pub use ordo_testkit::servicebus::TestServiceBus;

/// The deployment.
#[derive(Debug)]
pub struct Stack {
    /// MongoDB (SecantusDB unless a real URI is given).
    pub mongo: TestMongo,
    /// Service Bus (the emulator unless a real namespace is given).
    pub bus: TestServiceBus,
    /// The producer, when running.
    pub producer: Option<Daemon>,
    /// The projectors; `None` where one was killed and not restarted.
    pub projectors: Vec<Option<Daemon>>,
    /// The projections both the projectors and the verification use.
    pub projections_file: PathBuf,
    /// Producer `start_at`.
    pub start_at: String,
    /// Extra `[projector]` lines (tuning for tests).
    pub projector_extra: String,
    /// Extra `[producer]` lines.
    pub producer_extra: String,
    /// The producer's connection string when it is not the bus's (a key with fewer rights).
    pub producer_connection_string: Option<String>,
    /// The projectors' connection string when it is not the bus's.
    pub projector_connection_string: Option<String>,
    /// Extra environment of the producer.
    pub producer_env: Vec<(String, String)>,
    /// Extra environment of the projectors.
    pub projector_env: Vec<(String, String)>,
}

/// The outcome of [`Stack::verify`].
#[derive(Debug, Default)]
pub struct Verdict {
    /// Aggregates checked.
    pub aggregates: usize,
    /// Events folded.
    pub events: usize,
    /// Aggregates whose read model differs from the fold, with a description.
    pub mismatches: Vec<String>,
}

impl Verdict {
    /// True when every read model equals the fold.
    pub fn ok(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// The emulator configuration ordo's end-to-end runs use: the default entities with a short
/// session lock, so the sessions of a killed projector move on within seconds.
pub fn emulator_config(lock: Duration) -> EmulatorConfig {
    let mut cfg = EmulatorConfig::default_ordo();
    for t in &mut cfg.topics {
        for s in &mut t.subscriptions {
            s.lock_duration = lock;
        }
    }
    cfg
}

impl Stack {
    /// Starts the stand-ins (or connects to the services named by `ORDO_TEST_*`).
    pub async fn start(lock: Duration) -> anyhow::Result<Self> {
        Self::start_with(emulator_config(lock)).await
    }

    /// [`Stack::start`] with a given emulator configuration.
    pub async fn start_with(emulator: EmulatorConfig) -> anyhow::Result<Self> {
        let bus = TestServiceBus::start_with(emulator)
            .await
            .context("start Service Bus stand-in")?;
        Self::start_on(bus).await
    }

    /// [`Stack::start_with`] over TLS: the emulator serves AMQPS with a test CA's certificate,
    /// the daemons get the Azure-style connection string and trust the CA (`ca_file`).
    pub async fn start_tls(emulator: EmulatorConfig) -> anyhow::Result<Self> {
        let bus = TestServiceBus::start_tls(emulator)
            .await
            .context("start Service Bus stand-in with TLS")?;
        Self::start_on(bus).await
    }

    async fn start_on(bus: TestServiceBus) -> anyhow::Result<Self> {
        let mongo = TestMongo::start().await.context("start MongoDB stand-in")?;
        Ok(Self {
            mongo,
            bus,
            producer: None,
            projectors: Vec::new(),
            projections_file: workspace_root().join("config/projections.toml"),
            start_at: "beginning".into(),
            projector_extra: String::new(),
            producer_extra: String::new(),
            producer_connection_string: None,
            projector_connection_string: None,
            producer_env: Vec::new(),
            projector_env: Vec::new(),
        })
    }

    /// The database of the run.
    pub fn db(&self) -> Database {
        self.mongo.database()
    }

    /// The settings both daemons share, with `uri` for MongoDB and the daemon's own
    /// connection string (the test's key) when one is set.
    fn common(
        &self,
        health: SocketAddr,
        uri: &str,
        connection_string: &Option<String>,
    ) -> ConfigFile {
        let config = ConfigFile::new(
            uri,
            self.mongo.db_name(),
            connection_string
                .as_deref()
                .unwrap_or(self.bus.connection_string()),
            self.bus.topic(),
            health,
            "info",
        )
        .set("mongodb", "events_collection", "events")
        .set("servicebus", "subscription", self.bus.subscription())
        .set("telemetry", "log_format", "json");
        match self.bus.ca_file() {
            Some(path) => config.set("servicebus", "ca_file", path.display().to_string()),
            None => config,
        }
    }

    /// The producer's configuration file.
    pub fn producer_config(&self, health: SocketAddr) -> String {
        self.common(health, self.mongo.uri(), &self.producer_connection_string)
            .set("producer", "start_at", self.start_at.as_str())
            .overlay("producer", &self.producer_extra)
            .render()
    }

    /// A projector's configuration file, its MongoDB reached through `uri`.
    fn projector_config_with(&self, health: SocketAddr, uri: &str) -> String {
        self.common(health, uri, &self.projector_connection_string)
            .set(
                "projector",
                "projections_file",
                self.projections_file.display().to_string(),
            )
            .overlay("projector", &self.projector_extra)
            .render()
    }

    /// A projector's configuration file.
    pub fn projector_config(&self, health: SocketAddr) -> String {
        self.projector_config_with(health, self.mongo.uri())
    }

    /// Runs `ordo-projector <args>` (a one-shot subcommand such as `repair`) to completion with
    /// the projectors' configuration, its MongoDB connections named `app_name` (the URI's
    /// `appName`, which a `failCommand` fail point can single out); returns whether it exited 0
    /// and its output.
    pub async fn projector_command(
        &self,
        app_name: &str,
        args: &[&str],
    ) -> anyhow::Result<(bool, String)> {
        let health = free_health_addr();
        let uri = self.mongo.uri();
        let sep = if uri.contains('?') { '&' } else { '?' };
        let config = self.projector_config_with(health, &format!("{uri}{sep}appName={app_name}"));
        let mut d =
            Daemon::spawn_with_args(&bin_path("ordo-projector"), &config, health, &[], args)?;
        let status = d.wait_exit(Duration::from_secs(120)).await?;
        Ok((status.success(), d.logs()))
    }

    /// Starts the producer and waits until it is ready.
    pub async fn spawn_producer(&mut self) -> anyhow::Result<()> {
        let health = free_health_addr();
        let env: Vec<(&str, &str)> = self
            .producer_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut d = Daemon::spawn(
            &bin_path("ordo-producer"),
            &self.producer_config(health),
            health,
            &env,
        )?;
        d.wait_ready(Duration::from_secs(60)).await?;
        self.producer = Some(d);
        Ok(())
    }

    /// Starts projector `slot` (a new one when `slot == len`) and waits until it is ready.
    pub async fn spawn_projector(&mut self, slot: usize) -> anyhow::Result<()> {
        let health = free_health_addr();
        let env: Vec<(&str, &str)> = self
            .projector_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut d = Daemon::spawn(
            &bin_path("ordo-projector"),
            &self.projector_config(health),
            health,
            &env,
        )?;
        d.wait_ready(Duration::from_secs(60)).await?;
        if slot == self.projectors.len() {
            self.projectors.push(Some(d));
        } else {
            self.projectors[slot] = Some(d);
        }
        Ok(())
    }

    /// Fails, with the daemon's log, if any daemon that should be running has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        let named = self
            .producer
            .iter_mut()
            .map(|d| ("ordo-producer".to_string(), d))
            .chain(self.projectors.iter_mut().enumerate().filter_map(|(i, d)| {
                d.as_mut()
                    .map(|d| (format!("ordo-projector #{}", i + 1), d))
            }));
        for (name, d) in named {
            if let Some(status) = d.try_exit_status()? {
                let logs = d.logs();
                let tail: Vec<&str> = logs.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                anyhow::bail!(
                    "{name} exited unexpectedly ({status}); last log lines:\n{}",
                    tail.join("\n")
                );
            }
        }
        Ok(())
    }

    /// Sum of a metric over every running daemon.
    pub async fn metric(&self, name: &str) -> f64 {
        let mut total = 0.0;
        for d in self.producer.iter().chain(self.projectors.iter().flatten()) {
            total += d.metric(name).await;
        }
        total
    }

    /// The compiled projections.
    pub fn projections(&self) -> anyhow::Result<Vec<DeclarativeProjection>> {
        let text = std::fs::read_to_string(&self.projections_file)?;
        Ok(ProjectionsFile::load_str(&text)?)
    }

    /// Number of aggregates whose read model has reached the last version in the events
    /// collection, out of all aggregates.
    pub async fn caught_up(&self) -> anyhow::Result<(usize, usize)> {
        let db = self.db();
        let mut latest: BTreeMap<String, i64> = BTreeMap::new();
        let mut cur = db
            .collection::<Document>("events")
            .aggregate(vec![
                doc! {"$group": {"_id": "$aggregateId", "v": {"$max": "$eventId"}}},
            ])
            .await?;
        while let Some(d) = cur.try_next().await? {
            if let (Ok(id), Some(v)) = (d.get_str("_id"), d.get("v")) {
                latest.insert(
                    id.to_string(),
                    ordo_projection::event_version(&doc! {"eventId": v.clone()}),
                );
            }
        }
        let mut done = 0;
        for p in self.projections()? {
            let mut cur = db
                .collection::<Document>(p.collection())
                .find(doc! {})
                .projection(doc! {"lastEventId": 1})
                .await?;
            while let Some(d) = cur.try_next().await? {
                let id = d.get_str("_id").unwrap_or_default();
                let v = ReadModel::from_document(id, d.clone()).version;
                if latest.get(id) == Some(&v) {
                    done += 1;
                }
            }
        }
        Ok((done, latest.len()))
    }

    /// Folds every aggregate's events (through the wire envelope, exactly as the projector sees
    /// them) and compares with the stored read models.
    pub async fn verify(&self) -> anyhow::Result<Verdict> {
        let db = self.db();
        let fields = EventFields::default();
        let mut by_aggregate: BTreeMap<String, Vec<Document>> = BTreeMap::new();
        let mut cur = db
            .collection::<Document>("events")
            .find(doc! {})
            .sort(doc! {"aggregateId": 1, "eventId": 1})
            .await?;
        let mut verdict = Verdict::default();
        while let Some(raw) = cur.try_next().await? {
            let env = Envelope::from_event(&raw, &fields, self.mongo.db_name(), "events")?;
            by_aggregate
                .entry(env.aggregate_id.clone())
                .or_default()
                .push(env.to_event_document()?);
            verdict.events += 1;
        }
        let projections = self.projections()?;
        for p in &projections {
            let coll = db.collection::<Document>(p.collection());
            for (id, events) in &by_aggregate {
                let expected = match fold_history(p, id, events.iter()) {
                    Ok(model) => model,
                    Err(HistoryError::Gap(gap)) => {
                        verdict.mismatches.push(format!("{id}: {gap}"));
                        continue;
                    }
                    Err(HistoryError::Apply(e)) => return Err(e.into()),
                };
                let stored = coll.find_one(doc! {"_id": id}).await?;
                let actual = stored.map(|d| ReadModel::from_document(id.clone(), d));
                let matches = match &actual {
                    None => expected.doc.is_none() && expected.version == 0,
                    // The rebuild epoch says who wrote the document, not what it holds.
                    Some(a) => a.version == expected.version && a.doc == expected.doc,
                };
                if expected.doc.is_some() || expected.version > 0 {
                    verdict.aggregates += 1;
                }
                if !matches {
                    verdict.mismatches.push(format!(
                        "{}/{id}: stored {:?} != fold {:?}",
                        p.name(),
                        actual,
                        expected
                    ));
                }
            }
        }
        Ok(verdict)
    }

    /// For every read model: its `lastUpdatedAt` minus the insert time of the event it last
    /// applied, in seconds — the end-to-end latency of each aggregate's newest event.
    pub async fn final_latencies(&self) -> anyhow::Result<Vec<f64>> {
        let db = self.db();
        let mut inserted: BTreeMap<(String, i64), i64> = BTreeMap::new();
        let mut cur = db.collection::<Document>("events").find(doc! {}).await?;
        while let Some(e) = cur.try_next().await? {
            if let (Ok(id), Ok(t)) = (e.get_str("aggregateId"), e.get_datetime("timestamp")) {
                inserted.insert((id.to_string(), event_version(&e)), t.timestamp_millis());
            }
        }
        let mut out = Vec::new();
        for p in self.projections()? {
            let mut cur = db
                .collection::<Document>(p.collection())
                .find(doc! {})
                .await?;
            while let Some(d) = cur.try_next().await? {
                let id = d.get_str("_id").unwrap_or_default().to_string();
                let v = ReadModel::from_document(id.clone(), d.clone()).version;
                if let (Some(t), Ok(at)) = (inserted.get(&(id, v)), d.get_datetime("lastUpdatedAt"))
                {
                    out.push((at.timestamp_millis() - t).max(0) as f64 / 1000.0);
                }
            }
        }
        Ok(out)
    }

    /// Aggregates recorded in `ordo_blocked`.
    pub async fn blocked(&self) -> anyhow::Result<u64> {
        Ok(self
            .db()
            .collection::<Document>("ordo_blocked")
            .count_documents(doc! {})
            .await?)
    }
}

/// Inserts the whole `workload` in batches of 50, each after `pace`.
pub async fn write(stack: &Stack, generator: &mut Generator, events: usize, pace: Duration) {
    let collection = stack.db().collection::<Document>("events");
    let mut written = 0;
    let mut ticker = tokio::time::interval(pace);
    while written < events {
        ticker.tick().await;
        let batch = generator.next_batch(50.min(events - written));
        assert!(!batch.is_empty(), "the generator ran dry at {written}");
        written += batch.len();
        insert(&collection, batch).await.unwrap();
    }
}

/// Waits until every read model reached its aggregate's last event, then checks each equals
/// the fold; returns the number of events folded.
pub async fn caught_up_and_folded(stack: &mut Stack, within: Duration) -> usize {
    caught_up_and_folded_for(stack, within, "").await
}

/// [`caught_up_and_folded`], with `context` (a seed, a layout) in every failure message.
pub async fn caught_up_and_folded_for(stack: &mut Stack, within: Duration, context: &str) -> usize {
    let deadline = Instant::now() + within;
    loop {
        if let Err(e) = stack.check_alive() {
            panic!("{context}: {e}");
        }
        let (done, aggregates) = stack.caught_up().await.unwrap();
        if aggregates > 0 && done == aggregates {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: read models did not catch up: {done}/{aggregates}"
        );
        tokio::time::sleep(ordo_testkit::wait::POLL_INTERVAL).await;
    }
    let verdict = stack.verify().await.unwrap();
    assert!(
        verdict.ok(),
        "{context}: {} read models differ from the fold, e.g. {:?}",
        verdict.mismatches.len(),
        verdict.mismatches.first()
    );
    let aggregates = stack
        .db()
        .collection::<Document>("events")
        .distinct("aggregateId", doc! {})
        .await
        .unwrap()
        .len();
    assert_eq!(
        verdict.aggregates, aggregates,
        "{context}: every aggregate written has a read model equal to its fold"
    );
    verdict.events
}

/// Starts both daemons on `stack`, writes `users` users and as many orders of
/// `events_per_aggregate` events each (seeded) in batches `pace` apart, and checks every event
/// reaches its read model within `within_s` seconds.
pub async fn project_a_workload(
    stack: &mut Stack,
    (users, events_per_aggregate, seed): (usize, usize, u64),
    pace: Duration,
    within_s: u64,
) {
    stack.spawn_producer().await.unwrap();
    stack.spawn_projector(0).await.unwrap();
    let workload = Workload {
        users,
        orders: users,
        events_per_aggregate,
        seed,
    };
    let mut generator = Generator::new(workload, "");
    write(stack, &mut generator, workload.total_events(), pace).await;
    let folded = caught_up_and_folded(stack, Duration::from_secs(within_s)).await;
    assert_eq!(folded, workload.total_events());
}
