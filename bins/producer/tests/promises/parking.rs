//! Invalid events (no aggregateId, a non-integer eventId, larger than the topic takes): parked
//! with their reason while the valid events around them are published, or, with
//! `on_invalid = "halt"`, the producer stops before passing one.

use super::*;
use ordo_core::metrics as names;
use ordo_producer::config::OnInvalid;
use ordo_testkit::wait_until;

const DEADLINE: Duration = Duration::from_secs(90);

fn invalid_events() -> Vec<Document> {
    vec![
        doc! { "eventId": 1_i64, "eventType": "Orphan", "payload": {} },
        doc! { "aggregateId": "bad-id", "eventId": "three", "eventType": "T", "payload": {} },
        doc! { "aggregateId": "big", "eventId": 1_i64, "eventType": "T", "payload": { "blob": "x".repeat(4000) } },
    ]
}

/// `on_invalid = "park"`: the three invalid kinds land in `ordo_parked` with their reason and
/// the metric; the valid events around them are published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_events_are_parked_and_the_rest_published() {
    let world = World::start().await;
    let events = world.events();
    let mut writer = Writer::new(10, 16);
    let collector = Collector::start(&world.bus);
    let mut producer = world.spawn(ProducerSection {
        max_message_bytes: 2048,
        ..tuning()
    });
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.write(&events, 40, 20).await;
    events.insert_many(invalid_events()).await.unwrap();
    writer.write(&events, 40, 20).await;
    wait_distinct(&collector, 80, DEADLINE).await;

    let parked = world.mongo.database().collection::<Document>("ordo_parked");
    let p = &parked;
    wait_until(Duration::from_secs(20), || async move {
        p.count_documents(doc! {}).await.unwrap_or(0) == 3
    })
    .await;
    let mut reasons: Vec<String> = Vec::new();
    let mut cursor = parked.find(doc! {}).await.unwrap();
    while cursor.advance().await.unwrap() {
        let d = cursor.deserialize_current().unwrap();
        assert!(d.get_str("error").is_ok_and(|e| !e.is_empty()), "{d:?}");
        assert!(d.get_document("source").is_ok(), "{d:?}");
        reasons.push(d.get_str("reason").unwrap().to_string());
    }
    reasons.sort();
    assert_eq!(reasons, ["invalid_field", "missing_field", "too_large"]);
    assert_eq!(producer.metric(names::EVENTS_PARKED).await, 3.0);
    stop(&mut producer).await;
    // Parked events are not published events.
    assert_eq!(published(&world.checkpoint().await.unwrap()), 80);
    collector.stop().await.check(&writer.expected()).unwrap();
}

/// `on_invalid = "halt"`: the producer exits non-zero at the bad event and the checkpoint stays
/// before it, so a restart (here with `park`) reads it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_on_invalid_exits_without_passing_the_event() {
    let world = World::start().await;
    let events = world.events();
    let mut writer = Writer::new(10, 17);
    let collector = Collector::start(&world.bus);
    let mut producer = world.spawn(ProducerSection {
        on_invalid: OnInvalid::Halt,
        ..tuning()
    });
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.write(&events, 30, 10).await;
    wait_distinct(&collector, 30, DEADLINE).await;
    wait_checkpoint(&world, |cp| published(cp) >= 30).await;
    events
        .insert_one(doc! { "aggregateId": "bad-id", "eventId": "three", "eventType": "T" })
        .await
        .unwrap();
    writer.write(&events, 30, 10).await;
    let status = producer.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert!(!status.success(), "halt must exit non-zero");
    assert!(producer.logs().contains("halting"), "{}", producer.logs());
    let parked = world.mongo.database().collection::<Document>("ordo_parked");
    assert_eq!(parked.count_documents(doc! {}).await.unwrap(), 0);

    let mut producer = world.spawn(tuning());
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    let p = &parked;
    wait_until(Duration::from_secs(20), || async move {
        p.count_documents(doc! { "reason": "invalid_field" })
            .await
            .unwrap_or(0)
            == 1
    })
    .await;
    wait_distinct(&collector, 60, DEADLINE).await;
    stop(&mut producer).await;
    collector.stop().await.check(&writer.expected()).unwrap();
}
