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
//! unwind), and is restarted after a backoff by the rule both daemons share
//! (`ordo_core::restart`), so a panic neither loses events nor shrinks the pool.
//!
//! Layout: this file holds the queues ([`Dispatcher`]); `claim` the guard that gives a
//! worker's messages back when it unwinds; `publish` the workers and their supervisor.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use ordo_core::envelope::WireMessage;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::acks::Seq;

mod claim;
mod publish;
#[cfg(test)]
mod tests;

pub use publish::{supervise, worker, WorkerContext, WorkerError};

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
