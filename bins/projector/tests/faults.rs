//! Faults: poison and repair, withheld messages, database fail points, slow projections.

mod common;

use std::time::Duration;

use common::*;
use mongodb::bson::{doc, Document};
use ordo_testkit::{wait_until, wait_until_ok, Daemon};

async fn converge(env: &Env) {
    let expected = env.expected().await;
    let e = &expected;
    let wait = wait_until(Duration::from_secs(90), || async move {
        env.converged(e).await && env.pending() == 0
    });
    if tokio::time::timeout(Duration::from_secs(95), wait)
        .await
        .is_err()
    {
        panic!("{}", env.diff(&expected).await);
    }
}

/// A poison message is dead-lettered, its aggregate blocked and later events withheld; `repair`
/// re-projects it from the events collection and lifts the block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_blocks_the_aggregate_until_repair() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("p", 2, 6);
    env.insert_events(&events).await;
    let order: Vec<Document> = events
        .iter()
        .filter(|e| e.get_str("aggregateId").unwrap() == "p-1")
        .cloned()
        .collect();
    let mut proj = env.spawn_projector(tuning()).await;
    env.publish(&order[..2]).await;
    env.publish_raw("p-1", "p-1:3", b"{not json").await;
    env.publish(&order[3..]).await;
    wait_until(Duration::from_secs(60), || async {
        env.dead_letters().len() == 4
    })
    .await;
    let dl = env.dead_letters();
    assert_eq!(dl[0].message_id.as_deref(), Some("p-1:3"));
    assert_eq!(dl[0].reason.as_deref(), Some("UndecodableMessage"));
    assert!(
        dl[1..]
            .iter()
            .all(|d| d.reason.as_deref() == Some("AggregateBlocked")),
        "{dl:?}"
    );
    let blocked = env
        .mongo
        .database()
        .collection::<Document>("ordo_blocked")
        .find_one(doc! { "_id": "p-1" })
        .await
        .unwrap()
        .expect("blocked record");
    assert_eq!(blocked.get_i64("blockedAtEventId").unwrap(), 3);
    let models = env.read_models("orders").await;
    assert_eq!(
        models["p-1"].get_i64("lastEventId").unwrap(),
        2,
        "nothing applied over the hole"
    );

    let health = ordo_testkit::free_health_addr();
    let mut repair = Daemon::spawn_with_args(
        &bin(),
        &env.projector_toml(health, &tuning()),
        health,
        &[],
        &["repair", "--aggregate", "p-1"],
    )
    .unwrap();
    let status = repair.wait_exit(Duration::from_secs(60)).await.unwrap();
    assert!(status.success(), "{}", repair.logs());
    let expected = env.expected().await;
    assert_eq!(
        env.read_models("orders").await["p-1"],
        expected["orders"]["p-1"]
    );
    assert_eq!(
        env.mongo
            .database()
            .collection::<Document>("ordo_blocked")
            .count_documents(doc! {})
            .await
            .unwrap(),
        0
    );
    stop(&mut proj).await;
}

/// A message withheld from the topic is filled in from the events collection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withheld_message_is_filled_in_from_the_events_collection() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("g", 4, 8);
    env.insert_events(&events).await;
    let published: Vec<Document> = events
        .iter()
        .filter(|e| e.get_i64("eventId").unwrap() != 4)
        .cloned()
        .collect();
    for e in &published {
        env.publish(std::slice::from_ref(e)).await;
    }
    let _p = env.spawn_projector(tuning()).await;
    converge(&env).await;
    assert!(env.dead_letters().is_empty());
}

