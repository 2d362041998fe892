//! Shared fixtures of the producer's integration tests: a database, a Service Bus namespace, a
//! producer process, an event writer, and a collector that reads the topic's `projector`
//! subscription with azservicebus, session by session.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use azservicebus::{
    ServiceBusReceiveMode, ServiceBusSessionReceiver, ServiceBusSessionReceiverOptions,
};
use mongodb::bson::{doc, Document};
use ordo_core::envelope::Envelope;
use ordo_core::secret::Secret;
pub use ordo_producer::config::ProducerSection;
use ordo_testkit::servicebus::TestServiceBus;
use ordo_testkit::{
    bin_path, free_health_addr, ConfigFile, Daemon, SecantusOptions, TestMongo, Topology,
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

mod collector;
#[allow(unused_imports)]
pub use collector::*;

/// The publish tests' workload, as (events, aggregates): 2,000 events over 100 aggregates,
/// times [`ordo_testkit::scale`] (10,000 over 500 with `ORDO_TEST_SCALE=full`).
pub fn workload() -> (usize, usize) {
    let scale = ordo_testkit::scale();
    (scale.of(2_000), scale.of(100))
}

/// The tests' `[producer]`: from the beginning of the collection, with a short lease and
/// short checkpoint, read and retry intervals, so a fault shows within seconds. A test changes
/// fields of it (`ProducerSection { lease_ttl: .., ..tuning() }`).
pub fn tuning() -> ProducerSection {
    let ms = Duration::from_millis;
    ProducerSection {
        start_at: "beginning".into(),
        lease_ttl: Duration::from_secs(3),
        checkpoint_interval: ms(200),
        idle_checkpoint_interval: ms(200),
        max_await_time: ms(200),
        retry_max: Duration::from_secs(1),
        send_timeout: Duration::from_secs(5),
        ..ProducerSection::default()
    }
}

/// A database and a namespace for one test.
pub struct World {
    pub mongo: TestMongo,
    pub bus: TestServiceBus,
}

impl World {
    pub async fn start() -> World {
        Self::start_with(SecantusOptions::new()).await
    }

    pub async fn start_with(options: SecantusOptions) -> World {
        Self::start_laid_out(options, Topology::PartitionedDeduplicated).await
    }

    /// A world whose topic is laid out as `topology` says.
    pub async fn start_laid_out(options: SecantusOptions, topology: Topology) -> World {
        let (mongo, bus) = tokio::join!(
            TestMongo::start_with(options),
            TestServiceBus::start_with(topology.emulator_config())
        );
        World {
            mongo: mongo.expect("mongodb"),
            bus: bus.expect("service bus"),
        }
    }

    pub fn events(&self) -> mongodb::Collection<Document> {
        self.mongo.database().collection("events")
    }

    /// The producer's configuration file for this world, with `producer` as its `[producer]`.
    pub fn config(&self, health: SocketAddr, producer: &ProducerSection) -> String {
        self.config_file(health, producer).render()
    }

    /// The producer's configuration for this world, with `producer` as its `[producer]`.
    pub fn config_file(&self, health: SocketAddr, producer: &ProducerSection) -> ConfigFile {
        ConfigFile::new(
            self.mongo.uri(),
            self.mongo.db_name(),
            self.bus.connection_string(),
            self.bus.topic(),
            health,
            "info,ordo_producer=debug",
        )
        .section("producer", producer)
    }

    /// Starts a producer with `producer` as its `[producer]`.
    pub fn spawn(&self, producer: ProducerSection) -> Daemon {
        let health = free_health_addr();
        Daemon::spawn(
            &bin_path("ordo-producer"),
            &self.config(health, &producer),
            health,
            &[],
        )
        .expect("spawn producer")
    }

    /// A producer whose connection string carries a wrong key (the broker refuses it),
    /// probing the broker every second.
    pub fn spawn_with_wrong_key(&self) -> Daemon {
        let health = free_health_addr();
        let producer = ProducerSection {
            probe_interval: Duration::from_secs(1),
            ..tuning()
        };
        let config = self
            .config_file(health, &producer)
            .set(
                "servicebus",
                "connection_string",
                ordo_testkit::servicebus::with_wrong_key(self.bus.connection_string()),
            )
            .render();
        Daemon::spawn(&bin_path("ordo-producer"), &config, health, &[]).expect("spawn producer")
    }

    pub async fn checkpoint(&self) -> Option<Document> {
        self.mongo
            .database()
            .collection::<Document>("ordo_checkpoints")
            .find_one(doc! {})
            .await
            .unwrap()
    }
}

/// Writes events: `aggregates` aggregates, eventIds contiguous per aggregate, interleaved in a
/// seeded random order, inserted in ordered batches.
pub struct Writer {
    next: Vec<i64>,
    rng: StdRng,
    pub written: usize,
    /// Give each event a string `_id` (`"{aggregateId}:{eventId}"`) instead of an ObjectId.
    pub string_ids: bool,
}

impl Writer {
    pub fn new(aggregates: usize, seed: u64) -> Self {
        Self {
            next: vec![1; aggregates],
            rng: StdRng::seed_from_u64(seed),
            written: 0,
            string_ids: false,
        }
    }

    pub fn expected(&self) -> HashMap<String, i64> {
        self.next
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 1)
            .map(|(i, n)| (agg(i), n - 1))
            .collect()
    }

    pub async fn write(&mut self, coll: &mongodb::Collection<Document>, n: usize, batch: usize) {
        let mut left = n;
        while left > 0 {
            let k = left.min(batch);
            let docs: Vec<Document> = (0..k)
                .map(|_| {
                    let a = self.rng.random_range(0..self.next.len());
                    let id = self.next[a];
                    self.next[a] += 1;
                    let mut d = Document::new();
                    if self.string_ids {
                        d.insert("_id", format!("{}:{id}", agg(a)));
                    }
                    d.extend(doc! {
                        "aggregateId": agg(a),
                        "aggregateType": "Account",
                        "eventId": id,
                        "eventType": "Deposited",
                        "payload": { "amount": id },
                        "timestamp": mongodb::bson::DateTime::now(),
                    });
                    d
                })
                .collect();
            coll.insert_many(docs).await.expect("insert events");
            left -= k;
            self.written += k;
        }
    }
}

/// Stops `producer` with SIGTERM; it must exit 0 within 15 s.
pub async fn stop(producer: &mut Daemon) {
    producer.sigterm().unwrap();
    let status = producer.wait_exit(Duration::from_secs(15)).await.unwrap();
    assert!(status.success(), "exit {status:?}\n{}", producer.logs());
}

pub fn agg(i: usize) -> String {
    format!("acct-{i:04}")
}

/// Waits until the stream's checkpoint has a position and satisfies `pred`.
pub async fn wait_checkpoint(world: &World, pred: impl Fn(&Document) -> bool) -> Document {
    let pred = &pred;
    ordo_testkit::wait_for(Duration::from_secs(30), || async move {
        world
            .checkpoint()
            .await
            .filter(|cp| cp.get("resumeToken").is_some() && pred(cp))
    })
    .await
}

/// The checkpoint's count of published events.
pub fn published(cp: &Document) -> i64 {
    match cp.get("events") {
        Some(mongodb::bson::Bson::Int64(n)) => *n,
        Some(mongodb::bson::Bson::Int32(n)) => i64::from(*n),
        _ => 0,
    }
}
