//! The producer's promises under input and faults nobody here wrote: ids measured in bytes,
//! messages measured as the client encodes them, a restart before the first publish, lost
//! history with string `_id`s, readiness that follows each dependency, and a task that fails.

mod common;

use std::time::Duration;

use common::*;
use mongodb::bson::{doc, Document};
use ordo_core::envelope::{Envelope, EventFields};
use ordo_core::metrics as names;
use ordo_core::servicebus::sender::{self, SendMode};
use ordo_testkit::{wait_until, SecantusOptions};

const DEADLINE: Duration = Duration::from_secs(90);
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

/// With the broker unreachable from the start, the producer (start_at = now) reads events it
/// cannot publish and is killed before any checkpoint save would have happened (a long
/// checkpoint interval stands for "soon after the start"): it saved its first position before
/// reading, so the next run publishes those events instead of starting at a new "now".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_before_the_first_publish_loses_nothing() {
    let world = World::start().await;
    let events = world.events();
    world.bus.suspend().await.unwrap();
    let mut producer = world.spawn(ProducerSection {
        start_at: "now".into(),
        checkpoint_interval: Duration::from_secs(3600),
        checkpoint_every_events: 10_000_000,
        ..tuning()
    });
    let p = &producer;
    wait_until(Duration::from_secs(30), || async move {
        p.logs().contains("change stream open")
    })
    .await;
    let mut writer = Writer::new(5, 21);
    writer.write(&events, 30, 10).await;
    wait_until(Duration::from_secs(20), || async move {
        p.metric(names::RETRIES).await >= 1.0 && !p.is_ready().await
    })
    .await;
    producer.kill9().unwrap();
    let _ = producer.wait_exit(Duration::from_secs(10)).await;

    world.bus.resume().await.unwrap().unwrap();
    let collector = Collector::start(&world.bus);
    let mut producer = world.spawn(ProducerSection {
        start_at: "now".into(),
        ..tuning()
    });
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    wait_distinct(&collector, 30, DEADLINE).await;
    stop(&mut producer).await;
    collector.stop().await.check(&writer.expected()).unwrap();
}

/// History lost while the producer is down, with string `_id`s: recovery re-publishes the
/// collection by aggregate and every event inserted during the outage reaches the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_history_with_string_ids_republishes_every_event() {
    let world = World::start_with(SecantusOptions::new().oplog_max_entries(100)).await;
    let events = world.events();
    let mut writer = Writer::new(20, 22);
    writer.string_ids = true;
    let collector = Collector::start(&world.bus);
    let mut producer = world.spawn(tuning());
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.write(&events, 60, 20).await;
    wait_distinct(&collector, 60, DEADLINE).await;
    wait_checkpoint(&world, |cp| published(cp) >= 60).await;
    stop(&mut producer).await;

    writer.write(&events, 250, 25).await;
    // An external deployment cannot have its oplog pruned on demand: skip there.
    match world.mongo.prune_oplog().await {
        Ok(pruned) => pruned.unwrap(),
        Err(unavailable) => return unavailable.skip(),
    }
    let mut producer = world.spawn(tuning());
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    wait_distinct(&collector, 310, DEADLINE).await;
    assert!(producer.metric(names::HISTORY_LOST).await >= 1.0);
    assert!(producer.metric(names::EVENTS_REPUBLISHED).await >= 310.0);
    stop(&mut producer).await;
    collector.stop().await.check(&writer.expected()).unwrap();
}

