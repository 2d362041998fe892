//! Applying a batch: duplicates, stray aggregates, models left by other writers, conflicts.

use super::*;

/// A batch from v1 is applied without reading the model first (the aggregate is new); when
/// the model exists after all (here a redelivery of v1 and v2 with v3 behind them), the
/// insert's guard catches it: the model is read, v1 and v2 complete as duplicates, v3 is
/// applied once on top.
#[tokio::test]
async fn a_batch_from_v1_over_an_existing_model_is_not_applied_twice() {
    let mongo = TestMongo::start().await.unwrap();
    let engine = engine(&mongo, |_| {}).await;
    let order = order_events("n-1", 3);
    let msgs: Vec<Msg> = order.iter().map(msg).collect();
    let (first, _) = FakeSession::new("n-1", msgs[..2].to_vec());
    work_one_session(&engine, first).await;
    let (again, ops) = FakeSession::new("n-1", msgs);
    work_one_session(&engine, again).await;
    assert_eq!(
        ops_of(&ops),
        vec![
            Op::Complete("n-1:1".into()),
            Op::Complete("n-1:2".into()),
            Op::Complete("n-1:3".into()),
            Op::Close,
        ]
    );
    assert_eq!(
        stored_order(&mongo, "n-1").await.unwrap(),
        expected_order(&order),
        "each event applied once"
    );
}

/// A session that carries two aggregates (a publisher other than ordo-producer, or one from
/// before session ids were made injective): the other aggregate's event is dead-lettered as
/// `ForeignAggregate` before anything else, never folded into this aggregate's model, and this
/// aggregate is neither blocked nor missing an event, wherever the stray event is in the batch.
/// Before, the batch was folded as its first message's aggregate: B's event 2 became A's.
#[tokio::test]
async fn an_event_of_another_aggregate_in_the_session_is_never_folded_in() {
    let mongo = TestMongo::start().await.unwrap();
    let engine = engine(&mongo, |_| {}).await;
    let created =
        |id: &str, v: i64| event(id, "Order", v, "OrderCreated", doc! { "customerId": id });
    let item = |id: &str, v: i64| {
        event(
            id,
            "Order",
            v,
            "ItemAddedToOrder",
            doc! { "sku": "s", "qty": 1, "price": 2.0 },
        )
    };
    for (case, a, b) in [("middle", "mix-a", "mix-b"), ("first", "fst-a", "fst-b")] {
        let events = if case == "middle" {
            vec![created(a, 1), item(b, 2), item(a, 2)]
        } else {
            vec![item(b, 2), created(a, 1), item(a, 2)]
        };
        let (session, ops) = FakeSession::new(a, events.iter().map(msg).collect());
        work_one_session(&engine, session).await;
        let ops = ops_of(&ops);
        assert_eq!(
            ops,
            vec![
                Op::DeadLetter(format!("{b}:2"), "ForeignAggregate".into()),
                Op::Complete(format!("{a}:1")),
                Op::Complete(format!("{a}:2")),
                Op::Close,
            ],
            "{case}"
        );
        let model = stored(&mongo, "orders", a).await.unwrap();
        assert_eq!(
            model.get_i64("lastEventId").unwrap(),
            2,
            "{case}: {model:?}"
        );
        assert!(stored(&mongo, "orders", b).await.is_none(), "{case}");
        assert!(stored(&mongo, "ordo_blocked", a).await.is_none(), "{case}");
        assert!(stored(&mongo, "ordo_blocked", b).await.is_none(), "{case}");
    }
}

