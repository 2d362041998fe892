//! Per-session queues and the workers that publish them.
//!
//! Ordering: one session (aggregate) is owned by at most one worker at a time, and a worker
//! takes the session's queued messages from the front, so the messages of a session reach the
//! broker in read order. Different sessions are published by different workers at once.
//! A batch holds messages of one session only (a partitioned entity requires every message of a
//! batch to share the partition key).
//!
//! Backpressure: [`Dispatcher::submit`] waits for permits on two semaphores (messages and bytes);
//! they are given back when the broker acknowledged the message, so the reader never runs more
//! than the configured amount ahead of the broker.
//!
//! A failed send is retried, forever, with backoff, on a freshly opened publisher; the session
//! stays owned by the worker meanwhile, so nothing behind it overtakes it. A message the client
//! refuses (it can never be sent) is parked in `ordo_parked` and acknowledged as parked; the
//! rest of its batch is sent and its session goes on with the next event.
//!
//! Supervision: the workers run under [`supervise`]. A worker that panics gives its claimed
//! messages back to the front of their session's queue (the claim is a guard, released on
//! unwind), and is restarted after a backoff, so a panic neither loses events nor shrinks the
//! pool.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use ordo_core::envelope::WireMessage;
use ordo_core::retry::Backoff;
use ordo_core::servicebus::sender::{PublishError, Publisher, PublisherFactory};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::acks::{AckTracker, Seq};
use crate::park::{ParkError, ParkMessage};
use crate::Position;
use ordo_core::readiness::{dependency, Readiness};

/// One message waiting for its send.
#[derive(Debug)]
struct Item {
    seq: Seq,
    message: WireMessage,
    read_at: Instant,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// An item whose message is in a send: what is left to acknowledge it.
struct Sent {
    seq: Seq,
    read_at: Instant,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

#[derive(Debug, Default)]
struct State {
    queues: HashMap<String, VecDeque<Item>>,
    /// Sessions with queued messages and no worker.
    ready: VecDeque<String>,
    /// Sessions owned by a worker right now.
    busy: std::collections::HashSet<String>,
    /// No more submissions: workers exit once the queues are empty.
    closed: bool,
}

/// Shared acknowledgement state: the tracker and the count of events published.
pub type Acks = Arc<Mutex<AckTracker<Position>>>;

/// The queues between the reader and the workers.
#[derive(Debug)]
pub struct Dispatcher {
    state: Mutex<State>,
    notify: Notify,
    count: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
    max_batch: usize,
}

impl Dispatcher {
    /// Queues bounded by `max_messages` and `max_bytes`; batches of at most `max_batch`.
    pub fn new(max_messages: usize, max_bytes: usize, max_batch: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            count: Arc::new(Semaphore::new(max_messages)),
            bytes: Arc::new(Semaphore::new(max_bytes)),
            max_bytes,
            max_batch,
        })
    }

    /// Queues `message` (sequence `seq`) behind its session's earlier messages; waits while the
    /// in-flight bounds are reached. Returns false if `cancel` fired first.
    pub async fn submit(&self, seq: Seq, message: WireMessage, cancel: &CancellationToken) -> bool {
        let weight = message.body.len().clamp(1, self.max_bytes) as u32;
        let permits = tokio::select! {
            p = async {
                let c = self.count.clone().acquire_owned().await.expect("never closed");
                let b = self.bytes.clone().acquire_many_owned(weight).await.expect("never closed");
                (c, b)
            } => p,
            _ = cancel.cancelled() => return false,
        };
        let session = message.session_id.clone();
        let item = Item {
            seq,
            message,
            read_at: Instant::now(),
            _permits: permits,
        };
        let mut st = self.state.lock().expect("dispatcher lock");
        st.queues
            .entry(session.clone())
            .or_default()
            .push_back(item);
        if !st.busy.contains(&session) && st.queues[&session].len() == 1 {
            st.ready.push_back(session);
            drop(st);
            self.notify.notify_one();
        }
        true
    }

    /// No more submissions; workers finish the queues and exit.
    pub fn close(&self) {
        self.state.lock().expect("dispatcher lock").closed = true;
        self.notify.notify_waiters();
    }

    /// Messages queued or in a send right now.
    pub fn queued(&self) -> usize {
        let st = self.state.lock().expect("dispatcher lock");
        st.queues.values().map(VecDeque::len).sum()
    }

