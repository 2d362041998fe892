//! The fake broker: sessions that hand out their messages in batches and record every call
//! the worker makes, and the sources that hand them out.

use super::*;
use ordo_core::servicebus::receiver::{Delivery, SessionReceiver};

/// What the worker did to the fake broker, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
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
pub(crate) struct Msg {
    pub(crate) id: String,
    pub(crate) body: Vec<u8>,
    /// The `aggregateId` application property.
    pub(crate) aggregate: Option<String>,
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

pub(crate) fn msg(e: &Document) -> Msg {
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
pub(crate) struct FakeSession {
    pub(crate) id: String,
    pub(crate) queue: VecDeque<Msg>,
    pub(crate) ops: Arc<Mutex<Vec<Op>>>,
    /// Renewals fail with a lock loss from this many successful renewals on.
    pub(crate) renewals_ok: Option<usize>,
    /// Completes fail with a lock loss from this many successful completes on.
    pub(crate) completes_ok: Option<usize>,
    pub(crate) lost: bool,
    /// Before handing out batch `.0` (counted from 0), replaces a document: another writer.
    pub(crate) rewrite: Option<(usize, mongodb::Collection<Document>, Document)>,
    pub(crate) batches: usize,
    /// When set, `close` waits for a permit: a broker slow to end the session.
    pub(crate) close_gate: Option<Arc<tokio::sync::Semaphore>>,
    /// When set, `close` panics: a bug while releasing.
    pub(crate) close_panics: bool,
    /// When set, messages arrive this long after a receive asks for them: a broker a round
    /// trip away.
    pub(crate) round_trip: Option<Duration>,
}

impl FakeSession {
    pub(crate) fn new(id: &str, msgs: Vec<Msg>) -> (Self, Arc<Mutex<Vec<Op>>>) {
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
    pub(crate) fn of(id: &str, events: &[Document]) -> Self {
        Self::new(id, events.iter().map(msg).collect()).0
    }

    pub(crate) fn record(&self, op: Op) {
        self.ops.lock().unwrap().push(op);
    }

    pub(crate) fn count(&self, f: impl Fn(&Op) -> bool) -> usize {
        self.ops.lock().unwrap().iter().filter(|o| f(o)).count()
    }

    pub(crate) fn lose(&mut self, what: &'static str) -> Result<(), ReceiveError> {
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

/// Hands out its sessions one by one; once they are gone it cancels the worker.
pub(crate) struct FakeSource {
    pub(crate) sessions: VecDeque<FakeSession>,
    pub(crate) cancel: CancellationToken,
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

/// Sessions shared by every worker of a pool, as a subscription is.
#[derive(Clone)]
pub(crate) struct SharedSource(pub(crate) Arc<Mutex<VecDeque<FakeSession>>>);

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