/// `readPreference=secondary` in the URI does not send ordo's reads to a replica, whose lag
/// would read as a gap (blocked after `gap_timeout`) or as a stale read model: the stand-in is
/// a one-member replica set with no secondary, so every read that followed the URI would find
/// no server. A withheld event is filled in all the same, and the projector says the setting is
/// ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_read_preference_in_the_uri_is_not_followed() {
    let env = start(Duration::from_secs(5)).await;
    let hello = env
        .mongo
        .database()
        .run_command(doc! { "hello": 1 })
        .await
        .unwrap();
    let set = hello.get_str("setName").expect("a replica set").to_string();
    let direct = env.mongo.uri();
    let secondary = direct.replace(
        "directConnection=true",
        &format!("replicaSet={set}&readPreference=secondary&serverSelectionTimeoutMS=3000"),
    );
    assert_ne!(direct, secondary);
    let events = workload("s", 4, 8);
    env.insert_events(&events).await;
    for e in events.iter().filter(|e| e.get_i64("eventId").unwrap() != 4) {
        env.publish(std::slice::from_ref(e)).await;
    }
    let mut p = env.spawn_unready(|c| c.set("mongodb", "uri", secondary));
    p.wait_ready(Duration::from_secs(30)).await.unwrap();
    converge(&env).await;
    assert!(env.dead_letters().is_empty(), "{:?}", env.dead_letters());
    assert!(
        p.logs().contains("readPreference is ignored"),
        "{}",
        p.logs()
    );
}

/// A fail point on the read-model writes is retried in place, never dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_fail_points_are_retried_not_dead_lettered() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("f", 6, 10);
    env.insert_events(&events).await;
    // On inserts only: the first write of each new read model is one, and nothing else of the
    // projector inserts here (its heartbeat is an update, which on a loaded machine could
    // otherwise use up the failures before any worker wrote). WriteConflict (112) is not a
    // retryable write for the driver, so each of the three failures reaches a worker as an
    // error of its own, whichever of the concurrent inserts meets it. (A retryable code such as
    // 91 would let three concurrent inserts each absorb one failure in the driver's own retry.)
    env.mongo
        .configure_fail_point(
            "failCommand",
            doc! { "mode": { "times": 3 }, "data": { "failCommands": ["insert"], "errorCode": 112 } },
        )
        .await
        .unwrap();
    let p = env.spawn_projector(tuning()).await;
    env.publish(&events).await;
    converge(&env).await;
    assert!(env.dead_letters().is_empty(), "{:?}", env.dead_letters());
    // The fail point fired: the projector's workers (the only inserters) used up its three
    // failures, met each as an error, and retried it.
    let retries = p
        .metric_where(ordo_core::metrics::RETRIES, ("operation", "apply"))
        .await;
    assert!(
        retries >= 3.0,
        "{retries} apply retries counted\n{}",
        p.logs()
    );
    env.mongo
        .database()
        .collection::<mongodb::bson::Document>("fail_point_probe")
        .insert_one(doc! { "probe": 1 })
        .await
        .expect("the fail point still had failures left: the projector did not meet them all");
}

/// A projection slower than the lock duration keeps its session: the lock is renewed during
/// the apply, nothing is redelivered to another worker, nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_slower_than_the_lock_keeps_its_session() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("s", 2, 3);
    env.insert_events(&events).await;
    let _a = env
        .spawn_projector(ProjectorSection {
            apply_delay: Duration::from_secs(7),
            ..tuning()
        })
        .await;
    let _b = env
        .spawn_projector(ProjectorSection {
            apply_delay: Duration::from_secs(7),
            ..tuning()
        })
        .await;
    env.publish(&events).await;
    converge(&env).await;
    assert!(env.dead_letters().is_empty(), "{:?}", env.dead_letters());
}

/// How fast `/readyz` must follow a dependency.
const FOLLOW: Duration = Duration::from_secs(10);

async fn ready(p: &Daemon) -> bool {
    p.is_ready().await
}

/// Waits until `/readyz` says `want`, and returns how long that took.
async fn readiness_becomes(p: &Daemon, want: bool) -> Duration {
    let started = std::time::Instant::now();
    wait_until(FOLLOW, || async { ready(p).await == want }).await;
    started.elapsed()
}

