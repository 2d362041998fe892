//! Shared fixtures of the projector's integration tests: SecantusDB, the testkit's embedded
//! emulator on its own loopback address, a seeded User/Order workload, publishing by the
//! contract, and the expected read models folded from the events collection with the same
//! projections.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use azservicebus::{
    ServiceBusClient, ServiceBusClientOptions, ServiceBusMessage, ServiceBusSenderOptions,
};
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime, Document};
use ordo_core::envelope::{Envelope, EventFields, PropertyValue, WireMessage};
use ordo_core::secret::Secret;
use ordo_core::servicebus::sender::{Publisher, PublisherFactory, ServiceBusPublisherFactory};
use ordo_projection::{Projection, ProjectionsFile};
pub use ordo_projector::config::ProjectorSection;
use ordo_servicebus_emulator::config::{EmulatorConfig, SubscriptionConfig, TopicConfig};
use ordo_servicebus_emulator::EmulatorHandle;
pub use ordo_testkit::oracle::Expected;
use ordo_testkit::{free_health_addr, oracle, ConfigFile, Daemon, TestMongo, TestServiceBus};

pub const TOPIC: &str = "ordo-events";
pub const SUB: &str = "projector";

pub fn projections_path() -> PathBuf {
    ordo_testkit::paths::workspace_root().join("config/projections.toml")
}

/// The test configuration's projections.
pub fn projections() -> Vec<Arc<dyn Projection>> {
    compile(&std::fs::read_to_string(projections_path()).unwrap())
}

/// The projections of a projections file's `text`.
pub fn compile(text: &str) -> Vec<Arc<dyn Projection>> {
    ProjectionsFile::load_str(text)
        .unwrap()
        .into_iter()
        .map(|p| Arc::new(p) as Arc<dyn Projection>)
        .collect()
}

/// The tests' `[projector]`: the test projections, a few sessions, and short timeouts and
/// retries, so a fault shows within seconds. A test changes fields of it
/// (`ProjectorSection { batch_size: 2, ..tuning() }`).
pub fn tuning() -> ProjectorSection {
    let ms = Duration::from_millis;
    ProjectorSection {
        projections_file: projections_path(),
        max_concurrent_sessions: 4,
        batch_size: 50,
        receive_wait: ms(200),
        accept_timeout: Duration::from_secs(3),
        session_idle_timeout: ms(300),
        lock_renewal_interval: Duration::from_secs(1),
        gap_timeout: Duration::from_secs(2),
        retry_initial: ms(20),
        retry_max: ms(200),
        ..ProjectorSection::default()
    }
}

/// A database and an emulator for one test. Always the embedded emulator, even when
/// `ORDO_TEST_SERVICEBUS_CONNECTION_STRING` names a namespace: these tests read its state
/// (pending messages, dead letters, connections) and cut it off.
pub struct Env {
    pub mongo: TestMongo,
    pub bus: TestServiceBus,
}

/// Starts SecantusDB and an emulator (session-enabled subscription, `lock` lock duration).
pub async fn start(lock: Duration) -> Env {
    start_with(lock, |cfg| {
        // The emulator answers an accept with no session before the projector's own timeout,
        // so accepts end with the broker's answer (faster tests); `start_with` can keep the
        // broker's own 60 s hold, which production meets.
        cfg.namespace.session_accept_timeout = Duration::from_secs(1);
    })
    .await
}

/// Like [`start`], with the emulator's configuration changed by `tune` first.
pub async fn start_with(lock: Duration, tune: impl FnOnce(&mut EmulatorConfig)) -> Env {
    let mongo = TestMongo::start().await.expect("mongodb");
    let mut cfg = EmulatorConfig::default_ordo();
    cfg.topics = vec![TopicConfig {
        subscriptions: vec![SubscriptionConfig {
            lock_duration: lock,
            ..cfg.topics[0].subscriptions[0].clone()
        }],
        ..cfg.topics[0].clone()
    }];
    tune(&mut cfg);
    let bus = TestServiceBus::start_emulator(cfg)
        .await
        .unwrap_or_else(|e| panic!("emulator: {e:#}"));
    Env { mongo, bus }
}

impl Env {
    /// The emulator, for stats, dead letters and outages.
    pub fn emulator(&self) -> &EmulatorHandle {
        self.bus
            .emulator()
            .expect("the projector's tests start the embedded emulator")
    }

