//! `/readyz` follows each dependency: the broker, a database that fails or hangs, a missing
//! topic, a key the broker refuses (active or standby).

use super::*;

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

/// A broker outage while the producer is idle (connections cut: the broker restarted, a load
/// balancer dropped them) leaves its publishing workers holding sender links on dead
/// connections. Once the broker is back and `/readyz` says 200, the first sends on those links
/// fail at once; they are sent again at once on new links, and readiness stays 200. Before,
/// each such failure held readiness off until its backoff's retry: `/readyz` turned 503 for
/// about 4 s with the broker healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_on_links_of_a_cut_connection_do_not_turn_readiness_off() {
    let world = World::start().await;
    let events = world.events();
    let mut writer = Writer::new(60, 41);
    let collector = Collector::start(&world.bus);
    // The probe notices the outage within seconds; its bound (the interval) is long enough
    // that a probe slowed by a loaded machine after the outage does not count as one (with
    // 1 s, one did, on 2 cores running other tests beside this one).
    let mut producer = world.spawn(ProducerSection {
        probe_interval: Duration::from_secs(3),
        ..tuning()
    });
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    // Events of many aggregates, so that many workers open a link.
    writer.write(&events, 300, 50).await;
    wait_distinct(&collector, 300, DEADLINE).await;

    let p = &producer;
    let twenty = Duration::from_secs(20);
    world.bus.suspend().await.unwrap();
    wait_until(twenty, || async move { !p.is_ready().await }).await;
    world.bus.resume().await.unwrap().unwrap();
    wait_until(twenty, || async move { p.is_ready().await }).await;
    let turned_off = |logs: &str| logs.matches("not ready: dependency failing").count();
    let before = turned_off(&producer.logs());

    writer.write(&events, 300, 50).await;
    wait_distinct(&collector, 600, DEADLINE).await;
    assert_eq!(
        turned_off(&producer.logs()),
        before,
        "readiness turned off after the broker was back\n{}",
        producer.logs()
    );
    // The fault fired: sends on links kept from before the outage failed.
    assert!(
        producer
            .metric_where(names::RETRIES, ("reason", "stale_link"))
            .await
            >= 1.0,
        "no send failed on a link of the cut connections\n{}",
        producer.logs()
    );
    stop(&mut producer).await;
    collector.stop().await.check(&writer.expected()).unwrap();
}
