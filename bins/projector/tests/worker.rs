//! The session worker against a fake broker (the `SessionSource`/`SessionReceiver` traits) and a
//! real database: what it settles, and when it must not.

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{event, projections, workload};
use mongodb::bson::{doc, Document};
use ordo_core::envelope::{Envelope, EventFields};
use ordo_core::projection::fold_history;
use ordo_core::servicebus::receiver::{Delivery, ReceiveError, SessionReceiver, SessionSource};
use ordo_projector::config::ProjectorSection;
use ordo_projector::{Engine, Store};
use ordo_testkit::TestMongo;
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
}

#[derive(Debug, Clone)]
struct Msg {
    id: String,
    body: Vec<u8>,
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
}

fn msg(e: &Document) -> Msg {
    let wire = Envelope::from_event(e, &EventFields::default(), "db", "events")
        .unwrap()
        .to_message();
    Msg {
        id: wire.message_id,
        body: wire.body,
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
            },
            ops,
        )
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
        self.record(Op::Close);
    }
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
    ) -> Result<Option<FakeSession>, ReceiveError> {
        let next = self.sessions.pop_front();
        if next.is_none() {
            self.cancel.cancel();
        }
        Ok(next)
    }
}

async fn engine(mongo: &TestMongo, tune: impl FnOnce(&mut ProjectorSection)) -> Arc<Engine> {
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
    Arc::new(Engine {
        projections: projections(),
        store: Store::new(
            mongo.database(),
            "events",
            "ordo_blocked",
            EventFields::default(),
        ),
        cfg,
        activity: Default::default(),
    })
}

async fn stored(mongo: &TestMongo, coll: &str, id: &str) -> Option<Document> {
    mongo
        .database()
        .collection::<Document>(coll)
        .find_one(doc! { "_id": id })
        .await
        .unwrap()
}

fn expected_order(events: &[Document]) -> Document {
    let p = projections()
        .into_iter()
        .find(|p| p.name() == "orders")
        .unwrap();
    let docs: Vec<Document> = events
        .iter()
        .map(|e| {
            Envelope::from_event(e, &EventFields::default(), "db", "events")
                .unwrap()
                .to_event_document()
                .unwrap()
        })
        .collect();
    let id = events[0].get_str("aggregateId").unwrap();
    let mut d = fold_history(p.as_ref(), id, &docs)
        .unwrap()
        .unwrap()
        .to_document(mongodb::bson::DateTime::now());
    d.remove("lastUpdatedAt");
    d
}

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
    let order: Vec<Msg> = events[5..].iter().map(msg).collect();
    let (mut session, ops) = FakeSession::new("l-1", order);
    session.renewals_ok = Some(0);
    engine
        .work_session(session, &CancellationToken::new())
        .await;
    let ops = ops.lock().unwrap().clone();
    assert_eq!(ops, vec![Op::Refused("renew"), Op::Close], "{ops:?}");
    assert_eq!(stored(&mongo, "orders", "l-1").await, None);
}

/// A complete refused for a lost lock stops all settling: no complete, abandon or dead-letter
/// follows it; the write stays (the redelivery is a duplicate).
#[tokio::test]
async fn no_settle_follows_a_lock_loss() {
    let mongo = TestMongo::start().await.unwrap();
    let engine = engine(&mongo, |_| {}).await;
    let events = workload("c", 2, 6);
    let order = &events[6..];
    let (mut session, ops) = FakeSession::new("c-1", order.iter().map(msg).collect());
    session.completes_ok = Some(2);
    engine
        .work_session(session, &CancellationToken::new())
        .await;
    let ops = ops.lock().unwrap().clone();
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
    let mut doc = stored(&mongo, "orders", "c-1").await.unwrap();
    doc.remove("lastUpdatedAt");
    assert_eq!(doc, expected_order(order));
}

/// Transient database errors (a fail point on update and insert) are retried in place while
/// the session is held: everything is applied and completed, nothing dead-lettered.
#[tokio::test]
async fn a_transient_store_error_is_retried_not_dead_lettered() {
    let mongo = TestMongo::start().await.unwrap();
    let engine = engine(&mongo, |c| c.batch_size = 3).await;
    let events = workload("t", 2, 7);
    let order = &events[7..];
    mongo
        .configure_fail_point(
            "failCommand",
            // WriteConflict: transient, and unlike "shutting down" codes it does not make the
            // driver rediscover the server, which would only slow the test down.
            doc! { "mode": { "times": 4 }, "data": { "failCommands": ["update", "insert"], "errorCode": 112 } },
        )
        .await
        .unwrap();
    let (session, ops) = FakeSession::new("t-1", order.iter().map(msg).collect());
    engine
        .work_session(session, &CancellationToken::new())
        .await;
    let ops = ops.lock().unwrap().clone();
    let completes: Vec<&Op> = ops
        .iter()
        .filter(|o| matches!(o, Op::Complete(_)))
        .collect();
    assert_eq!(completes.len(), order.len(), "{ops:?}");
    assert!(
        !ops.iter()
            .any(|o| matches!(o, Op::DeadLetter(..) | Op::Abandon(_) | Op::Refused(_))),
        "{ops:?}"
    );
    let mut doc = stored(&mongo, "orders", "t-1").await.unwrap();
    doc.remove("lastUpdatedAt");
    assert_eq!(doc, expected_order(order));
}

/// Poison (an undecodable body) is dead-lettered with its reason, the aggregate blocked in
/// `ordo_blocked` and the session state, later messages dead-lettered as blocked, and nothing
/// applied over the hole. Worked through `run_worker` and a fake session source.
#[tokio::test]
async fn poison_is_dead_lettered_and_blocks_the_aggregate() {
    let mongo = TestMongo::start().await.unwrap();
    let engine = engine(&mongo, |_| {}).await;
    let order: Vec<Document> = (1..=5)
        .map(|v| {
            if v == 1 {
                event(
                    "q-1",
                    "Order",
                    1,
                    "OrderCreated",
                    doc! { "customerId": "c" },
                )
            } else {
                event(
                    "q-1",
                    "Order",
                    v,
                    "ItemAddedToOrder",
                    doc! { "sku": format!("s{v}"), "qty": 1, "price": 2.0 },
                )
            }
        })
        .collect();
    let mut msgs: Vec<Msg> = order.iter().map(msg).collect();
    msgs[2].body = b"{not json".to_vec();
    let (session, ops) = FakeSession::new("q-1", msgs);
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
    let ops = ops.lock().unwrap().clone();
    assert_eq!(
        ops,
        vec![
            Op::Complete("q-1:1".into()),
            Op::Complete("q-1:2".into()),
            Op::DeadLetter("q-1:3".into(), "UndecodableMessage".into()),
            Op::SetState("blocked at v3 (UndecodableMessage)".into()),
            Op::DeadLetter("q-1:4".into(), "AggregateBlocked".into()),
            Op::DeadLetter("q-1:5".into(), "AggregateBlocked".into()),
            Op::Close,
        ],
        "{ops:?}"
    );
    let blocked = stored(&mongo, "ordo_blocked", "q-1").await.unwrap();
    assert_eq!(blocked.get_i64("blockedAtEventId").unwrap(), 3);
    assert_eq!(blocked.get_str("reason").unwrap(), "UndecodableMessage");
    let doc = stored(&mongo, "orders", "q-1").await.unwrap();
    assert_eq!(doc.get_i64("lastEventId").unwrap(), 2);
}