    /// The connection string daemons and clients use.
    pub fn conn(&self) -> &str {
        self.bus.connection_string()
    }

    /// A projector's configuration file with `projector` as its `[projector]`.
    pub fn projector_toml(
        &self,
        health: std::net::SocketAddr,
        projector: &ProjectorSection,
    ) -> String {
        self.projector_config(health, projector).render()
    }

    /// A projector's configuration with `projector` as its `[projector]`.
    pub fn projector_config(
        &self,
        health: std::net::SocketAddr,
        projector: &ProjectorSection,
    ) -> ConfigFile {
        ConfigFile::new(
            self.mongo.uri(),
            self.mongo.db_name(),
            self.conn(),
            TOPIC,
            health,
            "info,ordo_projector=debug",
        )
        .set("servicebus", "subscription", SUB)
        .section("projector", projector)
    }

    /// Starts a projector with the tests' [`tuning`] without waiting for it to be ready; `edit`
    /// changes its configuration.
    pub fn spawn_unready(&self, edit: impl FnOnce(ConfigFile) -> ConfigFile) -> Daemon {
        let health = free_health_addr();
        let config = edit(self.projector_config(health, &tuning())).render();
        Daemon::spawn(&bin(), &config, health, &[]).expect("spawn projector")
    }

    /// Starts a projector with `projector` as its `[projector]` and waits until it is ready.
    pub async fn spawn_projector(&self, projector: ProjectorSection) -> Daemon {
        let health = free_health_addr();
        let mut d = Daemon::spawn(
            &bin(),
            &self.projector_toml(health, &projector),
            health,
            &[],
        )
        .expect("spawn projector");
        d.wait_ready(Duration::from_secs(30))
            .await
            .expect("projector ready");
        d
    }

    pub fn events(&self) -> mongodb::Collection<Document> {
        self.mongo.database().collection("events")
    }

    pub async fn insert_events(&self, events: &[Document]) {
        for chunk in events.chunks(1000) {
            self.events().insert_many(chunk.to_vec()).await.unwrap();
        }
    }

    /// Publishes `events` by the message contract, one batch per aggregate run.
    pub async fn publish(&self, events: &[Document]) {
        // Boxed: the publisher's future is large, and the largest tests overflowed the test
        // thread's stack in debug builds with it inline.
        Box::pin(self.publish_with(events, "")).await
    }

    /// Like [`Env::publish`], with `suffix` appended to every MessageId: a redelivery the
    /// broker's duplicate detection does not catch (e.g. after its window), so the projector's
    /// version rule must.
    ///
    /// Publishes through the producer's own adapter, one message per send: the test topic is
    /// partitioned with duplicate detection, where Service Bus refuses a batch of distinct
    /// MessageIds. A send that fails or gets no answer within its timeout is retried on a fresh
    /// publisher: the broker may or may not have taken it, and a resend is removed by MessageId
    /// duplicate detection (and, past that, by the projector's version rule). The emulator
    /// sometimes leaves a send of a message it did enqueue without an answer, so the timeout
    /// is short: the emulator answers in milliseconds, and a resend costs nothing.
    pub async fn publish_with(&self, events: &[Document], suffix: &str) {
        let factory = ServiceBusPublisherFactory {
            connection_string: Secret::new(self.conn().to_owned()),
            topic: TOPIC.to_string(),
            identifier: "projector-test".to_string(),
            max_batch_bytes: None,
            send_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(10),
            connections: Default::default(),
        };
        let mut runs: Vec<Vec<WireMessage>> = Vec::new();
        let mut run_session = String::new();
        for e in events {
            let mut m = Envelope::from_event(e, &EventFields::default(), "db", "events")
                .unwrap()
                .to_message();
            m.message_id.push_str(suffix);
            if m.session_id != run_session || runs.last().is_none_or(|r| !r.is_empty()) {
                runs.push(Vec::new());
            }
            run_session = m.session_id.clone();
            runs.last_mut().unwrap().push(m);
        }
        let mut publisher = None;
        for run in runs {
            let mut failures = Vec::new();
            loop {
                assert!(
                    failures.len() < 8,
                    "publishing {} failed 8 times: {failures:?}",
                    run[0].message_id
                );
                let p = match publisher.as_mut() {
                    Some(p) => p,
                    None => match factory.open().await {
                        Ok(p) => publisher.insert(p),
                        Err(e) => {
                            failures.push(e.to_string());
                            continue;
                        }
                    },
                };
                match p.publish(&run).await {
                    Ok(()) => break,
                    Err(e) => {
                        failures.push(e.to_string());
                        publisher = None;
                    }
                }
            }
            if !failures.is_empty() {
                eprintln!(
                    "publish of {}.. needed {} retries: {failures:?}",
                    run[0].message_id,
                    failures.len()
                );
            }
        }
    }