/// A broker outage turns `/readyz` 503 within 10 s, and every reconnect is counted in
/// `ordo_retries_total`; when the broker is back, 200 within 10 s, and work goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_broker() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("rb", 2, 3);
    env.insert_events(&events).await;
    let p = env.spawn_projector(tuning()).await;
    let retries_before = p.metric(ordo_core::metrics::RETRIES).await;
    env.emulator().suspend().await;
    let down = readiness_becomes(&p, false).await;
    let retries = p.metric(ordo_core::metrics::RETRIES).await;
    assert!(retries > retries_before, "{}", p.logs());
    env.emulator().resume().await.unwrap();
    let up = readiness_becomes(&p, true).await;
    eprintln!("broker outage: 503 after {down:?}, 200 again {up:?} after the broker returned");
    env.publish(&events).await;
    converge(&env).await;
}

/// Through a broker outage one session worker at a time tries the broker: 32 workers with the
/// default backoff (2 s at most) retry about once a second, not 16 times, so the retry alert
/// (more than 1/s for 10 min) does not fire on every outage; recovery is still within 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_probed_by_one_worker_at_a_time() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("storm", 2, 3);
    env.insert_events(&events).await;
    let p = env
        .spawn_projector(ProjectorSection {
            max_concurrent_sessions: 32,
            connections: 3,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(2),
            ..tuning()
        })
        .await;
    env.emulator().suspend().await;
    readiness_becomes(&p, false).await;
    // Past the first failures of every worker and the climb of the backoff to its maximum.
    let warm = Duration::from_secs(6);
    tokio::time::sleep(warm).await;
    let before = p.metric(ordo_core::metrics::RETRIES).await;
    // A measurement window, not a wait for an event.
    let window = Duration::from_secs(10);
    tokio::time::sleep(window).await;
    let retries = p.metric(ordo_core::metrics::RETRIES).await - before;
    let rate = retries / window.as_secs_f64();
    eprintln!("broker outage: {retries} retries in {window:?} ({rate:.1}/s) with 32 workers");
    assert!(
        retries >= 2.0,
        "the outage is still probed: {retries}\n{}",
        p.logs()
    );
    assert!(
        rate <= 1.5,
        "{rate:.1} retries/s through an outage\n{}",
        p.logs()
    );
    env.emulator().resume().await.unwrap();
    let up = readiness_becomes(&p, true).await;
    eprintln!("ready again {up:?} after the broker returned");
    env.publish(&events).await;
    converge(&env).await;
    // The 32 workers share 3 connections, and the ones the outage retired are closed: 3 and the
    // probe's once the test's own publisher has gone.
    let envr = &env;
    wait_until_ok(Duration::from_secs(30), || async move {
        match envr.emulator().stats().connections {
            n if n <= 4 => Ok(()),
            n => Err(format!("{n} connections after the outage")),
        }
    })
    .await;
}

/// With `accept_timeout` above the broker's own hold of an accept (60 s on Service Bus, which
/// the emulator keeps here), an idle broker answers an accept only after a minute: readiness
/// must still come within seconds, at start and after an outage, because a worker probing the
/// broker waits for a session only briefly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_does_not_wait_for_a_long_accept_on_an_idle_broker() {
    let env = start_with(Duration::from_secs(5), |cfg| {
        cfg.namespace.session_accept_timeout = Duration::from_secs(60);
    })
    .await;
    let started = std::time::Instant::now();
    let p = env.spawn_unready(|c| {
        c.section(
            "projector",
            &ProjectorSection {
                accept_timeout: Duration::from_secs(70),
                ..tuning()
            },
        )
    });
    let ready_after = readiness_becomes(&p, true).await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "ready {:?} after start on an idle broker",
        started.elapsed()
    );
    env.emulator().suspend().await;
    readiness_becomes(&p, false).await;
    env.emulator().resume().await.unwrap();
    let up = readiness_becomes(&p, true).await;
    eprintln!("idle broker, accept_timeout 70 s: ready {ready_after:?} after start, {up:?} after the outage");
    let events = workload("idle", 2, 3);
    env.insert_events(&events).await;
    env.publish(&events).await;
    converge(&env).await;
}

