//! Poison: dead-lettered with its reason, the aggregate blocked, nothing applied over the hole.

use super::*;

/// Poison (an undecodable body) is dead-lettered with its reason, the aggregate blocked in
/// `ordo_blocked` and the session state, later messages dead-lettered as blocked, and nothing
/// applied over the hole. Worked through `run_worker` and a fake session source.
#[tokio::test]
async fn poison_is_dead_lettered_and_blocks_the_aggregate() {
    let mongo = TestMongo::start().await.unwrap();
    let engine = engine(&mongo, |_| {}).await;
    let before = poison_third_of_five(&mongo, &engine, "q-1").await;
    assert_eq!(
        before,
        // The block is recorded before anything is settled: a crash after the poison's
        // dead-letter cannot leave the aggregate open to the events behind it.
        [
            Op::SetState("blocked at v3 (UndecodableMessage)".into()),
            Op::Complete("q-1:1".into()),
            Op::Complete("q-1:2".into()),
        ]
    );
}

/// A poison that starts a batch (batches of two: 1-2, poison-4, 5) is blocked where it stands,
/// after what the read models hold. Before, a batch with no readable event counted nothing as
/// durable and recorded the block at v1.
#[tokio::test]
async fn a_poison_that_starts_a_batch_blocks_after_what_the_models_hold() {
    let mongo = TestMongo::start().await.unwrap();
    let engine = engine(&mongo, |c| c.batch_size = 2).await;
    let before = poison_third_of_five(&mongo, &engine, "q-2").await;
    assert_eq!(
        before,
        [
            Op::Complete("q-2:1".into()),
            Op::Complete("q-2:2".into()),
            Op::SetState("blocked at v3 (UndecodableMessage)".into()),
        ]
    );
}

/// Works one session of order `id`'s five events with the third unreadable. Checks that the
/// poison and the two events behind it were dead-lettered last, before the close, that the
/// block was recorded at v3 for the poison, and that nothing was applied over the hole; returns
/// the session's calls before those dead-letters.
async fn poison_third_of_five(mongo: &TestMongo, engine: &Arc<Engine>, id: &str) -> Vec<Op> {
    let mut msgs: Vec<Msg> = order_events(id, 5).iter().map(msg).collect();
    msgs[2].body = b"{not json".to_vec();
    let (session, ops) = FakeSession::new(id, msgs);
    work_one_session(engine, session).await;
    let ops = ops_of(&ops);
    let (before, last) = ops.split_at(ops.len().saturating_sub(4));
    assert_eq!(
        last,
        [
            Op::DeadLetter(format!("{id}:3"), "UndecodableMessage".into()),
            Op::DeadLetter(format!("{id}:4"), "AggregateBlocked".into()),
            Op::DeadLetter(format!("{id}:5"), "AggregateBlocked".into()),
            Op::Close,
        ],
        "{ops:?}"
    );
    let blocked = stored(mongo, "ordo_blocked", id).await.unwrap();
    assert_eq!(blocked.get_str("reason").unwrap(), "UndecodableMessage");
    assert_eq!(blocked.get_i64("blockedAtEventId").unwrap(), 3);
    let doc = stored(mongo, "orders", id).await.unwrap();
    assert_eq!(
        doc.get_i64("lastEventId").unwrap(),
        2,
        "nothing over the hole"
    );
    before.to_vec()
}
