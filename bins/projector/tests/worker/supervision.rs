//! Supervision: a panicking worker is replaced and the others go on.

use super::*;

/// A projection with a bug: it panics on `Explode`.
#[derive(Debug)]
struct Bomb;

impl ordo_projection::Projection for Bomb {
    fn name(&self) -> &str {
        "bomb"
    }
    fn collection(&self) -> &str {
        "bombs"
    }
    fn selects(&self, _aggregate_type: Option<&str>, event_type: &str) -> bool {
        event_type == "Explode"
    }
    fn apply(
        &self,
        _doc: &mut Option<Document>,
        _event: &Document,
    ) -> Result<(), ordo_projection::ApplyError> {
        panic!("a bug in a custom projection")
    }
}

/// A worker that panics (a projection bug) is replaced: the pool keeps its size, the restart
/// is counted, the session count is not left behind, and the other aggregates converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_worker_is_replaced_and_the_others_converge() {
    let mongo = TestMongo::start().await.unwrap();
    let mut all = projections();
    all.push(Arc::new(Bomb));
    let engine = engine_of(&mongo, all, |c| {
        c.max_concurrent_sessions = 2;
        c.lock_renewal_interval = ProjectorSection::default().lock_renewal_interval;
    })
    .await;
    let boom = [event("x-1", "Order", 1, "Explode", doc! {})];
    let (boom_session, _) = FakeSession::new("x-1", boom.iter().map(msg).collect());
    let good = workload("g", 8, 4);
    let mut sessions = VecDeque::from([boom_session]);
    let mut good_ops = Vec::new();
    for id in (0..8).filter(|i| i % 2 == 1).map(|i| format!("g-{i}")) {
        let evs: Vec<Document> = good
            .iter()
            .filter(|e| e.get_str("aggregateId").unwrap() == id)
            .cloned()
            .collect();
        let (s, ops) = FakeSession::new(&id, evs.iter().map(msg).collect());
        sessions.push_back(s);
        good_ops.push((id, evs, ops));
    }
    let source = SharedSource(Arc::new(Mutex::new(sessions)));
    let shutdown = ordo_core::shutdown::Shutdown::new();
    ordo_projector::spawn_workers(&engine, &shutdown, move |_| {
        let source = source.clone();
        async move { Ok::<_, ReceiveError>(source) }
    });
    let e = engine.clone();
    let m = &mongo;
    let good_ref = &good_ops;
    wait_until(Duration::from_secs(60), || {
        let e = e.clone();
        async move {
            use std::sync::atomic::Ordering::Relaxed;
            if e.activity.restarts.load(Relaxed) < 1 || e.activity.workers.load(Relaxed) != 2 {
                return false;
            }
            for (id, evs, _) in good_ref {
                if stored_order(m, id).await != Some(expected_order(evs)) {
                    return false;
                }
            }
            true
        }
    })
    .await;
    shutdown.token.cancel();
    assert_eq!(
        shutdown.drain(Duration::from_secs(10)).await,
        ordo_core::shutdown::Drained::Clean
    );
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(
        engine.activity.restarts.load(Relaxed),
        1,
        "one panic, one restart"
    );
    assert_eq!(engine.activity.sessions_held.load(Relaxed), 0);
    for (id, evs, ops) in &good_ops {
        let ops = ops_of(ops);
        assert_eq!(
            count(&ops, |o| matches!(o, Op::Complete(_))),
            evs.len(),
            "{id}: {ops:?}"
        );
    }
}

/// A worker that panics while one of its sessions is being released leaves that release
/// running: the broker gets the session back when the close is done, not when the
/// connection goes or the lock expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_panics_leaves_its_releases_running() {
    let mongo = TestMongo::start().await.unwrap();
    let mut all = projections();
    all.push(Arc::new(Bomb));
    let engine = engine_of(&mongo, all, |c| {
        c.session_idle_timeout = Duration::from_millis(20);
    })
    .await;
    let (slow, slow_ops, gate) = slow_to_release("slow-release");
    let boom = [event("x-1", "Order", 1, "Explode", doc! {})];
    let (boom_session, _) = FakeSession::new("x-1", boom.iter().map(msg).collect());
    let sessions = vec![slow, boom_session];
    let worker = worker_over(&engine, sessions);
    let ended = tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("the worker meets the bomb");
    assert!(ended.unwrap_err().is_panic(), "the worker panicked");
    assert!(
        !ops_of(&slow_ops).contains(&Op::Close),
        "still being released"
    );
    gate.add_permits(1);
    wait_until(Duration::from_secs(10), || async {
        ops_of(&slow_ops).contains(&Op::Close)
    })
    .await;
}

/// A release that panics (a bug in closing) is counted as a restart, and the worker goes on
/// with its next session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_panics_is_counted_and_the_worker_goes_on() {
    let mongo = TestMongo::start().await.unwrap();
    let engine = engine(&mongo, |c| {
        c.session_idle_timeout = Duration::from_millis(20);
    })
    .await;
    let (mut bad, bad_ops) = FakeSession::new(
        "bad-close",
        order_events("bad-close", 1).iter().map(msg).collect(),
    );
    bad.close_panics = true;
    let (next, next_ops) =
        FakeSession::new("next", order_events("next", 1).iter().map(msg).collect());
    let sessions = vec![bad, next];
    tokio::time::timeout(Duration::from_secs(10), worker_over(&engine, sessions))
        .await
        .expect("the worker returns once its source is exhausted")
        .unwrap();
    assert!(ops_of(&bad_ops)
        .iter()
        .any(|o| matches!(o, Op::Complete(_))));
    assert!(!ops_of(&bad_ops).contains(&Op::Close), "its close panicked");
    assert!(
        ops_of(&next_ops).contains(&Op::Close),
        "the next session was worked"
    );
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(
        engine.activity.restarts.load(Relaxed),
        1,
        "the panic is counted"
    );
}