/// `/readyz` follows each dependency while the producer is idle: 503 within 10 s of the broker
/// going away and 200 within 10 s of its return; the same for a database whose change-stream
/// commands fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_broker_and_the_database_while_idle() {
    let world = World::start().await;
    let mut producer = world.spawn(ProducerSection {
        probe_interval: Duration::from_secs(1),
        ..tuning()
    });
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    let p = &producer;
    let ten = Duration::from_secs(10);

    world.bus.suspend().await.unwrap();
    wait_until(ten, || async move { !p.is_ready().await }).await;
    assert!(producer.logs().contains("Service Bus probe failed"));
    world.bus.resume().await.unwrap().unwrap();
    wait_until(ten, || async move { p.is_ready().await }).await;

    world
        .mongo
        .configure_fail_point(
            "failCommand",
            doc! { "mode": "alwaysOn", "data": { "failCommands": ["getMore", "aggregate"], "closeConnection": true } },
        )
        .await
        .unwrap();
    wait_until(ten, || async move { !p.is_ready().await }).await;
    assert!(p.metric(names::RETRIES).await >= 1.0);
    world.mongo.disable_fail_point("failCommand").await.unwrap();
    wait_until(ten, || async move { p.is_ready().await }).await;
    stop(&mut producer).await;
}

/// A topic that does not exist: the producer is never ready, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_keeps_readiness_off() {
    let world = World::start().await;
    let health = ordo_testkit::free_health_addr();
    let producer = ProducerSection {
        probe_interval: Duration::from_secs(1),
        ..tuning()
    };
    let config = world
        .config_file(health, &producer)
        .set("servicebus", "topic", "no-such-topic")
        .render();
    let producer = ordo_testkit::Daemon::spawn(
        &ordo_testkit::bin_path("ordo-producer"),
        &config,
        health,
        &[],
    )
    .unwrap();
    let p = &producer;
    wait_until(Duration::from_secs(15), || async move {
        p.metric(names::RETRIES).await >= 2.0 && !p.is_ready().await
    })
    .await;
    assert!(
        producer.logs().contains("Service Bus probe failed"),
        "{}",
        producer.logs()
    );
}

/// The checkpoint store refuses saves for good (a fail point answering BadValue to every
/// update): the producer does not publish on without saving; it exits non-zero and says which
/// task failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_checkpointer_stops_the_process_non_zero() {
    let world = World::start().await;
    let events = world.events();
    let mut writer = Writer::new(5, 23);
    let collector = Collector::start(&world.bus);
    let mut producer = world.spawn(tuning());
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.write(&events, 10, 10).await;
    wait_distinct(&collector, 10, DEADLINE).await;
    world
        .mongo
        .configure_fail_point(
            "failCommand",
            doc! { "mode": "alwaysOn", "data": { "failCommands": ["update"], "errorCode": 2 } },
        )
        .await
        .unwrap();
    writer.write(&events, 10, 10).await;
    let status = producer.wait_exit(Duration::from_secs(30)).await.unwrap();
    world.mongo.disable_fail_point("failCommand").await.unwrap();
    assert!(!status.success(), "{}", producer.logs());
    assert!(
        producer.logs().contains("checkpoint save refused for good"),
        "{}",
        producer.logs()
    );
    collector.stop().await;
}

/// The producer creates the unique (aggregateId, eventId) index by default, and again within a
/// minute when it is dropped; `ordo_events_index_enforced` follows. With
/// `create_indexes = false` it leaves the collection alone, warns and reports 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_index_is_created_or_reported() {
    let world = World::start().await;
    let events = world.events();
    let mut producer = world.spawn(tuning());
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    let e = &events;
    wait_until(Duration::from_secs(20), || async move {
        e.list_index_names().await.is_ok_and(|names| {
            names
                .iter()
                .any(|n| n == ordo_core::indexes::EVENT_INDEX_NAME)
        })
    })
    .await;
    assert!(producer
        .logs()
        .contains("events index: unique index created"));
    assert_eq!(producer.metric(names::EVENTS_INDEX_ENFORCED).await, 1.0);
    // Dropped by hand (or a restore without it): the next check, within a minute, creates it
    // again.
    events
        .drop_index(ordo_core::indexes::EVENT_INDEX_NAME)
        .await
        .unwrap();
    let p = &producer;
    wait_until(Duration::from_secs(90), || async move {
        p.logs()
            .matches("events index: unique index created")
            .count()
            == 2
    })
    .await;
    let names = events.list_index_names().await.unwrap();
    assert!(
        names
            .iter()
            .any(|n| n == ordo_core::indexes::EVENT_INDEX_NAME),
        "{names:?}"
    );
    stop(&mut producer).await;

    let other = World::start().await;
    let health = ordo_testkit::free_health_addr();
    let config = other
        .config_file(health, &tuning())
        .set("mongodb", "create_indexes", false)
        .render();
    let mut producer = ordo_testkit::Daemon::spawn(
        &ordo_testkit::bin_path("ordo-producer"),
        &config,
        health,
        &[],
    )
    .unwrap();
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    let p = &producer;
    wait_until(Duration::from_secs(20), || async move {
        p.logs().contains("events index: MISSING")
    })
    .await;
    assert_eq!(producer.metric(names::EVENTS_INDEX_ENFORCED).await, 0.0);
    let names = other.events().list_index_names().await.unwrap_or_default();
    assert!(
        !names
            .iter()
            .any(|n| n == ordo_core::indexes::EVENT_INDEX_NAME),
        "{names:?}"
    );
    stop(&mut producer).await;
}

