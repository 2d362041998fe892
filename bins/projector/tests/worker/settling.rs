//! Settling: a lost lock stops it; a transient store error is retried in place.

use super::*;

/// A renewal that fails while a batch is applied means the lock is gone: the batch is not
/// written, nothing is settled, the session is closed.
#[tokio::test]
async fn a_lock_lost_during_the_apply_settles_nothing() {
    let mongo = TestMongo::start().await.unwrap();
    let engine = engine(&mongo, |c| {
        c.lock_renewal_interval = Duration::from_millis(100);
        c.apply_delay = Duration::from_millis(400);
    })
    .await;
    let events = workload("l", 2, 5);
    let mut session = FakeSession::of("l-1", &events[5..]);
    session.renewals_ok = Some(0);
    let ops = work(&engine, session).await;
    assert_eq!(ops, vec![Op::Refused("renew"), Op::Close], "{ops:?}");
    assert_eq!(stored(&mongo, "orders", "l-1").await, None);
}

/// A complete refused for a lost lock stops all settling: no complete, abandon or dead-letter
/// follows it; the write stays (the redelivery is a duplicate). Every event the batch wrote
/// counts as applied once, also those whose complete never came: counted at the complete, the
/// applied counter fell short of the events in the read models for good, since their
/// redelivery is a duplicate (a benchmark then waited for events that were long applied).
#[tokio::test]
async fn no_settle_follows_a_lock_loss() {
    let mongo = TestMongo::start().await.unwrap();
    let engine = engine(&mongo, |_| {}).await;
    let events = workload("c", 2, 6);
    let order = &events[6..];
    let mut session = FakeSession::of("c-1", order);
    session.completes_ok = Some(2);
    let ops = work(&engine, session).await;
    assert_eq!(
        ops,
        vec![
            Op::Complete("c-1:1".into()),
            Op::Complete("c-1:2".into()),
            Op::Refused("complete"),
            Op::Close
        ],
        "{ops:?}"
    );
    assert_eq!(
        stored_order(&mongo, "c-1").await.unwrap(),
        expected_order(order)
    );
    let applied = || {
        engine
            .activity
            .applied
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(applied(), order.len() as u64, "every written event counted");
    // The broker redelivers them all: duplicates, not applied again.
    let ops = work(&engine, FakeSession::of("c-1", order)).await;
    assert_eq!(count(&ops, |o| matches!(o, Op::Complete(_))), order.len());
    assert_eq!(
        applied(),
        order.len() as u64,
        "a redelivery is not counted again"
    );
}

/// Transient database errors (a fail point on update and insert) are retried in place while
/// the session is held: everything is applied and completed, nothing dead-lettered.
#[tokio::test]
async fn a_transient_store_error_is_retried_not_dead_lettered() {
    let mongo = TestMongo::start().await.unwrap();
    let engine = engine(&mongo, |c| c.batch_size = 3).await;
    let events = workload("t", 2, 7);
    let order = &events[7..];
    fail_writes(&mongo, 4).await;
    let ops = work(&engine, FakeSession::of("t-1", order)).await;
    assert_applied(&mongo, &ops, "t-1", order).await;
    assert_fail_point_spent(&mongo).await;
}
