//! The producer as a process: every event arrives, in order per aggregate, across restarts,
//! kills, idle periods and shutdown.

mod common;

use std::time::Duration;

use common::*;
use mongodb::bson::Document;
use rand::{rngs::StdRng, Rng, SeedableRng};

const DEADLINE: Duration = Duration::from_secs(120);

/// Events written before the start are published by the `beginning` scan, those written after
/// by the change stream; nothing is lost at the seam and each aggregate is in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_in_order_per_aggregate() {
    let world = World::start().await;
    let (total, aggregates) = workload();
    let mut writer = Writer::new(aggregates, 1);
    let events = world.events();
    writer.write(&events, total / 2, 500).await;
    let collector = Collector::start(&world.bus);
    let mut producer = world.spawn(tuning());
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.write(&events, total - total / 2, 500).await;
    wait_distinct(&collector, total, DEADLINE).await;
    let received = collector.stop().await;
    received.check(&writer.expected()).unwrap();
    assert_eq!(received.distinct(), total);
    stop(&mut producer).await;
}

/// Eight senders share two connections: while the producer publishes everything (before any
/// receiver connects), the emulator never counts more than two connections; then every event
/// arrives, in order per aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_senders_share_two_connections() {
    let world = World::start().await;
    let Ok(emulator) = world.bus.emulator() else {
        eprintln!("skipped: only the embedded emulator counts connections");
        return;
    };
    let (total, aggregates) = workload();
    let mut writer = Writer::new(aggregates, 7);
    writer.write(&world.events(), total, 500).await;
    let mut producer = world.spawn(ProducerSection {
        senders: 8,
        connections: 2,
        ..tuning()
    });
    let deadline = std::time::Instant::now() + DEADLINE;
    let mut most = 0;
    while world.checkpoint().await.map_or(0, |cp| published(&cp)) < total as i64 {
        assert!(std::time::Instant::now() < deadline, "not all published");
        most = most.max(emulator.stats().connections);
        tokio::time::sleep(ordo_testkit::wait::POLL_INTERVAL).await;
    }
    assert!(most <= 2, "{most} connections at once; 2 expected");
    assert!(most >= 1, "no connection seen while publishing");
    let collector = Collector::start(&world.bus);
    wait_distinct(&collector, total, DEADLINE).await;
    let received = collector.stop().await;
    received.check(&writer.expected()).unwrap();
    eprintln!("{total} events published over at most {most} connections");
    stop(&mut producer).await;
}

/// kill -9 five times at seeded random moments while events are being written: after MessageId
/// dedup every aggregate's sequence is exactly 1..n.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_five_times_under_load_loses_nothing() {
    let world = World::start().await;
    let (total, aggregates) = workload();
    let mut writer = Writer::new(aggregates, 2);
    let events = world.events();
    let collector = Collector::start(&world.bus);
    let mut rng = StdRng::seed_from_u64(42);
    let chunk = total / 6;
    let mut producer = world.spawn(tuning());
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    for round in 0..5 {
        writer.write(&events, chunk, 100).await;
        // Kill once a random share of what was written so far reached the topic.
        let target = (writer.written as f64 * rng.random_range(0.3..0.95)) as usize;
        wait_distinct(&collector, target, DEADLINE).await;
        producer.kill9().unwrap();
        let _ = producer.wait_exit(Duration::from_secs(10)).await;
        eprintln!(
            "round {round}: killed after {target} of {} written",
            writer.written
        );
        producer = world.spawn(tuning());
        producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    }
    let rest = total - writer.written;
    writer.write(&events, rest, 100).await;
    wait_distinct(&collector, total, DEADLINE).await;
    let received = collector.stop().await;
    received.check(&writer.expected()).unwrap();
    drop(producer);
}

/// While no event flows, the stream's position still moves (other writes, the producer's own
/// checkpoint and lease writes), and the checkpoint follows it only every
/// `idle_checkpoint_interval`: an idle pipeline does not write a checkpoint every
/// `checkpoint_interval` forever, each write moving the oplog for the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_saves_its_checkpoint_rarely() {
    let world = World::start().await;
    let events = world.events();
    let mut writer = Writer::new(5, 7);
    let collector = Collector::start(&world.bus);
    let mut producer = world.spawn(ProducerSection {
        checkpoint_interval: Duration::from_millis(100),
        idle_checkpoint_interval: Duration::from_secs(30),
        ..tuning()
    });
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.write(&events, 20, 20).await;
    wait_distinct(&collector, 20, DEADLINE).await;
    wait_checkpoint(&world, |cp| published(cp) >= 20).await;
    let name = ordo_core::metrics::CHECKPOINTS_SAVED;
    let before = producer.metric(name).await;
    // A measurement window of idleness, with the oplog moving under it.
    let other = world.mongo.database().collection::<Document>("unrelated");
    for i in 0..30 {
        other
            .insert_one(mongodb::bson::doc! {"x": i})
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let saved = producer.metric(name).await - before;
    assert!(
        saved <= 1.0,
        "{saved} checkpoints saved in 3 s of idleness with checkpoint_interval = 100ms"
    );
    // Events end the idle interval: the next one is saved within checkpoint_interval.
    writer.write(&events, 5, 5).await;
    tokio::time::timeout(
        Duration::from_secs(10),
        wait_checkpoint(&world, |cp| published(cp) >= 25),
    )
    .await
    .expect("new events are checkpointed without waiting out the idle interval");
    // Acknowledged by the broker is not yet received by the collector.
    wait_distinct(&collector, 25, DEADLINE).await;
    stop(&mut producer).await;
    collector.stop().await.check(&writer.expected()).unwrap();
}

/// On a quiet collection the checkpoint keeps moving (postBatchResumeToken), and SIGTERM
/// exits 0 with the checkpoint saved and the lease released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_checkpoint_advances_and_sigterm_saves_it() {
    let world = World::start().await;
    let events = world.events();
    let mut writer = Writer::new(10, 3);
    let collector = Collector::start(&world.bus);
    let mut producer = world.spawn(tuning());
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.write(&events, 50, 50).await;
    wait_distinct(&collector, 50, DEADLINE).await;
    // Wait until the checkpoint covers the last event, then leave the events collection idle.
    let last = wait_checkpoint(&world, |cp| published(cp) >= 50).await;
    // Idle markers are positions, not events: the count stays at what was published.
    assert_eq!(published(&last), 50, "{last:?}");
    // Writes to another collection move the oplog, not the events stream: only the cursor's
    // postBatchResumeToken can carry the checkpoint past them.
    let other = world.mongo.database().collection::<Document>("unrelated");
    for i in 0..3 {
        other
            .insert_one(mongodb::bson::doc! {"x": i})
            .await
            .unwrap();
    }
    let idle = wait_checkpoint(&world, |cp| {
        cp.get("resumeToken") != last.get("resumeToken")
    })
    .await;
    assert!(idle.get_datetime("wallTime").unwrap() >= last.get_datetime("wallTime").unwrap());
    assert_eq!(published(&idle), 50, "idle advances publish nothing");

    stop(&mut producer).await;
    let lease = world
        .mongo
        .database()
        .collection::<Document>("ordo_leases")
        .find_one(mongodb::bson::doc! {})
        .await
        .unwrap()
        .expect("lease document");
    assert_eq!(
        lease.get_datetime("expiresAt").unwrap().timestamp_millis(),
        0,
        "lease released"
    );
    assert!(world
        .checkpoint()
        .await
        .unwrap()
        .get("resumeToken")
        .is_some());
    collector.stop().await.check(&writer.expected()).unwrap();
}