    /// Number of messages the subscription holds (waiting or locked), from the emulator.
    pub fn active(&self) -> usize {
        let s = self.emulator().stats();
        s.entity(&format!("{TOPIC}/Subscriptions/{SUB}"))
            .map(|e| e.active)
            .unwrap_or(0)
    }

    /// Publishes raw bodies (poison) in `session`.
    pub async fn publish_raw(&self, session: &str, message_id: &str, body: &[u8]) {
        let mut client = ServiceBusClient::unsecured()
            .new_from_connection_string(self.conn(), ServiceBusClientOptions::default())
            .await
            .unwrap();
        let mut sender = client
            .create_sender(TOPIC, ServiceBusSenderOptions::default())
            .await
            .unwrap();
        let mut m = ServiceBusMessage::new(body.to_vec());
        m.set_message_id(message_id.to_string()).unwrap();
        m.set_session_id(Some(session.to_string())).unwrap();
        m.set_partition_key(Some(session.to_string())).unwrap();
        m.set_content_type("application/json".to_string());
        sender.send_message(m).await.unwrap();
        sender.dispose().await.unwrap();
        client.dispose().await.unwrap();
    }

    /// Read models of a projection's collection, by id, without `lastUpdatedAt`.
    pub async fn read_models(&self, collection: &str) -> BTreeMap<String, Document> {
        let models = raw_models(self, collection).await;
        models
            .into_iter()
            .map(|(id, d)| (id, oracle::as_expected(d)))
            .collect()
    }

    /// What every read model must be: the fold of the events collection.
    pub async fn expected(&self) -> Expected {
        self.fold(&projections(), &[]).await
    }

    /// The fold of the events collection under `projections`, without the aggregates in `skip`
    /// (whose events need not be valid).
    pub async fn fold(&self, projections: &[Arc<dyn Projection>], skip: &[&str]) -> Expected {
        let all: Vec<Document> = self
            .events()
            .find(doc! {})
            .sort(doc! { "aggregateId": 1, "eventId": 1 })
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let events = all
            .iter()
            .filter(|d| !skip.contains(&d.get_str("aggregateId").unwrap()))
            .map(as_projected);
        expected_of(projections, events)
    }

    /// True when every collection equals its expected fold.
    pub async fn converged(&self, expected: &Expected) -> bool {
        for (coll, models) in expected {
            if &self.read_models(coll).await != models {
                return false;
            }
        }
        true
    }

    /// A short diff for failure messages.
    pub async fn diff(&self, expected: &Expected) -> String {
        let mut out = String::new();
        for (coll, models) in expected {
            let actual = self.read_models(coll).await;
            let wrong: Vec<_> = models
                .iter()
                .filter(|(id, d)| actual.get(*id) != Some(*d))
                .take(3)
                .map(|(id, d)| format!("{coll}/{id}: expected {d}, got {:?}", actual.get(id)))
                .collect();
            out.push_str(&format!(
                "{coll}: {} expected, {} present, {} wrong: {wrong:?}\n",
                models.len(),
                actual.len(),
                models
                    .iter()
                    .filter(|(id, d)| actual.get(*id) != Some(*d))
                    .count()
            ));
        }
        out
    }

    pub fn dead_letters(&self) -> Vec<ordo_servicebus_emulator::stats::DeadLetteredMessage> {
        self.emulator()
            .subscription_dead_letters(TOPIC, SUB)
            .unwrap()
    }

    pub fn pending(&self) -> usize {
        let s = self.emulator().stats();
        s.entity(&format!("{TOPIC}/Subscriptions/{SUB}"))
            .map(|e| e.active + e.locked)
            .unwrap_or(0)
    }
}

