//! Sizes at and over the limits: ids measured in bytes, messages measured as the client
//! encodes them and against the limit the broker announces, change events over MongoDB's 16 MB.

use ordo_core::envelope::{Envelope, EventFields};
use ordo_core::servicebus::sender;

use super::*;

const LIMIT: usize = 256 * 1024;

fn event(id: &str, agg: &str, n: i64, pad: usize) -> Document {
    doc! { "_id": id, "aggregateId": agg, "eventId": n, "eventType": "T", "payload": { "pad": "x".repeat(pad) } }
}

/// The only record in `ordo_parked`, once there is one.
async fn the_one_parked(world: &World) -> Document {
    let parked = world.mongo.database().collection::<Document>("ordo_parked");
    let p = &parked;
    wait_until(Duration::from_secs(20), || async move {
        p.count_documents(doc! {}).await.unwrap_or(0) == 1
    })
    .await;
    parked.find_one(doc! {}).await.unwrap().unwrap()
}

/// The largest padding for which the event's message still fits the default limit, found as
/// the producer measures it (then published: the client and the broker must take it).
fn largest_fitting_pad(db: &str, id: &str, agg: &str) -> usize {
    let fits = |pad: usize| {
        let m = Envelope::from_event(
            &event(id, agg, 1, pad),
            &EventFields::default(),
            db,
            "events",
        )
        .unwrap()
        .to_message();
        sender::fits(&m, LIMIT as u64).is_ok()
    };
    let (mut lo, mut hi) = (0, LIMIT);
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// An aggregate id of 106 CJK characters (318 bytes) reaches the topic under its hashed
/// session id; a body just under `max_message_bytes` whose encoded message is over it is
/// parked with the reason, the next event of its session is published, and the checkpoint
/// passes it; the largest message that fits is accepted by the client and the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wide_ids_and_bodies_at_the_limit_never_stall_publishing() {
    let world = World::start().await;
    let events = world.events();
    let collector = Collector::start(&world.bus);
    let mut producer = world.spawn(tuning());
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();

    let wide = "账".repeat(106);
    let db = world.mongo.db_name().to_string();
    let edge_pad = largest_fitting_pad(&db, "edge-1", "edge");
    let mut docs = vec![];
    for n in 1..=3 {
        docs.push(event(&format!("w{n}"), &wide, n, 10));
    }
    docs.push(event("big-1", "big", 1, 10));
    // 100 bytes under the limit as a body: the encoded message is over the limit itself, so
    // the client would refuse it.
    let body_of = |pad| {
        Envelope::from_event(
            &event("big-2", "big", 2, pad),
            &EventFields::default(),
            &db,
            "events",
        )
        .unwrap()
        .to_body()
        .len()
    };
    let pad = LIMIT - 100 - body_of(0);
    assert_eq!(body_of(pad), LIMIT - 100);
    docs.push(event("big-2", "big", 2, pad));
    docs.push(event("big-3", "big", 3, 10));
    docs.push(event("edge-1", "edge", 1, edge_pad));
    events.insert_many(docs).await.unwrap();

    wait_distinct(&collector, 6, DEADLINE).await;
    let record = the_one_parked(&world).await;
    assert_eq!(record.get_str("reason").unwrap(), "too_large", "{record:?}");
    let error = record.get_str("error").unwrap();
    assert!(
        error.contains("encoded message is") && error.contains("body 262044 bytes"),
        "{error}"
    );
    assert_eq!(record.get_str("sourceId").unwrap(), "big-2");
    // Parked events are acknowledged, not published: the checkpoint passes big-2.
    wait_checkpoint(&world, |cp| published(cp) >= 6).await;
    stop(&mut producer).await;
    assert_eq!(published(&world.checkpoint().await.unwrap()), 6);
    let received = collector.stop().await;
    assert_eq!(received.per_aggregate[&wide], [1, 2, 3]);
    assert_eq!(received.per_aggregate["big"], [1, 3]);
    assert_eq!(received.per_aggregate["edge"], [1]);
    assert!(received
        .message_ids
        .iter()
        .any(|id| id.starts_with(ordo_core::envelope::HASHED_ID_PREFIX)));
}

