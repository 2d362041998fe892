//! The producer under injected faults: lost oplog history, a dropped collection, a broker
//! outage, failing getMores, a database restart, a crashed leader. In every case each
//! aggregate's events arrive as exactly 1..n after MessageId dedup. (Invalid events:
//! `promises/parking.rs`.)

mod common;

use std::time::{Duration, Instant};

use common::*;
use mongodb::bson::{doc, Document};
use ordo_core::metrics as names;
use ordo_testkit::{wait_until, SecantusOptions};

const DEADLINE: Duration = Duration::from_secs(90);

/// The saved resume token falls out of the oplog while the producer is down: the restarted
/// producer gets 286, counts it, re-publishes from the collection a safety margin before the
/// checkpoint and then follows the stream; the event count continues from the checkpoint's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_history_is_republished_from_the_collection() {
    let world = World::start_with(SecantusOptions::new().oplog_max_entries(100)).await;
    let events = world.events();
    let mut writer = Writer::new(20, 11);
    let collector = Collector::start(&world.bus);
    let producer_section = ProducerSection {
        history_safety_margin: Duration::from_secs(2),
        ..tuning()
    };
    let mut producer = world.spawn(producer_section.clone());
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.write(&events, 60, 20).await;
    wait_distinct(&collector, 60, DEADLINE).await;
    wait_checkpoint(&world, |cp| published(cp) >= 60).await;
    stop(&mut producer).await;
    let before = world.checkpoint().await.unwrap();
    assert_eq!(published(&before), 60, "{before:?}");

    // More than the oplog holds, most of them new events of the same aggregates.
    writer.write(&events, 250, 25).await;
    // An external deployment cannot have its oplog pruned on demand: skip there.
    match world.mongo.prune_oplog().await {
        Ok(pruned) => pruned.unwrap(),
        Err(unavailable) => return unavailable.skip(),
    }

    let mut producer = world.spawn(producer_section);
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    wait_distinct(&collector, 310, DEADLINE).await;
    let lost = producer.metric(names::HISTORY_LOST).await;
    assert!(lost >= 1.0, "history lost not counted\n{}", producer.logs());
    assert!(
        producer.logs().contains("history lost"),
        "{}",
        producer.logs()
    );
    assert!(producer.metric(names::EVENTS_REPUBLISHED).await >= 250.0);
    // Continues from 60; the replay may repeat events before the checkpoint (the margin).
    wait_checkpoint(&world, |cp| published(cp) >= 310).await;
    stop(&mut producer).await;
    collector.stop().await.check(&writer.expected()).unwrap();
}

/// Updates and deletes in the events collection are not events: skipped, neither parked nor
/// published. Dropping the collection invalidates the stream: the producer says so, re-publishes
/// what the collection holds and follows the events written after the drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_deletes_are_skipped_and_a_dropped_collection_is_followed_again() {
    let world = World::start().await;
    let events = world.events();
    let mut writer = Writer::new(5, 13);
    let collector = Collector::start(&world.bus);
    let mut producer = world.spawn(tuning());
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.write(&events, 20, 20).await;
    wait_distinct(&collector, 20, DEADLINE).await;

    events
        .update_many(doc! {}, doc! { "$set": { "touched": true } })
        .await
        .unwrap();
    events.delete_one(doc! {}).await.unwrap();
    writer.write(&events, 10, 10).await;
    wait_distinct(&collector, 30, DEADLINE).await;
    wait_checkpoint(&world, |cp| published(cp) >= 30).await;
    assert_eq!(producer.metric(names::EVENTS_PARKED).await, 0.0);

    events.drop().await.unwrap();
    let p = &producer;
    wait_until(DEADLINE, || async move {
        p.metric(names::HISTORY_LOST).await >= 1.0
    })
    .await;
    assert!(
        producer.logs().contains("invalidate"),
        "{}",
        producer.logs()
    );
    writer.write(&events, 20, 10).await;
    wait_distinct(&collector, 50, DEADLINE).await;
    stop(&mut producer).await;
    collector.stop().await.check(&writer.expected()).unwrap();
    let parked = world
        .mongo
        .database()
        .collection::<Document>("ordo_parked")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(parked, 0, "nothing parked");
}