/// Lease renewals hang (the database holds each `findAndModify` of the producer for 8 s, longer
/// than the 3 s lease): the renewal is bounded by the lease's remaining time, so the producer
/// stops publishing when its lease runs out instead of waiting on the database, and takes the
/// lease again once renewals answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_lease_renewal_stops_publishing_when_the_lease_runs_out() {
    let world = World::start().await;
    let mut producer = world.spawn(ProducerSection {
        lease_ttl: Duration::from_secs(3),
        ..tuning()
    });
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    let p = &producer;
    wait_until(Duration::from_secs(10), || async move {
        p.metric(names::LEASE_HELD).await == 1.0
    })
    .await;
    world
        .mongo
        .configure_fail_point(
            "failCommand",
            doc! { "mode": "alwaysOn", "data": {
                "failCommands": ["findAndModify"],
                "appName": "ordo-producer",
                "blockConnection": true,
                "blockTimeMS": 8000,
            } },
        )
        .await
        .unwrap();
    wait_until(Duration::from_secs(7), || async move {
        p.logs()
            .contains("lease expired before it could be renewed")
    })
    .await;
    wait_until(Duration::from_secs(5), || async move {
        p.metric(names::LEASE_HELD).await == 0.0
    })
    .await;
    world.mongo.disable_fail_point("failCommand").await.unwrap();
    wait_until(Duration::from_secs(30), || async move {
        p.metric(names::LEASE_HELD).await == 1.0
    })
    .await;
    stop(&mut producer).await;
}

/// `send_mode = "single"` (for partitioned topics with duplicate detection, which refuse
/// batches of distinct ids): one message per transfer, still every event in order per
/// aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_sends_keep_every_event_in_order() {
    let world = World::start().await;
    let events = world.events();
    let mut writer = Writer::new(10, 24);
    let collector = Collector::start(&world.bus);
    let mut producer = world.spawn(ProducerSection {
        send_mode: SendMode::Single,
        ..tuning()
    });
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.write(&events, 200, 50).await;
    wait_distinct(&collector, 200, DEADLINE).await;
    stop(&mut producer).await;
    collector.stop().await.check(&writer.expected()).unwrap();
}

/// `send_mode = "batch"` on a topic that refuses batches (partitioned, duplicate detection on):
/// the refused batches are retried, not dropped, `/readyz` is 503, and the producer says once
/// what to change; with `auto` it would have fallen back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_mode_on_a_topic_that_refuses_batches_says_what_to_change() {
    let world = World::start().await;
    let events = world.events();
    let mut writer = Writer::new(2, 31);
    let mut producer = world.spawn(ProducerSection {
        send_mode: SendMode::Batch,
        ..tuning()
    });
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    // Several events per aggregate in one insert, so batches of more than one form.
    writer.write(&events, 40, 40).await;
    let p = &producer;
    wait_until(Duration::from_secs(30), || async move {
        p.metric(names::RETRIES).await >= 3.0 && !p.is_ready().await
    })
    .await;
    let logs = producer.logs();
    assert_eq!(
        logs.matches("set send_mode = \\\"auto\\\" or \\\"single\\\"")
            .count()
            + logs
                .matches("set send_mode = \"auto\" or \"single\"")
                .count(),
        1,
        "said once what to change:\n{logs}"
    );
    // A claim of one message may go through; the refused batches are not counted as sent.
    assert!(p.metric(names::EVENTS_PUBLISHED).await < 40.0);
    stop(&mut producer).await;
}