/// A read-model document without `lastEventId` (left by another writer) is replaced by the
/// fold, not fought over with a storm of failed guards.
#[tokio::test]
async fn a_read_model_without_a_version_is_replaced_by_the_fold() {
    let mongo = TestMongo::start().await.unwrap();
    let engine = engine(&mongo, |c| c.transient_retry_limit = 2).await;
    let order: Vec<Document> = workload("u", 2, 4)[4..].to_vec();
    mongo
        .database()
        .collection::<Document>("orders")
        .insert_one(doc! { "_id": "u-1", "customerId": "legacy", "status": "imported" })
        .await
        .unwrap();
    let ops = work(&engine, FakeSession::of("u-1", &order)).await;
    assert_applied(&mongo, &ops, "u-1", &order).await;
}

/// An event type no rule handles still records the aggregate's version, so later events need
/// no read to fill a gap.
#[tokio::test]
async fn an_event_type_without_rules_records_progress() {
    let mongo = TestMongo::start().await.unwrap();
    let engine = engine(&mongo, |_| {}).await;
    let noted = event("n-1", "Order", 1, "OrderNoted", doc! {});
    let ops = work(&engine, FakeSession::of("n-1", &[noted])).await;
    assert_eq!(ops, vec![Op::Complete("n-1:1".into()), Op::Close]);
    let doc = stored(&mongo, "orders", "n-1")
        .await
        .expect("the document exists");
    assert_eq!(doc.get_i64("lastEventId").unwrap(), 1);
}

/// When no message of a batch can be read and the session id is the digest of a long
/// aggregate id, the block is recorded under the real id from the `aggregateId` property.
#[tokio::test]
async fn a_block_is_recorded_under_the_real_aggregate_id() {
    let mongo = TestMongo::start().await.unwrap();
    let engine = engine(&mongo, |_| {}).await;
    let long_id = format!("order-{}", "x".repeat(140));
    let first = event(
        &long_id,
        "Order",
        1,
        "OrderCreated",
        doc! { "customerId": "c" },
    );
    let mut m = msg(&first);
    m.body = b"{not json".to_vec();
    m.aggregate = Some(long_id.clone());
    let session_id = ordo_core::envelope::session_id(&long_id);
    assert!(session_id.starts_with("sha256:"));
    let ops = work(&engine, FakeSession::new(&session_id, vec![m]).0).await;
    assert_eq!(
        count(&ops, |o| matches!(o, Op::DeadLetter(..))),
        1,
        "{ops:?}"
    );
    assert!(stored(&mongo, "ordo_blocked", &long_id).await.is_some());
    assert!(stored(&mongo, "ordo_blocked", &session_id).await.is_none());
}

/// A model reloaded after a failed guard can be older than the one the batch was checked
/// against (an operator reset it); the fold of the reloaded model stops at a gap that cannot be
/// filled, and that stop is honoured: nothing past it is completed.
#[tokio::test]
async fn a_stop_found_after_a_conflict_reload_is_honoured() {
    let mongo = TestMongo::start().await.unwrap();
    // Two batches: v1..v3, then v4..v5.
    let engine = engine(&mongo, |c| c.batch_size = 3).await;
    let order: Vec<Document> = workload("r", 2, 5)[5..].to_vec();
    // Only v1 is in the events collection: v2 and v3 arrive by message and cannot be filled in.
    mongo
        .database()
        .collection::<Document>("events")
        .insert_one(order[0].clone())
        .await
        .unwrap();
    let mut reset = expected_order(&order[..1]);
    reset.insert("lastUpdatedAt", mongodb::bson::DateTime::now());
    let mut session = FakeSession::of("r-1", &order);
    session.rewrite = Some((1, mongo.database().collection("orders"), reset));
    let ops = work(&engine, session).await;
    assert!(
        !ops.contains(&Op::Complete("r-1:4".into()))
            && !ops.contains(&Op::Complete("r-1:5".into())),
        "{ops:?}"
    );
    assert!(
        ops.contains(&Op::DeadLetter("r-1:4".into(), "GapNotHealed".into())),
        "{ops:?}"
    );
    let doc = stored(&mongo, "orders", "r-1").await.unwrap();
    assert_eq!(doc.get_i64("lastEventId").unwrap(), 1);
}