/// A MongoDB outage turns `/readyz` 503 within 10 s; 200 within 10 s after it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_mongodb() {
    let mut env = start(Duration::from_secs(5)).await;
    if env.mongo.is_external() {
        eprintln!("skipped: cannot stop an external mongodb");
        return;
    }
    let p = env.spawn_projector(tuning()).await;
    env.mongo.kill_server().unwrap();
    let down = readiness_becomes(&p, false).await;
    wait_until(FOLLOW, || async {
        p.logs().contains("mongodb unreachable") || p.logs().contains("mongodb did not answer")
    })
    .await;
    env.mongo.restart_server().await.unwrap().unwrap();
    let up = readiness_becomes(&p, true).await;
    eprintln!("database outage: 503 after {down:?}, 200 again {up:?} after it returned");
}

/// A hung database (SIGSTOP: connections stay open, nothing answers) turns `/readyz` off within
/// seconds; SIGTERM during the hang still ends the process within its grace period (the
/// heartbeat's removal at exit waited on the database for good), and the events published
/// meanwhile are applied by the next projector once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_database_turns_readiness_off_and_does_not_hold_a_shutdown() {
    let mut env = start(Duration::from_secs(5)).await;
    let (before, during) = (workload("h", 3, 4), workload("k", 3, 4));
    env.insert_events(&before).await;
    env.insert_events(&during).await;
    let mut p = env.spawn_projector(tuning()).await;
    env.publish(&before).await;
    // Applied and completed before the hang.
    wait_until(Duration::from_secs(60), || async { env.pending() == 0 }).await;
    if let Err(unavailable) = env.mongo.hang_server(true) {
        return unavailable.skip();
    }
    let hung = std::time::Instant::now();
    env.publish(&during).await;
    let down = readiness_becomes(&p, false).await;
    p.sigterm().unwrap();
    // The tests set `[shutdown] grace_period = "10s"`.
    let exited = p.wait_exit(Duration::from_secs(15)).await;
    let took = hung.elapsed();
    env.mongo.hang_server(false).unwrap().unwrap();
    assert!(
        exited.is_ok(),
        "still running {took:?} after the hang began\n{}",
        p.logs()
    );
    assert!(down < Duration::from_secs(6), "503 only after {down:?}");
    let _next = env.spawn_projector(tuning()).await;
    converge(&env).await;
}

/// Waits until the projector has retried an accept or connect for `reason`, and checks it is
/// not ready meanwhile.
async fn unready_for(p: &Daemon, reason: &str) {
    let series = format!("reason=\"{reason}\"");
    wait_until(Duration::from_secs(30), || async {
        let (_, text) = p.http_get("/metrics").await.unwrap_or_default();
        text.lines()
            .any(|l| l.starts_with(ordo_core::metrics::RETRIES) && l.contains(&series))
    })
    .await;
    assert!(!ready(p).await, "ready while failing with {reason}");
    let (status, _) = p.http_get("/readyz").await.unwrap();
    assert_eq!(status, 503);
}

/// A subscription that does not exist: not ready, the broker's `amqp:not-found` counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_subscription_keeps_the_projector_unready() {
    let env = start(Duration::from_secs(5)).await;
    let p = env.spawn_unready(|c| c.set("servicebus", "subscription", "no-such-subscription"));
    unready_for(&p, "amqp:not-found").await;
}

/// A subscription without sessions: not ready, the broker's `amqp:not-allowed` counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_without_sessions_keeps_the_projector_unready() {
    let env = start_with(Duration::from_secs(5), |cfg| {
        let mut plain = cfg.topics[0].subscriptions[0].clone();
        plain.name = "plain".into();
        plain.requires_session = false;
        cfg.topics[0].subscriptions.push(plain);
    })
    .await;
    let p = env.spawn_unready(|c| c.set("servicebus", "subscription", "plain"));
    unready_for(&p, "amqp:not-allowed").await;
}