/// A wrong key: the broker refuses the producer's token (401). The producer is never ready,
/// counts its retries, says why, and publishes nothing; restarted with the right key it
/// publishes every event written meanwhile, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_keeps_the_producer_unready_and_loses_nothing() {
    let world = World::start().await;
    let events = world.events();
    let mut writer = Writer::new(5, 43);
    let collector = Collector::start(&world.bus);
    let mut refused = world.spawn_with_wrong_key();
    writer.write(&events, 60, 12).await;
    let p = &refused;
    wait_until(Duration::from_secs(20), || async move {
        p.metric(names::RETRIES).await >= 2.0 && !p.is_ready().await
    })
    .await;
    let logs = refused.logs();
    assert!(
        logs.contains("401") || logs.contains("InvalidSignature"),
        "the refusal is named:\n{logs}"
    );
    assert_eq!(refused.metric(names::EVENTS_PUBLISHED).await, 0.0);
    stop(&mut refused).await;

    let mut producer = world.spawn(tuning());
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    wait_distinct(&collector, 60, DEADLINE).await;
    stop(&mut producer).await;
    collector.stop().await.check(&writer.expected()).unwrap();
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

/// SIGTERM while the database hangs: nothing the producer waits for at shutdown (the drain,
/// the checkpointer's and lease keeper's stop, the final save, the lease release, the client)
/// may wait on it for good; the process exits within its grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_database_hangs_exits_within_the_grace_period() {
    let mut world = World::start().await;
    let events = world.events();
    let mut writer = Writer::new(5, 37);
    let mut producer = world.spawn(ProducerSection {
        lease_ttl: Duration::from_secs(15),
        ..tuning()
    });
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.write(&events, 10, 10).await;
    if let Err(unavailable) = world.mongo.hang_server(true) {
        return unavailable.skip();
    }
    producer.sigterm().unwrap();
    // The tests set `[shutdown] grace_period = "10s"`.
    let exited = producer.wait_exit(Duration::from_secs(15)).await;
    world.mongo.hang_server(false).unwrap().unwrap();
    assert!(
        exited.is_ok(),
        "still running 15 s after SIGTERM\n{}",
        producer.logs()
    );
}

/// SIGTERM while the new term's checkpoint read hangs (the database holds the producer's one
/// `find` for a minute): the read is given up, the lease released and the process exits within
/// its grace period. A ready producer may still be loading its checkpoint (a standby is ready
/// too), so this is where SIGTERM lands when the database hangs right after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_checkpoint_read_hangs_exits_within_the_grace_period() {
    let world = World::start().await;
    // The only `find` the producer sends is the checkpoint read at the start of a term.
    world
        .mongo
        .configure_fail_point(
            "failCommand",
            doc! { "mode": { "times": 1 }, "data": {
                "failCommands": ["find"], "appName": "ordo-producer",
                "blockConnection": true, "blockTimeMS": 60_000,
            } },
        )
        .await
        .unwrap();
    let mut producer = world.spawn(tuning());
    let p = &producer;
    wait_until(Duration::from_secs(30), || async move {
        p.logs().contains("active: publishing")
    })
    .await;
    producer.sigterm().unwrap();
    // The tests set `[shutdown] grace_period = "10s"`.
    let exited = producer.wait_exit(Duration::from_secs(10)).await;
    assert!(
        exited.is_ok(),
        "still running 10 s after SIGTERM\n{}",
        producer.logs()
    );
    let logs = producer.logs();
    assert!(!logs.contains("no checkpoint: applying"), "{logs}");
    assert!(logs.contains("lease released"), "{logs}");
    // The fault fired: the one blocked `find` was the producer's, so one of the same
    // application's now answers at once.
    let mut options = mongodb::options::ClientOptions::parse(world.mongo.uri())
        .await
        .unwrap();
    options.app_name = Some("ordo-producer".into());
    let client = mongodb::Client::with_options(options).unwrap();
    let checkpoints = client
        .database(world.mongo.db_name())
        .collection::<Document>("ordo_checkpoints");
    let answered =
        tokio::time::timeout(Duration::from_secs(5), checkpoints.find_one(doc! {})).await;
    assert!(
        answered.is_ok(),
        "the fail point was not spent by the producer"
    );
}