/// A producer configured for larger messages than the topic takes (`max_message_bytes` set for
/// Premium, a Standard topic of 256 KB): in each send mode the message is measured against the
/// max-message-size the broker announced on the link and parked naming it; its session goes on
/// with the next event and the checkpoint passes it. Before, single sends put it on the wire,
/// the broker detached the link (`amqp:link:message-size-exceeded`) and the send was retried
/// forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_refuses_as_too_large_is_parked_in_every_send_mode() {
    for mode in [SendMode::Single, SendMode::Batch] {
        let world = World::start().await;
        let events = world.events();
        let collector = Collector::start(&world.bus);
        let mut producer = world.spawn(ProducerSection {
            send_mode: mode,
            max_message_bytes: 4 * LIMIT,
            ..tuning()
        });
        producer.wait_ready(Duration::from_secs(30)).await.unwrap();
        let docs = vec![
            event("huge-1", "huge", 1, LIMIT + 1024),
            event("huge-2", "huge", 2, 10),
            event("other-1", "other", 1, 10),
        ];
        events.insert_many(docs).await.unwrap();
        wait_distinct(&collector, 2, DEADLINE).await;
        let record = the_one_parked(&world).await;
        assert_eq!(
            record.get_str("sourceId").unwrap(),
            "huge-1",
            "{mode:?}: {record:?}"
        );
        let error = record.get_str("error").unwrap();
        assert!(
            error.contains("max-message-size of 262144 bytes"),
            "{mode:?}: the reason names the topic's limit: {error}"
        );
        // Parked events are acknowledged but not counted as published.
        wait_checkpoint(&world, |cp| published(cp) >= 2).await;
        stop(&mut producer).await;
        let received = collector.stop().await;
        assert_eq!(received.per_aggregate["huge"], [2], "{mode:?}");
        assert_eq!(received.per_aggregate["other"], [1], "{mode:?}");
    }
}

/// A change event over MongoDB's 16 MB limit (a document near the limit plus the event's own
/// fields) fails every read of the stream with BSONObjectTooLarge (10334) on MongoDB; reopened
/// as it was, the stream would meet it again forever. The stand-in does not enforce that limit,
/// so a fail point answers 10334 to the stream's first command after a restart, when the
/// oversized document is the next event after the checkpoint. The producer reopens the stream
/// at the same position with its shrinking stages: the document is read by its `_id` and
/// parked as `too_large` naming its size, the aggregate's next event is published, and the
/// checkpoint passes both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_event_over_the_16_mb_limit_is_parked_not_read_forever() {
    let world = World::start().await;
    let events = world.events();
    let collector = Collector::start(&world.bus);
    let mut producer = world.spawn(tuning());
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    events
        .insert_one(event("huge-1", "huge", 1, 10))
        .await
        .unwrap();
    wait_distinct(&collector, 1, DEADLINE).await;
    wait_checkpoint(&world, |cp| published(cp) >= 1).await;
    stop(&mut producer).await;

    // 16 MiB less 16 KiB of padding: under the insert limit, over the producer's bound.
    let pad = 16 * 1024 * 1024 - 16 * 1024;
    assert!(pad as i64 > ordo_producer::source::OVERSIZE_BYTES);
    events
        .insert_one(event("huge-2", "huge", 2, pad))
        .await
        .unwrap();
    events
        .insert_one(event("huge-3", "huge", 3, 10))
        .await
        .unwrap();
    world
        .mongo
        .configure_fail_point(
            "failCommand",
            doc! { "mode": { "times": 1 }, "data": {
                "failCommands": ["getMore", "aggregate"], "appName": "ordo-producer",
                "errorCode": 10334, "errmsg": "BSONObj size: 16777300 (0x1000054) is invalid",
            } },
        )
        .await
        .unwrap();
    let mut producer = world.spawn(tuning());
    wait_distinct(&collector, 2, DEADLINE).await;
    assert!(
        producer
            .metric_where(names::RETRIES, ("reason", "event_too_large"))
            .await
            >= 1.0,
        "the fault fired\n{}",
        producer.logs()
    );
    let record = the_one_parked(&world).await;
    assert_eq!(record.get_str("reason").unwrap(), "too_large", "{record:?}");
    assert_eq!(record.get_str("sourceId").unwrap(), "huge-2");
    let error = record.get_str("error").unwrap();
    assert!(
        error.contains("over MongoDB's 16 MB limit") && error.contains("bytes of BSON"),
        "{error}"
    );
    assert_eq!(
        record.get_document("source").unwrap(),
        &doc! { "_id": "huge-2" },
        "only the _id was read"
    );
    // Parked events are acknowledged, not published: the checkpoint passes huge-2.
    wait_checkpoint(&world, |cp| published(cp) >= 2).await;
    stop(&mut producer).await;
    let received = collector.stop().await;
    assert_eq!(received.per_aggregate["huge"], [1, 3]);
}