/// Stops `projector` with SIGTERM; it must exit 0 within 15 s.
pub async fn stop(projector: &mut Daemon) {
    projector.sigterm().unwrap();
    let status = projector.wait_exit(Duration::from_secs(15)).await.unwrap();
    assert!(status.success(), "{status:?}\n{}", projector.logs());
}

/// A stored event as the projector sees it: through the wire envelope.
pub fn as_projected(event: &Document) -> Document {
    Envelope::from_event(event, &EventFields::default(), "db", "events")
        .unwrap()
        .to_event_document()
        .unwrap()
}

/// The read models `events` (as the projector sees them) lead to under `projections`; every
/// history must be whole.
pub fn expected_of(
    projections: &[Arc<dyn Projection>],
    events: impl IntoIterator<Item = Document>,
) -> Expected {
    let folded = oracle::fold(projections.iter().map(|p| p.as_ref()), events).unwrap();
    assert!(folded.holes.is_empty(), "{:?}", folded.holes);
    folded.expected
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ordo-projector"))
}

/// The service bus message for a source event, exactly as the contract says.
pub fn to_message(event: &Document) -> ServiceBusMessage {
    let env = Envelope::from_event(event, &EventFields::default(), "db", "events").unwrap();
    let wire = env.to_message();
    let mut m = ServiceBusMessage::new(wire.body.clone());
    m.set_message_id(wire.message_id.clone()).unwrap();
    m.set_session_id(Some(wire.session_id.clone())).unwrap();
    m.set_partition_key(Some(wire.session_id.clone())).unwrap();
    m.set_subject(wire.subject.clone());
    m.set_content_type(wire.content_type.to_string());
    let props = m
        .application_properties_mut()
        .get_or_insert_with(Default::default);
    for (k, v) in &wire.properties {
        let v = match v {
            PropertyValue::String(s) => s.clone().into(),
            PropertyValue::Int(i) => (*i).into(),
            PropertyValue::Long(l) => (*l).into(),
        };
        props.0.insert(k.clone(), v);
    }
    m
}

/// A source event.
pub fn event(agg: &str, agg_type: &str, v: i64, event_type: &str, payload: Document) -> Document {
    doc! {
        "aggregateId": agg, "aggregateType": agg_type, "eventId": v, "eventType": event_type,
        "payload": payload, "timestamp": DateTime::from_millis(1_700_000_000_000 + v * 1000),
    }
}

/// `n` aggregates (even: User, odd: Order) with `per` events each, in publish order
/// (aggregate by aggregate).
pub fn workload(prefix: &str, n: usize, per: i64) -> Vec<Document> {
    let mut out = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        if i % 2 == 0 {
            out.push(event(
                &id,
                "User",
                1,
                "UserRegistered",
                doc! { "email": format!("{id}@x"), "name": id.clone() },
            ));
            for v in 2..=per {
                let e = if v == per && i % 4 == 0 {
                    event(&id, "User", v, "UserDeactivated", doc! {})
                } else {
                    event(
                        &id,
                        "User",
                        v,
                        "UserEmailUpdated",
                        doc! { "email": format!("{id}+{v}@x") },
                    )
                };
                out.push(e);
            }
        } else {
            out.push(event(
                &id,
                "Order",
                1,
                "OrderCreated",
                doc! { "customerId": format!("c{i}") },
            ));
            let mut live: Vec<String> = Vec::new();
            for v in 2..=per {
                let e = if v % 3 == 0 && !live.is_empty() {
                    let sku = live.remove(0);
                    event(&id, "Order", v, "ItemRemovedFromOrder", doc! { "sku": sku })
                } else {
                    let sku = format!("sku{v}");
                    live.push(sku.clone());
                    event(
                        &id,
                        "Order",
                        v,
                        "ItemAddedToOrder",
                        doc! { "sku": sku, "qty": (v % 4) + 1, "price": Bson::Double(9.5) },
                    )
                };
                out.push(e);
            }
        }
    }
    out
}

/// Read models of a projection's collection, by id, exactly as stored.
pub async fn raw_models(env: &Env, collection: &str) -> BTreeMap<String, Document> {
    let models = env.mongo.database().collection::<Document>(collection);
    all_documents(&models)
        .await
        .into_iter()
        .map(|d| (d.get_str("_id").unwrap().to_string(), d))
        .collect()
}

/// Every document of `collection`.
pub async fn all_documents(collection: &mongodb::Collection<Document>) -> Vec<Document> {
    collection
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}
