//! Restarts that lose nothing: one before the first publish, and one after the history was lost
//! with string `_id`s.

use ordo_testkit::SecantusOptions;

use super::*;

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