/// A wrong key: the broker refuses the CBS token; not ready, counted as `unauthorized`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_keeps_the_projector_unready() {
    let env = start(Duration::from_secs(5)).await;
    let wrong = ordo_testkit::servicebus::with_wrong_key(env.conn());
    let p = env.spawn_unready(|c| c.set("servicebus", "connection_string", wrong));
    unready_for(&p, "unauthorized").await;
}

/// A broker that leaves an accept unanswered: the emulator holds it for 60 s whatever the
/// projector asks, and the projector gives up 2 s after its default 5 s. The cut accept
/// retires its shared connection rather than reusing a client that may be halfway through an
/// attach, and sessions published afterwards are still worked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accept_cut_by_the_client_timeout_leaves_the_worker_usable() {
    let env = start_with(Duration::from_secs(5), |cfg| {
        cfg.namespace.ignore_client_accept_timeout = true;
    })
    .await;
    let p = env
        .spawn_projector(ProjectorSection {
            accept_timeout: ProjectorSection::default().accept_timeout,
            max_concurrent_sessions: 2,
            ..tuning()
        })
        .await;
    wait_until(Duration::from_secs(30), || async {
        p.logs()
            .contains("accept unanswered by the broker; reconnecting")
    })
    .await;
    let events = workload("m5", 4, 3);
    env.insert_events(&events).await;
    env.publish(&events).await;
    converge(&env).await;
    assert!(env.dead_letters().is_empty(), "{:?}", env.dead_letters());
    // Each retired connection is closed: two workers on two connections, and the probe's.
    let envr = &env;
    wait_until_ok(Duration::from_secs(30), || async move {
        match envr.emulator().stats().connections {
            n if n <= 3 => Ok(()),
            n => Err(format!("{n} connections after cut accepts")),
        }
    })
    .await;
}

/// A database fault far longer than `transient_retry_limit` retries: the projector keeps its
/// sessions and retries in place, so the broker's delivery count never reaches its maximum
/// (3 here) and nothing is dead-lettered; every event is applied once the fault is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_database_fault_never_reaches_the_max_delivery_count() {
    let env = start_with(Duration::from_secs(5), |cfg| {
        cfg.namespace.session_accept_timeout = Duration::from_secs(1);
        cfg.topics[0].subscriptions[0].max_delivery_count = 3;
    })
    .await;
    let events = workload("md", 2, 4);
    env.insert_events(&events).await;
    let failures = 40;
    env.mongo
        .configure_fail_point(
            "failCommand",
            // WriteConflict: transient without making the driver rediscover the server, so
            // the 40 failures take seconds, not one server-selection timeout each. Inserts
            // only: the first write of each read model is one, and no other writer of the
            // projector inserts (its heartbeat is an upsert), so the retries metric counts
            // exactly these failures.
            doc! { "mode": { "times": failures }, "data": { "failCommands": ["insert"], "errorCode": 112 } },
        )
        .await
        .unwrap();
    let p = env
        .spawn_projector(ProjectorSection {
            transient_retry_limit: 2,
            max_concurrent_sessions: 2,
            ..tuning()
        })
        .await;
    env.publish(&events).await;
    converge(&env).await;
    assert!(env.dead_letters().is_empty(), "{:?}", env.dead_letters());
    // Every failure met a batch write: each one was retried and counted.
    let retries = p.metric(ordo_core::metrics::RETRIES).await;
    assert!(
        retries >= f64::from(failures),
        "{retries} retries\n{}",
        p.logs()
    );
    env.mongo
        .database()
        .collection::<Document>("fail_point_probe")
        .insert_one(doc! { "probe": 1 })
        .await
        .expect("the fail point is spent");
}
