//! The producer in-process over a real database and a fake publisher, to hold one session's
//! send open at will: a stuck acknowledged prefix stops the reader at `max_unacknowledged`
//! items, turns readiness off after `checkpoint_stuck_after`, and both recover once the send
//! completes.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mongodb::bson::doc;
use ordo_core::config::{MongoConfig, ServiceBusConfig, Validate};
use ordo_core::envelope::WireMessage;
use ordo_core::secret::Secret;
use ordo_core::servicebus::sender::{PublishError, Publisher, PublisherFactory};
use ordo_core::shutdown::Shutdown;
use ordo_core::telemetry::Health;
use ordo_producer::config::ProducerSection;
use ordo_producer::{Producer, ProducerConfig};
use ordo_testkit::{wait_until, TestMongo};
use tokio::sync::watch;

/// Sends are recorded; a send holding a message of session "stuck" waits until released.
struct Fake {
    sent: Mutex<Vec<String>>,
    release: watch::Receiver<bool>,
}

struct FakePublisher(Arc<Fake>);

impl Publisher for FakePublisher {
    async fn publish(&mut self, messages: &[WireMessage]) -> Result<(), PublishError> {
        if messages.iter().any(|m| m.session_id == "stuck") {
            let mut release = self.0.release.clone();
            let _ = release.wait_for(|r| *r).await;
        }
        let mut sent = self.0.sent.lock().unwrap();
        sent.extend(messages.iter().map(|m| m.message_id.clone()));
        Ok(())
    }
}

struct FakeFactory(Arc<Fake>);

impl PublisherFactory for FakeFactory {
    type Publisher = FakePublisher;
    async fn open(&self) -> Result<FakePublisher, PublishError> {
        Ok(FakePublisher(self.0.clone()))
    }
}

/// The producer's configuration, typed: short intervals, and a small window of in-flight and
/// unacknowledged items so one stuck send fills it.
fn config(mongo: &TestMongo) -> ProducerConfig {
    let ms = Duration::from_millis;
    let mut cfg = ProducerConfig {
        mongodb: MongoConfig {
            uri: Some(Secret::new(mongo.uri())),
            database: Some(mongo.db_name().to_string()),
            ..MongoConfig::default()
        },
        servicebus: ServiceBusConfig {
            connection_string: Some(Secret::new(
                "Endpoint=sb://127.0.0.9;SharedAccessKeyName=k;SharedAccessKey=s;UseDevelopmentEmulator=true",
            )),
            topic: "t".into(),
            ..ServiceBusConfig::default()
        },
        producer: ProducerSection {
            start_at: "beginning".into(),
            lease_ttl: Duration::from_secs(3),
            checkpoint_interval: ms(200),
            idle_checkpoint_interval: ms(200),
            max_await_time: ms(200),
            retry_initial: ms(50),
            retry_max: ms(200),
            max_in_flight_messages: 5,
            max_unacknowledged: 10,
            checkpoint_stuck_after: Duration::from_secs(2),
            probe_interval: Duration::from_secs(1),
            ..ProducerSection::default()
        },
        ..ProducerConfig::default()
    };
    cfg.validate().expect("config");
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_prefix_stops_the_reader_and_readiness_until_it_moves() {
    let mongo = TestMongo::start().await.expect("mongodb");
    let (release, released) = watch::channel(false);
    let fake = Arc::new(Fake {
        sent: Mutex::default(),
        release: released,
    });
    let health = Health::new();
    health.set_started();
    let shutdown = Shutdown::new();
    let producer = Producer::new(
        config(&mongo),
        mongo.database(),
        health.clone(),
        shutdown.clone(),
    );
    let factory = Arc::new(FakeFactory(fake.clone()));
    let running = tokio::spawn(async move { producer.run(factory).await });
    let h = &health;
    wait_until(Duration::from_secs(20), || async move { h.is_ready() }).await;

    let events = mongo.database().collection("events");
    events
        .insert_one(doc! { "aggregateId": "stuck", "eventId": 1, "eventType": "T" })
        .await
        .unwrap();
    let docs: Vec<_> = (0..100)
        .map(|i| doc! { "aggregateId": format!("a{}", i % 20), "eventId": i / 20 + 1, "eventType": "T" })
        .collect();
    events.insert_many(docs).await.unwrap();

    // The front is the stuck send: the prefix cannot move, readiness goes off after 2 s.
    wait_until(Duration::from_secs(10), || async move { !h.is_ready() }).await;
    let sent = fake.sent.lock().unwrap().len();
    assert!(
        sent < 10,
        "the reader stops at max_unacknowledged = 10 items behind the stuck one: {sent} sent"
    );

    release.send(true).unwrap();
    let f = &fake;
    wait_until(Duration::from_secs(20), || async move {
        f.sent.lock().unwrap().iter().collect::<HashSet<_>>().len() == 101
    })
    .await;
    wait_until(Duration::from_secs(10), || async move { h.is_ready() }).await;
    shutdown.token.cancel();
    running.await.unwrap().unwrap();
}
