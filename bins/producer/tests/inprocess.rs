//! The producer in-process over a real database and a fake publisher, to hold one session's
//! send open at will: a stuck acknowledged prefix stops the reader at `max_unacknowledged`
//! items, turns readiness off after `checkpoint_stuck_after`, and both recover once the send
//! completes.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mongodb::bson::doc;
use ordo_core::config::{load_str, Env};
use ordo_core::envelope::WireMessage;
use ordo_core::servicebus::sender::{PublishError, Publisher, PublisherFactory};
use ordo_core::shutdown::Shutdown;
use ordo_core::telemetry::Health;
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

fn config(mongo: &TestMongo) -> ProducerConfig {
    let text = format!(
        r#"
[mongodb]
uri = {uri:?}
database = {db:?}
[servicebus]
connection_string = "Endpoint=sb://127.0.0.9;SharedAccessKeyName=k;SharedAccessKey=s;UseDevelopmentEmulator=true"
topic = "t"
[producer]
start_at = "beginning"
lease_ttl = "3s"
checkpoint_interval = "200ms"
idle_checkpoint_interval = "200ms"
max_await_time = "200ms"
retry_initial = "50ms"
retry_max = "200ms"
max_in_flight_messages = 5
max_unacknowledged = 10
checkpoint_stuck_after = "2s"
probe_interval = "1s"
"#,
        uri = mongo.uri(),
        db = mongo.db_name(),
    );
    load_str(&text, "test.toml", &Env::from_pairs([])).expect("config")
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