    /// Takes the next ready session and up to `max_batch` of its messages; `None` when closed
    /// and drained.
    async fn next_work(&self) -> Option<(String, Vec<Item>)> {
        loop {
            let notified = self.notify.notified();
            {
                let mut st = self.state.lock().expect("dispatcher lock");
                if let Some(session) = st.ready.pop_front() {
                    let q = st
                        .queues
                        .get_mut(&session)
                        .expect("ready session has a queue");
                    let n = q.len().min(self.max_batch);
                    let items: Vec<Item> = q.drain(..n).collect();
                    st.busy.insert(session.clone());
                    let more = !st.ready.is_empty();
                    drop(st);
                    if more {
                        self.notify.notify_one();
                    }
                    return Some((session, items));
                }
                if st.closed && st.busy.is_empty() && st.queues.values().all(VecDeque::is_empty) {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// A worker gives `items` back unsent (it is unwinding): they go back to the front of
    /// their queue, in order, and the session to the next worker.
    fn requeue(&self, session: String, items: Vec<Item>) {
        {
            let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let q = st.queues.entry(session.clone()).or_default();
            for item in items.into_iter().rev() {
                q.push_front(item);
            }
        }
        self.release(session);
    }

    /// The worker is done with `session`: hand it to the next worker if more is queued.
    fn release(&self, session: String) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.busy.remove(&session);
        let more = st.queues.get(&session).is_some_and(|q| !q.is_empty());
        if more {
            st.ready.push_back(session);
        } else {
            st.queues.remove(&session);
        }
        let closed = st.closed;
        drop(st);
        if more {
            self.notify.notify_one();
        }
        if closed {
            self.notify.notify_waiters();
        }
    }
}

/// What a worker needs besides its publisher.
#[derive(Debug, Clone)]
pub struct WorkerContext {
    /// The queues.
    pub dispatcher: Arc<Dispatcher>,
    /// Where acknowledgements go.
    pub acks: Acks,
    /// Readiness: not ready while sends fail.
    pub readiness: Arc<Readiness>,
    /// Records messages the client refuses.
    pub parking: Arc<dyn ParkMessage>,
    /// Retry delays (sends and restarts).
    pub backoff: Backoff,
    /// Fires to abandon queued and in-flight sends at once (lease lost, grace period over).
    pub abandon: CancellationToken,
    /// Workers restarted after a panic, this term.
    pub restarts: Arc<AtomicUsize>,
}

/// Why publishing stopped other than by draining.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A refused message could not be recorded in `ordo_parked` (a permanent database error):
    /// passing it would lose it, retrying cannot help.
    #[error("publishing stopped: {0}")]
    Park(#[from] ParkError),
}

/// A session's messages taken by a worker. Dropped before [`Claim::done`] (the worker panicked
/// or was abandoned), it puts the unsent messages back at the front of their queue.
struct Claim {
    dispatcher: Arc<Dispatcher>,
    session: Option<String>,
    messages: Vec<WireMessage>,
    sent: Vec<Sent>,
}

impl Claim {
    fn new(dispatcher: Arc<Dispatcher>, session: String, items: Vec<Item>) -> Self {
        // The messages move out of their items (no copy per message); the rest of each item,
        // its permits included, stays until the broker acknowledged the batch.
        let (messages, sent) = items
            .into_iter()
            .map(|i| {
                (
                    i.message,
                    Sent {
                        seq: i.seq,
                        read_at: i.read_at,
                        _permits: i._permits,
                    },
                )
            })
            .unzip();
        Self {
            dispatcher,
            session: Some(session),
            messages,
            sent,
        }
    }

    fn session(&self) -> &str {
        self.session.as_deref().unwrap_or_default()
    }

    /// Takes message `i` out of the claim (it was parked).
    fn remove(&mut self, i: usize) -> Sent {
        self.messages.remove(i);
        self.sent.remove(i)
    }

    /// Everything left was sent: the session goes to the next worker.
    fn done(mut self) -> Vec<Sent> {
        let sent = std::mem::take(&mut self.sent);
        self.messages.clear();
        if let Some(session) = self.session.take() {
            self.dispatcher.release(session);
        }
        sent
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let items = std::mem::take(&mut self.messages)
            .into_iter()
            .zip(std::mem::take(&mut self.sent))
            .map(|(message, s)| Item {
                seq: s.seq,
                message,
                read_at: s.read_at,
                _permits: s._permits,
            })
            .collect();
        self.dispatcher.requeue(session, items);
    }
}

/// Runs `senders` workers until the dispatcher is closed and drained or `abandon` fires; a
/// worker that panics is restarted after a backoff (its messages were given back). Returns the
/// first [`WorkerError`], which ends publishing.
pub async fn supervise<F: PublisherFactory>(
    senders: usize,
    factory: Arc<F>,
    ctx: WorkerContext,
) -> Result<(), WorkerError> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..senders {
        set.spawn(worker(factory.clone(), ctx.clone()));
    }
    let mut delays = ctx.backoff.delays();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "publishing worker failed: stopping");
                return Err(e);
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                let delay = delays.next().unwrap_or(ctx.backoff.max);
                ctx.restarts.fetch_add(1, Ordering::SeqCst);
                metrics::counter!(ordo_core::metrics::TASK_RESTARTS, "task" => "publisher")
                    .increment(1);
                tracing::error!(error = %crate::task::panic_text(e), delay_ms = delay.as_millis() as u64, "publishing worker panicked: its messages are queued again, restarting it");
                let (factory, ctx) = (factory.clone(), ctx.clone());
                set.spawn(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => worker(factory, ctx).await,
                        _ = ctx.abandon.cancelled() => Ok(()),
                    }
                });
            }
        }
    }
    Ok(())
}

