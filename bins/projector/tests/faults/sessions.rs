//! Sessions under slow work and cut accepts: a projection slower than the lock keeps its
//! session, and an accept the client gives up on leaves the worker usable.

use super::*;

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

/// A subscription whose lock (5 s) is shorter than `lock_renewal_interval` (10 s, the
/// default for Azure's 60 s lock) assumes: renewing on the interval would lose the lock of
/// every batch that takes longer than 5 s, and the messages would be delivered again until
/// dead-lettered. The projector renews every third of the lock the broker granted instead, and
/// warns, naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_shorter_than_the_renewal_interval_is_renewed_in_time_with_a_warning() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("short-lock", 2, 3);
    env.insert_events(&events).await;
    let p = env
        .spawn_projector(ProjectorSection {
            lock_renewal_interval: Duration::from_secs(10),
            apply_delay: Duration::from_secs(7),
            ..tuning()
        })
        .await;
    env.publish(&events).await;
    converge(&env).await;
    assert!(env.dead_letters().is_empty(), "{:?}", env.dead_letters());
    assert!(
        p.logs()
            .contains("projector.lock_renewal_interval is more than half the session lock"),
        "{}",
        p.logs()
    );
    assert_eq!(
        p.metric(ordo_core::metrics::LOCKS_LOST).await,
        0.0,
        "{}",
        p.logs()
    );
    assert!(
        p.metric(ordo_core::metrics::LOCK_RENEWALS).await >= 1.0,
        "{}",
        p.logs()
    );
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
