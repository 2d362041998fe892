//! The session worker against a fake broker (the `SessionSource`/`SessionReceiver` traits) and a
//! real database: what it settles, and when it must not.

#[path = "../common/mod.rs"]
mod common;

mod accept;
mod apply;
mod blocking;
mod fake;
mod faults;
mod poison;
mod settling;
mod supervision;

use fake::*;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{as_projected, event, expected_of, projections, workload};
use mongodb::bson::{doc, Document};
use ordo_core::envelope::{Envelope, EventFields};
use ordo_core::servicebus::receiver::{Accepted, ReceiveError, SessionSource};
use ordo_projector::config::ProjectorSection;
use ordo_projector::{Engine, Store};
use ordo_testkit::{oracle, wait_until, TestMongo};
use tokio_util::sync::CancellationToken;

/// A one-event session whose close waits for a permit of the returned gate: a broker slow to
/// end it.
fn slow_to_release(
    id: &str,
) -> (
    FakeSession,
    Arc<Mutex<Vec<Op>>>,
    Arc<tokio::sync::Semaphore>,
) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (mut session, ops) = FakeSession::new(id, order_events(id, 1).iter().map(msg).collect());
    session.close_gate = Some(gate.clone());
    (session, ops, gate)
}

/// Runs one worker over `sessions` on a connection that opens once; the worker is cancelled
/// once they are all handed out, and returns after releasing them.
fn worker_over(engine: &Arc<Engine>, sessions: Vec<FakeSession>) -> tokio::task::JoinHandle<()> {
    let cancel = CancellationToken::new();
    let source = Mutex::new(Some(FakeSource {
        sessions: sessions.into(),
        cancel: cancel.clone(),
    }));
    let connect = move || {
        let s = source.lock().unwrap().take();
        async move { s.ok_or_else(|| ReceiveError::Broker("connected once".into())) }
    };
    tokio::spawn(engine.clone().run_worker(0, connect, cancel))
}

async fn engine(mongo: &TestMongo, tune: impl FnOnce(&mut ProjectorSection)) -> Arc<Engine> {
    engine_of(mongo, projections(), tune).await
}

/// An engine of `projections` over `mongo`, with short waits and retries changed by `tune`.
async fn engine_of(
    mongo: &TestMongo,
    projections: Vec<Arc<dyn ordo_projection::Projection>>,
    tune: impl FnOnce(&mut ProjectorSection),
) -> Arc<Engine> {
    let mut cfg = ProjectorSection {
        batch_size: 10,
        receive_wait: Duration::from_millis(20),
        session_idle_timeout: Duration::from_millis(60),
        lock_renewal_interval: Duration::from_secs(60),
        gap_timeout: Duration::from_millis(200),
        retry_initial: Duration::from_millis(10),
        retry_max: Duration::from_millis(50),
        ..Default::default()
    };
    tune(&mut cfg);
    Arc::new(Engine::new(
        projections,
        Store::new(
            mongo.database(),
            "events",
            "ordo_blocked",
            EventFields::default(),
        ),
        cfg,
    ))
}

async fn stored(mongo: &TestMongo, coll: &str, id: &str) -> Option<Document> {
    mongo
        .database()
        .collection::<Document>(coll)
        .find_one(doc! { "_id": id })
        .await
        .unwrap()
}

/// The order model stored under `id`, without its write time.
async fn stored_order(mongo: &TestMongo, id: &str) -> Option<Document> {
    stored(mongo, "orders", id).await.map(oracle::as_expected)
}

/// Works `session` on its own (no worker loop, never cancelled) and returns its calls.
async fn work(engine: &Engine, session: FakeSession) -> Vec<Op> {
    let ops = session.ops.clone();
    engine
        .work_session(session, &CancellationToken::new())
        .await;
    ops_of(&ops)
}

/// The session of order `id`'s events `order` was worked through: every message completed,
/// none burned a delivery, and the read model is the fold of them all.
async fn assert_applied(mongo: &TestMongo, ops: &[Op], id: &str, order: &[Document]) {
    assert_eq!(
        count(ops, |o| matches!(o, Op::Complete(_))),
        order.len(),
        "{ops:?}"
    );
    assert!(!ops.iter().any(burns_delivery_count), "{ops:?}");
    assert_eq!(
        stored_order(mongo, id).await.unwrap(),
        expected_order(order)
    );
}

/// Fails the next `times` inserts and updates with WriteConflict: transient, and unlike
/// "shutting down" codes it does not make the driver rediscover the server, which would only
/// slow the test down.
async fn fail_writes(mongo: &TestMongo, times: i32) {
    mongo
        .configure_fail_point(
            "failCommand",
            doc! { "mode": { "times": times }, "data": { "failCommands": ["update", "insert"], "errorCode": 112 } },
        )
        .await
        .unwrap();
}

/// The order model `events` (one order's) lead to, without its write time.
fn expected_order(events: &[Document]) -> Document {
    let orders: Vec<_> = projections()
        .into_iter()
        .filter(|p| p.name() == "orders")
        .collect();
    let id = events[0].get_str("aggregateId").unwrap();
    expected_of(&orders, events.iter().map(as_projected))["orders"][id].clone()
}

/// Runs one worker over a source that hands out `session` once, until it is worked.
async fn work_one_session(engine: &Arc<Engine>, session: FakeSession) {
    let cancel = CancellationToken::new();
    let source = Mutex::new(Some(FakeSource {
        sessions: VecDeque::from([session]),
        cancel: cancel.clone(),
    }));
    let connect = || {
        let s = source.lock().unwrap().take();
        async move { s.ok_or_else(|| ReceiveError::Broker("connected once".into())) }
    };
    tokio::time::timeout(
        Duration::from_secs(30),
        engine.clone().run_worker(0, connect, cancel),
    )
    .await
    .expect("the worker stops once the source is exhausted");
}

fn ops_of(ops: &Arc<Mutex<Vec<Op>>>) -> Vec<Op> {
    ops.lock().unwrap().clone()
}

fn count(ops: &[Op], f: impl Fn(&Op) -> bool) -> usize {
    ops.iter().filter(|o| f(o)).count()
}

fn burns_delivery_count(o: &Op) -> bool {
    matches!(o, Op::Abandon(_) | Op::DeadLetter(..) | Op::Refused(_))
}

/// Order `id`'s events v1 to v`n`: created, then one item added by each.
fn order_events(id: &str, n: i64) -> Vec<Document> {
    let mut events = vec![event(
        id,
        "Order",
        1,
        "OrderCreated",
        doc! { "customerId": "c" },
    )];
    events.extend((2..=n).map(|v| {
        event(
            id,
            "Order",
            v,
            "ItemAddedToOrder",
            doc! { "sku": format!("s{v}"), "qty": 1, "price": 2.0 },
        )
    }));
    events
}

/// Proves a `{times: N}` fail point on inserts fired N times: the worker was the only client
/// writing, and an insert now goes through, so every one of the N failures went to it.
async fn assert_fail_point_spent(mongo: &TestMongo) {
    mongo
        .database()
        .collection::<Document>("fail_point_probe")
        .insert_one(doc! { "probe": 1 })
        .await
        .expect("the fail point still had failures left: the worker did not meet them all");
}