/// Publishes queued sessions until the dispatcher is closed and drained, or `abandon` fires.
pub async fn worker<F: PublisherFactory>(
    factory: Arc<F>,
    ctx: WorkerContext,
) -> Result<(), WorkerError> {
    let mut publisher: Option<F::Publisher> = None;
    loop {
        let work = tokio::select! {
            w = ctx.dispatcher.next_work() => w,
            _ = ctx.abandon.cancelled() => return Ok(()),
        };
        let Some((session, items)) = work else {
            return Ok(());
        };
        metrics::histogram!(ordo_core::metrics::PUBLISH_BATCH_MESSAGES).record(items.len() as f64);
        let mut claim = Claim::new(ctx.dispatcher.clone(), session, items);
        let mut delays = ctx.backoff.delays();
        let mut fault = None;
        while !claim.messages.is_empty() {
            let attempt = async {
                if publisher.is_none() {
                    publisher = Some(factory.open().await?);
                }
                publisher
                    .as_mut()
                    .expect("opened above")
                    .publish(&claim.messages)
                    .await
            };
            let result = tokio::select! {
                r = attempt => r,
                _ = ctx.abandon.cancelled() => return Ok(()),
            };
            match result {
                Ok(()) => {
                    if fault.take().is_some() {
                        tracing::info!(session = %claim.session(), "publishing recovered");
                    }
                    break;
                }
                Err(PublishError::Message { message_id, reason }) => {
                    // The sender names a message of this batch; the messages before it may have
                    // been sent already, and sending them again is deduplicated by MessageId.
                    let i = claim
                        .messages
                        .iter()
                        .position(|m| m.message_id == message_id)
                        .unwrap_or(0);
                    let error = format!("message {message_id} was refused: {reason}");
                    let parked = tokio::select! {
                        r = ctx.parking.park_message(&claim.messages[i], "rejected", error) => r?,
                        _ = ctx.abandon.cancelled() => return Ok(()),
                    };
                    if !parked {
                        return Ok(());
                    }
                    let item = claim.remove(i);
                    ctx.acks.lock().expect("ack lock").ack_parked(item.seq);
                }
                Err(e) => {
                    publisher = None;
                    ctx.readiness.hold(&mut fault, dependency::SERVICEBUS);
                    let delay = delays.next().unwrap_or(ctx.backoff.max);
                    metrics::counter!(ordo_core::metrics::RETRIES, "operation" => "publish", "reason" => e.reason()).increment(1);
                    tracing::warn!(session = %claim.session(), messages = claim.messages.len(), delay_ms = delay.as_millis() as u64, error = %e, "publish failed, retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = ctx.abandon.cancelled() => return Ok(()),
                    }
                }
            }
        }
        let published = claim.messages.len();
        let items = claim.done();
        let now = Instant::now();
        {
            let mut acks = ctx.acks.lock().expect("ack lock");
            for item in &items {
                acks.ack(item.seq);
            }
        }
        metrics::counter!(ordo_core::metrics::EVENTS_PUBLISHED).increment(published as u64);
        let latency = metrics::histogram!(ordo_core::metrics::PUBLISH_LATENCY);
        for item in &items {
            latency.record(now.duration_since(item.read_at).as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::Duration;

    use futures::future::BoxFuture;
    use mongodb::bson::doc;
    use ordo_core::envelope::{Envelope, EventFields};

    /// Records what was sent; fails the first `fail_first` publishes; refuses the messages in
    /// `reject`; panics once on a batch holding a message of `panic_on`.
    #[derive(Debug, Default)]
    struct Log {
        sent: Mutex<Vec<(String, i64)>>,
        batches: Mutex<Vec<Vec<String>>>,
        fail_first: AtomicUsize,
        reject: Mutex<HashSet<String>>,
        panic_on: Mutex<HashSet<String>>,
        panics: AtomicUsize,
        parked: Mutex<Vec<(String, String)>>,
    }

    struct FakeFactory(Arc<Log>);
    struct FakePublisher(Arc<Log>);

    impl Publisher for FakePublisher {
        async fn publish(&mut self, messages: &[WireMessage]) -> Result<(), PublishError> {
            if self
                .0
                .fail_first
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(PublishError::Send("broker down".into()));
            }
            for m in messages {
                if self.0.panic_on.lock().unwrap().remove(&m.message_id) {
                    self.0.panics.fetch_add(1, Ordering::SeqCst);
                    panic!("publisher bug on {}", m.message_id);
                }
                if self.0.reject.lock().unwrap().contains(&m.message_id) {
                    return Err(PublishError::Message {
                        message_id: m.message_id.clone(),
                        reason: "too large".into(),
                    });
                }
            }
            let delay = (messages[0].body.len() % 3) as u64;
            tokio::time::sleep(Duration::from_millis(delay)).await;
            self.0
                .batches
                .lock()
                .unwrap()
                .push(messages.iter().map(|m| m.session_id.clone()).collect());
            let mut sent = self.0.sent.lock().unwrap();
            for m in messages {
                let (agg, id) = m.message_id.rsplit_once(':').unwrap();
                sent.push((agg.to_string(), id.parse().unwrap()));
            }
            Ok(())
        }
    }

    impl PublisherFactory for FakeFactory {
        type Publisher = FakePublisher;
        async fn open(&self) -> Result<FakePublisher, PublishError> {
            Ok(FakePublisher(self.0.clone()))
        }
    }

    #[derive(Debug)]
    struct FakePark(Arc<Log>);

    impl ParkMessage for FakePark {
        fn park_message<'a>(
            &'a self,
            message: &'a WireMessage,
            reason: &'static str,
            error: String,
        ) -> BoxFuture<'a, Result<bool, ParkError>> {
            self.0
                .parked
                .lock()
                .unwrap()
                .push((message.message_id.clone(), format!("{reason}: {error}")));
            Box::pin(async { Ok(true) })
        }
    }

    fn message(agg: &str, id: i64) -> WireMessage {
        let ev = doc! {"_id": 1, "aggregateId": agg, "eventId": id, "eventType": "T", "payload": {"pad": "x".repeat(id as usize % 7)}};
        Envelope::from_event(&ev, &EventFields::default(), "db", "events")
            .unwrap()
            .to_message()
    }

    fn context(log: &Arc<Log>, dispatcher: &Arc<Dispatcher>, acks: &Acks) -> WorkerContext {
        WorkerContext {
            dispatcher: dispatcher.clone(),
            acks: acks.clone(),
            readiness: Readiness::new(),
            parking: Arc::new(FakePark(log.clone())),
            backoff: Backoff {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(2),
            },
            abandon: CancellationToken::new(),
            restarts: Arc::default(),
        }
    }

    /// Submits 2000 events of 37 aggregates (eventIds 1.. per aggregate), closes, and runs
    /// four supervised workers to the end; returns the context for inspection.
    async fn run(log: &Arc<Log>) -> (WorkerContext, Acks) {
        let dispatcher = Dispatcher::new(50, 1 << 20, 8);
        let acks: Acks = Arc::default();
        let ctx = context(log, &dispatcher, &acks);
        let factory = Arc::new(FakeFactory(log.clone()));
        let workers = tokio::spawn(supervise(4, factory, ctx.clone()));
        let cancel = CancellationToken::new();
        let mut next = HashMap::<String, i64>::new();
        for i in 0..2000u64 {
            let agg = format!("a{}", (i * 7919) % 37);
            let id = next.entry(agg.clone()).or_insert(0);
            *id += 1;
            let seq = acks.lock().unwrap().push(Some(Position::test(i)));
            assert!(dispatcher.submit(seq, message(&agg, *id), &cancel).await);
        }
        dispatcher.close();
        workers.await.unwrap().unwrap();
        (ctx, acks)
    }

    /// Every (aggregate, id) sent, in order per aggregate; `skipped` never sent.
    fn check_order(log: &Log, skipped: &[(&str, i64)]) {
        let sent = log.sent.lock().unwrap().clone();
        let distinct: HashSet<_> = sent.iter().cloned().collect();
        assert_eq!(distinct.len(), 2000 - skipped.len());
        let mut seen = HashMap::<String, i64>::new();
        for (agg, id) in sent {
            let last = seen.entry(agg.clone()).or_insert(0);
            let mut want = *last + 1;
            while skipped.contains(&(agg.as_str(), want)) {
                want += 1;
            }
            assert!(
                id == want || id <= *last,
                "per-session order: {agg} {id} after {last}"
            );
            *last = (*last).max(id);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_stay_in_order_batches_stay_in_one_session_and_all_are_acked() {
        let log = Arc::new(Log::default());
        log.fail_first.store(3, Ordering::SeqCst);
        let (ctx, acks) = run(&log).await;
        check_order(&log, &[]);
        assert!(log
            .batches
            .lock()
            .unwrap()
            .iter()
            .all(|b| b.iter().all(|s| s == &b[0])));
        let mut acks = acks.lock().unwrap();
        assert_eq!(acks.outstanding(), 0);
        assert_eq!(
            acks.take()
                .map(|(p, n)| (p.wall_time.timestamp_millis(), n)),
            Some((1999, 2000))
        );
        assert!(
            ctx.readiness.failing().is_empty(),
            "recovered sends clear readiness"
        );
    }

    /// The client refuses one message: it is parked with the client's reason, acknowledged
    /// as parked (not counted as published), and the rest of its session is still published.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_message_is_parked_and_its_session_goes_on() {
        let log = Arc::new(Log::default());
        log.reject.lock().unwrap().insert("a3:5".into());
        let (ctx, acks) = run(&log).await;
        check_order(&log, &[("a3", 5)]);
        let parked = log.parked.lock().unwrap().clone();
        assert_eq!(parked.len(), 1);
        assert_eq!(parked[0].0, "a3:5");
        assert!(parked[0].1.contains("rejected") && parked[0].1.contains("too large"));
        let sent = log.sent.lock().unwrap();
        assert!(sent.contains(&("a3".into(), 6)), "the session went on");
        let mut acks = acks.lock().unwrap();
        assert_eq!(
            acks.outstanding(),
            0,
            "the checkpoint passes the parked message"
        );
        assert_eq!(
            acks.take()
                .map(|(p, n)| (p.wall_time.timestamp_millis(), n)),
            Some((1999, 1999))
        );
        assert_eq!(ctx.restarts.load(Ordering::SeqCst), 0, "no worker died");
    }

    /// A publisher panics in the middle of a session: the worker's messages go back to the
    /// front of their queue, the worker is restarted, and every event still arrives in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_worker_is_restarted_and_loses_nothing() {
        let log = Arc::new(Log::default());
        log.panic_on
            .lock()
            .unwrap()
            .extend(["a3:5".to_string(), "a7:9".to_string()]);
        let (ctx, acks) = run(&log).await;
        assert_eq!(log.panics.load(Ordering::SeqCst), 2, "the fault fired");
        assert_eq!(ctx.restarts.load(Ordering::SeqCst), 2);
        check_order(&log, &[]);
        assert_eq!(acks.lock().unwrap().outstanding(), 0);
    }
}
