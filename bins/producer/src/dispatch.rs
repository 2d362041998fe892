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
//! stays owned by the worker meanwhile, so nothing behind it overtakes it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ordo_core::envelope::WireMessage;
use ordo_core::retry::Backoff;
use ordo_core::servicebus::sender::{PublishError, Publisher, PublisherFactory};
use ordo_core::telemetry::Health;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::acks::{AckTracker, Seq};
use crate::Position;

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

    /// The worker is done with `session`: hand it to the next worker if more is queued.
    fn release(&self, session: String) {
        let mut st = self.state.lock().expect("dispatcher lock");
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
    /// Readiness: false while sends fail.
    pub health: Arc<Health>,
    /// Workers currently failing to publish; readiness is true only at zero.
    pub failing: Arc<AtomicUsize>,
    /// Retry delays.
    pub backoff: Backoff,
    /// Fires to abandon queued and in-flight sends at once (lease lost, grace period over).
    pub abandon: CancellationToken,
}

/// Why a worker stopped other than by draining.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The client refused a message it should have accepted: a bug, not a fault.
    #[error("publishing stopped: {0}")]
    Rejected(PublishError),
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
        // The messages move out of their items (no copy per message); the rest of each item,
        // its permits included, stays until the broker acknowledged the batch.
        let (messages, items): (Vec<WireMessage>, Vec<Sent>) = items
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
        let mut delays = ctx.backoff.delays();
        let mut failed = false;
        loop {
            let attempt = async {
                if publisher.is_none() {
                    publisher = Some(factory.open().await?);
                }
                publisher
                    .as_mut()
                    .expect("opened above")
                    .publish(&messages)
                    .await
            };
            let result = tokio::select! {
                r = attempt => r,
                _ = ctx.abandon.cancelled() => {
                    if failed {
                        ctx.failing.fetch_sub(1, Ordering::SeqCst);
                    }
                    return Ok(());
                }
            };
            match result {
                Ok(()) => {
                    if failed {
                        if ctx.failing.fetch_sub(1, Ordering::SeqCst) == 1 {
                            ctx.health.set_ready(true);
                        }
                        tracing::info!(session = %session, "publishing recovered");
                    }
                    break;
                }
                Err(e @ PublishError::Message { .. }) => return Err(WorkerError::Rejected(e)),
                Err(e) => {
                    publisher = None;
                    if !failed {
                        failed = true;
                        ctx.failing.fetch_add(1, Ordering::SeqCst);
                        ctx.health.set_ready(false);
                    }
                    let delay = delays.next().unwrap_or(ctx.backoff.max);
                    metrics::counter!(ordo_core::metrics::RETRIES, "op" => "publish").increment(1);
                    tracing::warn!(session = %session, messages = messages.len(), delay_ms = delay.as_millis() as u64, error = %e, "publish failed, retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = ctx.abandon.cancelled() => {
                            ctx.failing.fetch_sub(1, Ordering::SeqCst);
                            return Ok(());
                        }
                    }
                }
            }
        }
        let now = Instant::now();
        {
            let mut acks = ctx.acks.lock().expect("ack lock");
            for item in &items {
                acks.ack(item.seq);
            }
        }
        metrics::counter!(ordo_core::metrics::EVENTS_PUBLISHED).increment(items.len() as u64);
        let latency = metrics::histogram!(ordo_core::metrics::PUBLISH_LATENCY);
        for item in &items {
            latency.record(now.duration_since(item.read_at).as_secs_f64());
        }
        drop(items);
        ctx.dispatcher.release(session);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use mongodb::bson::doc;
    use ordo_core::envelope::{Envelope, EventFields};

    /// Records what was sent; fails the first `fail_first` publishes; slow for session "slow".
    #[derive(Debug, Default)]
    struct Log {
        sent: Mutex<Vec<(String, i64)>>,
        batches: Mutex<Vec<Vec<String>>>,
        fail_first: AtomicUsize,
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

    fn message(agg: &str, id: i64) -> WireMessage {
        let ev = doc! {"_id": 1, "aggregateId": agg, "eventId": id, "eventType": "T", "payload": {"pad": "x".repeat(id as usize % 7)}};
        Envelope::from_event(&ev, &EventFields::default(), "db", "events")
            .unwrap()
            .to_message()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_stay_in_order_batches_stay_in_one_session_and_all_are_acked() {
        let log = Arc::new(Log::default());
        log.fail_first.store(3, Ordering::SeqCst);
        let dispatcher = Dispatcher::new(50, 1 << 20, 8);
        let acks: Acks = Arc::default();
        let ctx = WorkerContext {
            dispatcher: dispatcher.clone(),
            acks: acks.clone(),
            health: Health::new(),
            failing: Arc::default(),
            backoff: Backoff {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(2),
            },
            abandon: CancellationToken::new(),
        };
        let factory = Arc::new(FakeFactory(log.clone()));
        let workers: Vec<_> = (0..4)
            .map(|_| tokio::spawn(worker(factory.clone(), ctx.clone())))
            .collect();
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
        for w in workers {
            w.await.unwrap().unwrap();
        }
        let sent = log.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 2000);
        let mut seen = HashMap::<String, i64>::new();
        for (agg, id) in sent {
            let last = seen.entry(agg).or_insert(0);
            assert_eq!(id, *last + 1, "per-session order");
            *last = id;
        }
        assert!(log
            .batches
            .lock()
            .unwrap()
            .iter()
            .all(|b| b.iter().all(|s| s == &b[0])));
        let mut acks = acks.lock().unwrap();
        assert_eq!(acks.outstanding(), 0);
        assert_eq!(
            acks.take_checkpoint()
                .map(|p| p.wall_time.timestamp_millis()),
            Some(1999)
        );
    }
}
