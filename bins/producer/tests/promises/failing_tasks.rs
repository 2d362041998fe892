//! A task that cannot go on: a checkpoint store that refuses saves for good, lease renewals
//! that hang.

use super::*;

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