/// A 10 s broker outage while events keep coming: readiness is 503 during it and 200 after, and
/// nothing is lost or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_turns_readiness_off_and_loses_nothing() {
    let world = World::start().await;
    let events = world.events();
    let mut writer = Writer::new(30, 12);
    let collector = Collector::start(&world.bus);
    let mut producer = world.spawn(ProducerSection {
        send_timeout: Duration::from_secs(2),
        ..tuning()
    });
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.write(&events, 200, 50).await;
    wait_distinct(&collector, 100, DEADLINE).await;

    let outage = Instant::now();
    world.bus.suspend().await.unwrap();
    writer.write(&events, 200, 50).await;
    let p = &producer;
    wait_until(
        Duration::from_secs(10),
        || async move { !p.is_ready().await },
    )
    .await;
    assert!(producer.try_exit_status().unwrap().is_none());
    // The outage lasts 10 s whatever the producer does.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(outage.elapsed())).await;
    assert!(!producer.is_ready().await, "ready during the outage");
    world.bus.resume().await.unwrap().unwrap();

    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.write(&events, 100, 50).await;
    wait_distinct(&collector, 500, DEADLINE).await;
    assert!(producer.metric(names::RETRIES).await >= 1.0);
    stop(&mut producer).await;
    collector.stop().await.check(&writer.expected()).unwrap();
}

/// Proves a `{times: n}` fail point on getMore was used up by the producer (the only other
/// client issuing getMore): one of our own now succeeds, where it would fail while a use was
/// left.
async fn assert_getmore_fail_point_spent(world: &World) {
    let mut cursor = world.events().find(doc! {}).batch_size(1).await.unwrap();
    assert!(cursor.advance().await.unwrap());
    let next = cursor.advance().await;
    assert!(
        matches!(next, Ok(true)),
        "the getMore fail point is still armed, the producer never hit it: {next:?}"
    );
}

/// getMore fails (connection closed; a resumable error label) and the stream resumes where it
/// was, with nothing lost; each fail point is shown to have fired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_getmore_resumes_the_stream() {
    let world = World::start().await;
    let events = world.events();
    let mut writer = Writer::new(20, 13);
    let collector = Collector::start(&world.bus);
    let mut producer = world.spawn(tuning());
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.write(&events, 50, 25).await;
    wait_distinct(&collector, 50, DEADLINE).await;

    world
        .mongo
        .configure_fail_point(
            "failCommand",
            doc! { "mode": { "times": 2 }, "data": { "failCommands": ["getMore"], "closeConnection": true } },
        )
        .await
        .unwrap();
    writer.write(&events, 100, 25).await;
    wait_distinct(&collector, 150, DEADLINE).await;
    assert_getmore_fail_point_spent(&world).await;

    world
        .mongo
        .configure_fail_point(
            "failCommand",
            doc! { "mode": { "times": 2 }, "data": {
                "failCommands": ["getMore"],
                "errorCode": 91,
                "errorLabels": ["ResumableChangeStreamError"],
            } },
        )
        .await
        .unwrap();
    writer.write(&events, 100, 25).await;
    wait_distinct(&collector, 250, DEADLINE).await;
    assert_getmore_fail_point_spent(&world).await;
    world.mongo.disable_fail_point("failCommand").await.unwrap();
    stop(&mut producer).await;
    collector.stop().await.check(&writer.expected()).unwrap();
}

