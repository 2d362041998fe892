//! Database faults longer than the retry budget: the session is kept, never abandoned.

use super::*;

/// A database fault that outlasts `transient_retry_limit` keeps the session: the batch is
/// retried in place with the lock renewed, never abandoned (an abandon is a delivery), and
/// applied once the fault is gone.
#[tokio::test]
async fn a_database_fault_outlasting_the_retry_budget_keeps_the_session() {
    let mongo = TestMongo::start().await.unwrap();
    let engine = engine(&mongo, |c| {
        c.transient_retry_limit = 2;
        c.lock_renewal_interval = Duration::from_millis(100);
    })
    .await;
    let events = workload("b", 2, 5);
    let order = &events[5..];
    fail_writes(&mongo, 15).await;
    let ops = work(&engine, FakeSession::of("b-1", order)).await;
    assert!(
        count(&ops, |o| *o == Op::Renew) >= 1,
        "the lock is renewed while the fault lasts: {ops:?}"
    );
    assert_applied(&mongo, &ops, "b-1", order).await;
    assert_fail_point_spent(&mongo).await;
}

/// A database killed for longer than the retry budget: the worker holds the session, renews
/// its lock, settles nothing while the database is gone, and applies everything after it
/// returns.
#[tokio::test]
async fn a_killed_database_is_waited_for_not_abandoned() {
    let mut mongo = TestMongo::start_with(ordo_testkit::SecantusOptions::new().persistent())
        .await
        .unwrap();
    if mongo.is_external() {
        eprintln!("skipped: cannot kill an external mongodb");
        return;
    }
    let engine = engine(&mongo, |c| {
        c.transient_retry_limit = 2;
        c.lock_renewal_interval = Duration::from_millis(200);
    })
    .await;
    let events = workload("k", 2, 4);
    let order = &events[4..];
    let (session, ops) = FakeSession::new("k-1", order.iter().map(msg).collect());
    mongo.kill_server().unwrap();
    let worker = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .work_session(session, &CancellationToken::new())
                .await
        })
    };
    // The outage: far longer than two retries of at most 50 ms.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ops.lock().unwrap().push(Op::Marker("restarted"));
    mongo.restart_server().await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(60), worker)
        .await
        .expect("the worker finishes once the database is back")
        .unwrap();
    let ops = ops_of(&ops);
    let back = ops
        .iter()
        .position(|o| *o == Op::Marker("restarted"))
        .unwrap();
    assert!(
        !ops[..back].iter().any(|o| matches!(o, Op::Complete(_))),
        "nothing completed during the outage: {ops:?}"
    );
    assert!(
        count(&ops[..back], |o| *o == Op::Renew) >= 1,
        "the lock is renewed during the outage: {ops:?}"
    );
    assert_applied(&mongo, &ops, "k-1", order).await;
}