/// A hung database (SIGSTOP: connections stay open, every command waits) turns `/readyz` off
/// within seconds, not when the producer's own operations give up: a tailing getMore has no
/// deadline, and a lease renewal waits out its timeout. Without the MongoDB ping, readiness
/// took 11.6–14.9 s here. It comes back when the database answers again, and the stream goes
/// on from where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_database_turns_readiness_off_within_seconds() {
    let mut world = World::start().await;
    let events = world.events();
    let mut writer = Writer::new(5, 31);
    let collector = Collector::start(&world.bus);
    // The production lease and waits: the tests' short lease would notice the hang by itself.
    let mut producer = world.spawn(ProducerSection {
        lease_ttl: Duration::from_secs(15),
        max_await_time: Duration::from_secs(1),
        checkpoint_interval: Duration::from_secs(1),
        idle_checkpoint_interval: Duration::from_secs(30),
        ..tuning()
    });
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.write(&events, 10, 10).await;
    if let Err(unavailable) = world.mongo.hang_server(true) {
        return unavailable.skip();
    }
    let hung = std::time::Instant::now();
    let p = &producer;
    wait_until(
        Duration::from_secs(10),
        || async move { !p.is_ready().await },
    )
    .await;
    let took = hung.elapsed();
    world.mongo.hang_server(false).unwrap().unwrap();
    assert!(
        took < Duration::from_secs(6),
        "503 only after {took:?}\n{}",
        producer.logs()
    );
    assert!(
        producer.logs().contains("mongodb did not answer a ping"),
        "{}",
        producer.logs()
    );
    wait_until(
        Duration::from_secs(10),
        || async move { p.is_ready().await },
    )
    .await;
    writer.write(&events, 10, 10).await;
    wait_distinct(&collector, 20, DEADLINE).await;
    stop(&mut producer).await;
    collector.stop().await.check(&writer.expected()).unwrap();
}

/// A standby producer the broker refuses (a wrong key) answers 503, and does not take the
/// lease when the active one stops: a producer with a working key, started after, takes it and
/// publishes. Before, the standby said 200, took the lease, and held it publishing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_the_broker_refuses_is_unready_and_leaves_the_lease_alone() {
    let world = World::start().await;
    let events = world.events();
    let mut writer = Writer::new(4, 47);
    let collector = Collector::start(&world.bus);
    let mut good = world.spawn(tuning());
    good.wait_ready(Duration::from_secs(30)).await.unwrap();
    let mut refused = world.spawn_with_wrong_key();
    let r = &refused;
    wait_until(Duration::from_secs(20), || async move {
        r.logs().contains("not taking the lease") && !r.is_ready().await
    })
    .await;
    stop(&mut good).await;
    let mut next = world.spawn(tuning());
    next.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.write(&events, 20, 10).await;
    wait_distinct(&collector, 20, DEADLINE).await;
    assert_eq!(refused.metric(names::LEASE_HELD).await, 0.0);
    assert_eq!(refused.metric(names::EVENTS_PUBLISHED).await, 0.0);
    stop(&mut next).await;
    stop(&mut refused).await;
    collector.stop().await.check(&writer.expected()).unwrap();
}
