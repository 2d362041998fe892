//! `/readyz` follows each dependency: the broker (an outage, a long accept, a missing or
//! session-less subscription, a wrong key) and MongoDB (failing or hung).

use super::*;

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
    wait_until(Duration::from_secs(30), || async {
        p.metric_where(ordo_core::metrics::RETRIES, ("reason", reason))
            .await
            > 0.0
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