/// The database is killed and restarted (data kept): the producer retries, readiness drops
/// while it cannot read and stays off across the loss of its lease (the database is down for
/// longer than the lease), and it resumes from its position once the database is back, ready
/// again within 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_restart_resumes_the_stream() {
    let mut world = World::start_with(SecantusOptions::new().persistent()).await;
    let events = world.events();
    let mut writer = Writer::new(20, 14);
    let collector = Collector::start(&world.bus);
    let mut producer = world.spawn(tuning());
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.write(&events, 100, 25).await;
    wait_distinct(&collector, 100, DEADLINE).await;

    if let Err(unavailable) = world.mongo.kill_server() {
        return unavailable.skip();
    }
    let p = &producer;
    wait_until(
        Duration::from_secs(20),
        || async move { !p.is_ready().await },
    )
    .await;
    // The lease runs out while the database is gone; the end of the term must not read as a
    // recovery. Readiness is sampled every 50 ms until the loss is logged and 3 s past it (the
    // standby's first attempts at the lease fail meanwhile).
    let mut past_loss: Option<Instant> = None;
    let watching = Instant::now();
    let mut samples = 0;
    while past_loss.is_none_or(|t| t.elapsed() < Duration::from_secs(3)) {
        assert!(
            watching.elapsed() < Duration::from_secs(30),
            "the lease was never lost while the database was down\n{}",
            producer.logs()
        );
        assert!(
            !producer.is_ready().await,
            "ready while the database is down (sample {samples})\n{}",
            producer.logs()
        );
        samples += 1;
        if past_loss.is_none() && producer.logs().contains("lease lost") {
            past_loss = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        producer
            .logs()
            .contains("lease expired before it could be renewed"),
        "{}",
        producer.logs()
    );
    world.mongo.restart_server().await.unwrap().unwrap();
    wait_until(
        Duration::from_secs(10),
        || async move { p.is_ready().await },
    )
    .await;
    let events = world.events();
    ordo_testkit::wait_until_ok(Duration::from_secs(20), || {
        let events = events.clone();
        async move { events.count_documents(doc! {}).await }
    })
    .await;
    writer.write(&events, 100, 25).await;
    wait_distinct(&collector, 200, DEADLINE).await;
    stop(&mut producer).await;
    collector.stop().await.check(&writer.expected()).unwrap();
}

/// Two producers on one stream: both ready (the standby stands by), one holds the lease. kill -9
/// of the active one: the standby takes over within about the lease TTL and resumes from the
/// checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_after_kill_nine() {
    let world = World::start().await;
    let events = world.events();
    let mut writer = Writer::new(30, 15);
    let collector = Collector::start(&world.bus);
    let short_lease = ProducerSection {
        lease_ttl: Duration::from_secs(2),
        ..tuning()
    };
    let mut a = world.spawn(short_lease.clone());
    let mut b = world.spawn(short_lease);
    a.wait_ready(Duration::from_secs(30)).await.unwrap();
    b.wait_ready(Duration::from_secs(30)).await.unwrap();
    let (ra, rb) = (&a, &b);
    wait_until(Duration::from_secs(20), || async move {
        ra.metric(names::LEASE_HELD).await + rb.metric(names::LEASE_HELD).await == 1.0
    })
    .await;
    let a_active = a.metric(names::LEASE_HELD).await == 1.0;
    let (mut active, standby) = if a_active { (a, b) } else { (b, a) };
    assert!(
        standby.is_ready().await,
        "a standby is ready: able to take over"
    );

    writer.write(&events, 150, 25).await;
    wait_distinct(&collector, 100, DEADLINE).await;
    let checkpoint = wait_checkpoint(&world, |cp| published(cp) > 0).await;
    active.kill9().unwrap();
    let killed = Instant::now();
    let _ = active.wait_exit(Duration::from_secs(10)).await;
    let s = &standby;
    wait_until(Duration::from_secs(15), || async move {
        s.metric(names::LEASE_HELD).await == 1.0
    })
    .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(5), "takeover took {took:?}");
    assert!(standby.is_ready().await);
    writer.write(&events, 150, 25).await;
    wait_distinct(&collector, 300, DEADLINE).await;
    // The new leader continued the count from the checkpoint it resumed from.
    wait_checkpoint(&world, |cp| {
        published(cp) >= published(&checkpoint) + 150 && cp.get_i64("epoch").unwrap_or(0) >= 2
    })
    .await;
    assert!(standby.logs().contains("resuming after the checkpoint"));
    let mut standby = standby;
    stop(&mut standby).await;
    collector.stop().await.check(&writer.expected()).unwrap();
}
