//! The session worker against a fake broker (the `SessionSource`/`SessionReceiver` traits) and a
//! real database: what it settles, and when it must not.

#[path = "../common/mod.rs"]
mod common;

mod accept;
mod apply;
mod blocking;
mod faults;
mod poison;
mod settling;
mod supervision;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{as_projected, event, expected_of, projections, workload};
use mongodb::bson::{doc, Document};
use ordo_core::envelope::{Envelope, EventFields};
use ordo_core::servicebus::receiver::{
    Accepted, Delivery, ReceiveError, SessionReceiver, SessionSource,
};
use ordo_projector::config::ProjectorSection;
use ordo_projector::{Engine, Store};
use ordo_testkit::{oracle, wait_until, TestMongo};
use tokio_util::sync::CancellationToken;

/// What the worker did to the fake broker, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Complete(String),
    Abandon(String),
    DeadLetter(String, String),
    Renew,
    SetState(String),
    /// A settle or renewal the fake refused with a lock loss.
    Refused(&'static str),
    Close,
    /// Written by the test itself, to order its own steps among the worker's.
    Marker(&'static str),
}

#[derive(Debug, Clone)]
struct Msg {
    id: String,
    body: Vec<u8>,
    /// The `aggregateId` application property.
    aggregate: Option<String>,
}

impl Delivery for Msg {
    fn body(&self) -> Result<&[u8], String> {
        Ok(&self.body)
    }
    fn message_id(&self) -> Option<String> {
        Some(self.id.clone())
    }
    fn envelope_version(&self) -> Option<i64> {
        Some(1)
    }
    fn delivery_count(&self) -> u32 {
        1
    }
    fn aggregate_id(&self) -> Option<String> {
        self.aggregate.clone()
    }
}

fn msg(e: &Document) -> Msg {
    let wire = Envelope::from_event(e, &EventFields::default(), "db", "events")
        .unwrap()
        .to_message();
    Msg {
        id: wire.message_id,
        body: wire.body,
        aggregate: None,
    }
}

/// One session of the fake broker: hands out its queue in batches and records every call.
struct FakeSession {
    id: String,
    queue: VecDeque<Msg>,
    ops: Arc<Mutex<Vec<Op>>>,
    /// Renewals fail with a lock loss from this many successful renewals on.
    renewals_ok: Option<usize>,
    /// Completes fail with a lock loss from this many successful completes on.
    completes_ok: Option<usize>,
    lost: bool,
    /// Before handing out batch `.0` (counted from 0), replaces a document: another writer.
    rewrite: Option<(usize, mongodb::Collection<Document>, Document)>,
    batches: usize,
    /// When set, `close` waits for a permit: a broker slow to end the session.
    close_gate: Option<Arc<tokio::sync::Semaphore>>,
    /// When set, `close` panics: a bug while releasing.
    close_panics: bool,
    /// When set, messages arrive this long after a receive asks for them: a broker a round
    /// trip away.
    round_trip: Option<Duration>,
}

impl FakeSession {
    fn new(id: &str, msgs: Vec<Msg>) -> (Self, Arc<Mutex<Vec<Op>>>) {
        let ops = Arc::new(Mutex::new(Vec::new()));
        (
            Self {
                id: id.to_string(),
                queue: msgs.into(),
                ops: ops.clone(),
                renewals_ok: None,
                completes_ok: None,
                lost: false,
                rewrite: None,
                batches: 0,
                close_gate: None,
                close_panics: false,
                round_trip: None,
            },
            ops,
        )
    }

    /// A session of `events`' messages, whose calls [`work`] returns.
    fn of(id: &str, events: &[Document]) -> Self {
        Self::new(id, events.iter().map(msg).collect()).0
    }

    fn record(&self, op: Op) {
        self.ops.lock().unwrap().push(op);
    }

    fn count(&self, f: impl Fn(&Op) -> bool) -> usize {
        self.ops.lock().unwrap().iter().filter(|o| f(o)).count()
    }

    fn lose(&mut self, what: &'static str) -> Result<(), ReceiveError> {
        self.lost = true;
        self.record(Op::Refused(what));
        Err(ReceiveError::LockLost(format!("{what}: lock expired")))
    }
}

impl SessionReceiver for FakeSession {
    type Message = Msg;

    fn session_id(&self) -> &str {
        &self.id
    }

    async fn receive(&mut self, max: u32, wait: Duration) -> Result<Vec<Msg>, ReceiveError> {
        if self.lost {
            return Err(ReceiveError::LockLost("receive after lock loss".into()));
        }
        if self.queue.is_empty() {
            // An idle broker answers after the wait.
            tokio::time::sleep(wait).await;
            return Ok(Vec::new());
        }
        if let Some(round_trip) = self.round_trip {
            tokio::time::sleep(round_trip.min(wait)).await;
            if wait < round_trip {
                return Ok(Vec::new());
            }
        }
        if let Some((at, coll, doc)) = &self.rewrite {
            if *at == self.batches {
                coll.replace_one(doc! { "_id": doc.get("_id").unwrap() }, doc.clone())
                    .await
                    .unwrap();
            }
        }
        self.batches += 1;
        let n = (max as usize).min(self.queue.len());
        Ok(self.queue.drain(..n).collect())
    }

    async fn complete(&mut self, m: &Msg) -> Result<(), ReceiveError> {
        let done = self.count(|o| matches!(o, Op::Complete(_)));
        if self.lost || self.completes_ok.is_some_and(|k| done >= k) {
            return self.lose("complete");
        }
        self.record(Op::Complete(m.id.clone()));
        Ok(())
    }

    async fn abandon(&mut self, m: &Msg) -> Result<(), ReceiveError> {
        if self.lost {
            return self.lose("abandon");
        }
        self.record(Op::Abandon(m.id.clone()));
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        m: &Msg,
        reason: &str,
        _description: &str,
    ) -> Result<(), ReceiveError> {
        if self.lost {
            return self.lose("dead_letter");
        }
        self.record(Op::DeadLetter(m.id.clone(), reason.to_string()));
        Ok(())
    }

    async fn renew_lock(&mut self) -> Result<(), ReceiveError> {
        let done = self.count(|o| matches!(o, Op::Renew));
        if self.lost || self.renewals_ok.is_some_and(|k| done >= k) {
            return self.lose("renew");
        }
        self.record(Op::Renew);
        Ok(())
    }

    async fn state(&mut self) -> Result<Vec<u8>, ReceiveError> {
        Ok(Vec::new())
    }

    async fn set_state(&mut self, state: Vec<u8>) -> Result<(), ReceiveError> {
        if self.lost {
            return self.lose("set_state");
        }
        self.record(Op::SetState(String::from_utf8_lossy(&state).into_owned()));
        Ok(())
    }

    async fn close(self) {
        if let Some(gate) = &self.close_gate {
            gate.acquire().await.unwrap().forget();
        }
        assert!(!self.close_panics, "a bug while releasing a session");
        self.record(Op::Close);
    }
}

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

/// Hands out its sessions one by one; once they are gone it cancels the worker.
struct FakeSource {
    sessions: VecDeque<FakeSession>,
    cancel: CancellationToken,
}

impl SessionSource for FakeSource {
    type Session = FakeSession;

    async fn accept_next(
        &mut self,
        _timeout: Duration,
    ) -> Result<Accepted<FakeSession>, ReceiveError> {
        match self.sessions.pop_front() {
            Some(s) => Ok(Accepted::Session(s)),
            None => {
                self.cancel.cancel();
                Ok(Accepted::Idle)
            }
        }
    }
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

/// Sessions shared by every worker of a pool, as a subscription is.
#[derive(Clone)]
struct SharedSource(Arc<Mutex<VecDeque<FakeSession>>>);

impl SessionSource for SharedSource {
    type Session = FakeSession;

    async fn accept_next(
        &mut self,
        timeout: Duration,
    ) -> Result<Accepted<FakeSession>, ReceiveError> {
        let next = self.0.lock().unwrap().pop_front();
        match next {
            Some(s) => Ok(Accepted::Session(s)),
            None => {
                // The broker holds an accept while no session is available.
                tokio::time::sleep(timeout.min(Duration::from_millis(20))).await;
                Ok(Accepted::Idle)
            }
        }
    }
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
