//! Blocking an aggregate: events read to fill a gap, the source's own duplicates, refused and
//! oversized read models.

use super::*;

/// An event the producer parked for an invalid field (here a payload that is not a document)
/// is read to fill a gap: the aggregate is blocked at it with a reason naming the source
/// document, the message that led there is dead-lettered once, nothing is abandoned.
#[tokio::test]
async fn an_invalid_event_read_to_fill_a_gap_blocks_the_aggregate_once() {
    let mongo = TestMongo::start().await.unwrap();
    let engine = engine(&mongo, |_| {}).await;
    let order: Vec<Document> = workload("h", 2, 3)[3..].to_vec();
    let mut bad = order[1].clone();
    bad.insert("_id", "bad-event-2");
    bad.insert("payload", "not a document");
    let blocked =
        blocked_by_gap_filling(&mongo, &engine, &order, vec![bad], "InvalidSourceEvent").await;
    assert_eq!(blocked.get_i64("blockedAtEventId").unwrap(), 2);
    assert_eq!(blocked.get_str("reason").unwrap(), "InvalidSourceEvent");
    let description = blocked.get_str("description").unwrap();
    assert!(
        description.contains("bad-event-2") && description.contains("payload"),
        "{description}"
    );
    let doc = stored(&mongo, "orders", "h-1").await.unwrap();
    assert_eq!(
        doc.get_i64("lastEventId").unwrap(),
        1,
        "nothing over the hole"
    );
}

/// Works a session of only the first and the last of `order`'s events, over an events
/// collection that holds those two and `between`, so filling the gap reads `between`.
/// Checks that the aggregate is blocked at v2 for `reason` before anything is settled, the first
/// event completed and the last dead-lettered once, and returns the block's record.
async fn blocked_by_gap_filling(
    mongo: &TestMongo,
    engine: &Engine,
    order: &[Document],
    between: Vec<Document>,
    reason: &str,
) -> Document {
    let (first, last) = (&order[0], &order[order.len() - 1]);
    let mut source = vec![first.clone()];
    source.extend(between);
    source.push(last.clone());
    mongo
        .database()
        .collection::<Document>("events")
        .insert_many(source)
        .await
        .unwrap();
    let id = first.get_str("aggregateId").unwrap();
    let ops = work(engine, FakeSession::of(id, &[first.clone(), last.clone()])).await;
    assert_eq!(
        ops,
        vec![
            Op::SetState(format!("blocked at v2 ({reason})")),
            Op::Complete(msg(first).id),
            Op::DeadLetter(msg(last).id, reason.into()),
            Op::Close,
        ],
        "{ops:?}"
    );
    stored(mongo, "ordo_blocked", id).await.unwrap()
}

/// Two source documents with the same (aggregateId, eventId), read to fill a gap: no panic;
/// the aggregate is blocked with a reason naming both documents.
#[tokio::test]
async fn duplicate_versions_in_the_source_block_without_a_panic() {
    let mongo = TestMongo::start().await.unwrap();
    let engine = engine(&mongo, |_| {}).await;
    let order: Vec<Document> = workload("d", 2, 4)[4..].to_vec();
    let mut first = order[1].clone();
    first.insert("_id", "dup-a");
    let mut second = order[1].clone();
    second.insert("_id", "dup-b");
    // v2 twice and no v3: filling v2..v3 finds two documents, as many as it asked for.
    let blocked = blocked_by_gap_filling(
        &mongo,
        &engine,
        &order,
        vec![first, second],
        "DuplicateVersion",
    )
    .await;
    let description = blocked.get_str("description").unwrap();
    assert!(
        description.contains("dup-a") && description.contains("dup-b"),
        "{description}"
    );
}

/// A collection validator that refuses the read model blocks the aggregate at the refused
/// version and dead-letters once; nothing is retried or abandoned.
#[tokio::test]
async fn a_validator_refusing_the_read_model_blocks_the_aggregate() {
    let mongo = TestMongo::start().await.unwrap();
    let engine = engine(&mongo, |_| {}).await;
    mongo
        .database()
        .run_command(doc! {
            "create": "orders",
            "validator": { "customerId": { "$type": "string" } },
        })
        .await
        .unwrap();
    let mut order: Vec<Document> = workload("v", 2, 3)[3..].to_vec();
    order[0]
        .get_document_mut("payload")
        .unwrap()
        .insert("customerId", 42);
    let ops = work(&engine, FakeSession::of("v-1", &order)).await;
    assert_eq!(
        ops,
        vec![
            Op::SetState("blocked at v1 (ReadModelRefused)".into()),
            Op::DeadLetter("v-1:1".into(), "ReadModelRefused".into()),
            Op::DeadLetter("v-1:2".into(), "AggregateBlocked".into()),
            Op::DeadLetter("v-1:3".into(), "AggregateBlocked".into()),
            Op::Close,
        ],
        "{ops:?}"
    );
    let blocked = stored(&mongo, "ordo_blocked", "v-1").await.unwrap();
    assert_eq!(blocked.get_str("projection").unwrap(), "orders");
    assert_eq!(stored(&mongo, "orders", "v-1").await, None);
}

/// A read model past the 16 MB document limit (three 6 MB order lines pushed onto it) is
/// refused: the aggregate is blocked at the first event not stored, nothing loops. In one
/// batch the first write is an insert, which the driver refuses itself; one event per batch
/// grows a stored document until the server refuses the replace (BSONObjectTooLarge).
#[tokio::test]
async fn a_read_model_over_16_mb_blocks_the_aggregate() {
    let mongo = TestMongo::start().await.unwrap();
    let big = "x".repeat(6 * 1024 * 1024);
    let mut order = vec![event(
        "big-1",
        "Order",
        1,
        "OrderCreated",
        doc! { "customerId": "c" },
    )];
    for v in 2..=4 {
        order.push(event(
            "big-1",
            "Order",
            v,
            "ItemAddedToOrder",
            doc! { "sku": format!("{v}{big}"), "qty": 1, "price": 1.0 },
        ));
    }
    for (batch_size, blocked_at) in [(10, 1), (1, 4)] {
        mongo.database().drop().await.unwrap();
        let engine = engine(&mongo, |c| c.batch_size = batch_size).await;
        let (session, ops) = FakeSession::new("big-1", order.iter().map(msg).collect());
        tokio::time::timeout(
            Duration::from_secs(60),
            engine.work_session(session, &CancellationToken::new()),
        )
        .await
        .expect("a refused write is not retried forever");
        let ops = ops_of(&ops);
        let poison = format!("big-1:{blocked_at}");
        assert!(
            ops.contains(&Op::SetState(format!(
                "blocked at v{blocked_at} (ReadModelRefused)"
            ))),
            "{ops:?}"
        );
        assert!(
            ops.contains(&Op::DeadLetter(poison, "ReadModelRefused".into())),
            "{ops:?}"
        );
        assert_eq!(
            count(&ops, |o| matches!(o, Op::Complete(_))),
            blocked_at as usize - 1
        );
        assert_eq!(
            count(&ops, |o| matches!(o, Op::DeadLetter(..))),
            5 - blocked_at as usize
        );
        let blocked = stored(&mongo, "ordo_blocked", "big-1").await.unwrap();
        assert_eq!(blocked.get_i64("blockedAtEventId").unwrap(), blocked_at);
    }
}
