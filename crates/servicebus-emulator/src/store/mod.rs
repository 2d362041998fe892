//! Message stores of queues and subscriptions, one file per behaviour:
//!
//! - `mod.rs` (this file): the types, [`Entity`] and enqueueing.
//! - `queue`: one session's messages in delivery order, and the ordering invariant.
//! - `session`: session locks (grant, renew, release) and session state (its tests in
//!   `session_tests.rs`, beside it).
//! - `deliver`: handing the next message to a link.
//! - `settle`: what a receiver's outcome or a lost lock does to a message.
//! - `deferred`: deferred messages, received by sequence number.
//! - `dead_letter`: moving messages to the dead-letter queue.
//! - `sweep`: expiry of locks and messages.
//! - `inspect`: counters, peek, dead-letter snapshots.
//!
//! Everything here is synchronous and runs under one `std::sync::Mutex` per entity, held only
//! for the bookkeeping of a delivery or settlement (never across an await). The AMQP side
//! (`server`) turns wire events into calls on [`Entity`]; this module knows nothing of the wire.

mod dead_letter;
mod deferred;
mod deliver;
mod inspect;
mod queue;
mod session;
mod settle;
mod sweep;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use fe2o3_amqp_types::{
    messaging::{Body, Message, MessageAnnotations},
    primitives::Value,
};
use tokio::sync::Notify;

pub(crate) use dead_letter::{DEAD_LETTER_DESCRIPTION, DEAD_LETTER_REASON};
use queue::SessionQueue;

/// Messages as stored: the producer's message, decoded once.
pub(crate) type AmqpMessage = Message<Body<Value>>;

/// Identifies one broker-side sender link (a receiver of the client) for lock ownership.
pub(crate) type LinkId = u64;

/// Which store of an entity a link or operation addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// The entity itself.
    Main,
    /// Its `$DeadLetterQueue`.
    DeadLetter,
}

/// Settings of a queue or subscription that drive lock and dead-letter behaviour.
#[derive(Debug, Clone)]
pub(crate) struct EntitySettings {
    pub requires_session: bool,
    pub lock_ms: i64,
    pub max_delivery_count: u32,
    pub dead_letter_on_expiry: bool,
}

/// The receiver that holds a lock, for ownership checks and for the inspection API.
#[derive(Debug, Clone)]
pub(crate) struct Holder {
    pub link: LinkId,
    pub connection: u64,
    pub link_name: Arc<str>,
    pub container: Arc<str>,
}

#[derive(Debug, Clone)]
struct MessageLock {
    token: u128,
    until_ms: i64,
}

/// A message in a store.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub seq: i64,
    pub message: Arc<AmqpMessage>,
    pub enqueued_ms: i64,
    pub expires_ms: i64,
    /// Number of earlier deliveries that did not complete (AMQP header delivery-count).
    pub delivery_count: u32,
    pub session: Arc<str>,
    lock: Option<MessageLock>,
}

impl Stored {
    /// When the message's lock expires, if it is locked.
    pub(crate) fn locked_until_ms(&self) -> Option<i64> {
        self.lock.as_ref().map(|l| l.until_ms)
    }

    pub(crate) fn new(
        seq: i64,
        message: Arc<AmqpMessage>,
        enqueued_ms: i64,
        expires_ms: i64,
        session: Arc<str>,
    ) -> Self {
        Self {
            seq,
            message,
            enqueued_ms,
            expires_ms,
            delivery_count: 0,
            session,
            lock: None,
        }
    }
}

#[derive(Debug)]
struct SessionLock {
    holder: Holder,
    until_ms: i64,
}

/// One store (the entity or its dead-letter queue).
#[derive(Debug, Default)]
pub(crate) struct Store {
    sessions: HashMap<Arc<str>, SessionQueue>,
    /// Unlocked sessions with a message to hand out, by that message's sequence number: what
    /// an accept of the next session picks from, without a scan of every session. At most one
    /// entry per session ([`SessionQueue::indexed`]); kept by `session.rs`.
    available: BTreeSet<(i64, Arc<str>)>,
    /// Session locks by expiry, one entry per locked session; kept by `session.rs`.
    lock_expiry: BTreeSet<(i64, Arc<str>)>,
    tokens: HashMap<u128, (Arc<str>, i64)>,
    deferred: BTreeMap<i64, Stored>,
    /// Lock tokens of deferred messages received by sequence number, to their sequence number.
    deferred_tokens: HashMap<u128, i64>,
    len: usize,
    next_ttl_check_ms: i64,
}

/// What a delivery link should do next.
#[derive(Debug)]
pub(crate) enum Next {
    /// Send this message.
    Deliver(Delivery),
    /// Nothing available now; wait for a notification.
    Empty,
    /// The link's session lock expired or was taken away.
    SessionLockLost,
}

/// A message handed to a receiver, with everything needed to put it on the wire.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub token: u128,
    pub seq: i64,
    pub message: Arc<AmqpMessage>,
    pub enqueued_ms: i64,
    pub delivery_count: u32,
    pub locked_until_ms: i64,
}

/// How a receiver settled a message.
#[derive(Debug, Clone)]
pub(crate) enum Settle {
    Complete,
    Abandon(Option<MessageAnnotations>),
    Defer(Option<MessageAnnotations>),
    DeadLetter {
        reason: Option<String>,
        description: Option<String>,
        properties: Option<MessageAnnotations>,
    },
    /// The link or connection went away without settling (or the broker released the lock).
    Lost,
    /// Taken for delivery but never sent (or released by the receiver): back in line as it was.
    Unsent,
}

/// How a receiver's locks end when its link does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Release {
    /// The receiver closed its link: what it held goes back as it was. Service Bus raises a
    /// delivery count only when a lock is lost, not when its holder gives it back.
    Closed,
    /// The lock expired or the receiver's connection vanished: delivery count + 1.
    Lost,
}

impl Release {
    fn settle(self) -> Settle {
        match self {
            Release::Closed => Settle::Unsent,
            Release::Lost => Settle::Lost,
        }
    }
}

/// Why a session could not be granted.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AcquireError {
    /// The named session is locked by another receiver.
    Locked,
    /// No session has available messages.
    NoneAvailable,
}

/// Why deferred messages could not be received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DeferredError {
    /// No deferred message has this sequence number (in this session), or another receiver
    /// holds its lock.
    NotFound(i64),
    /// The session is not locked by the requesting receiver.
    SessionLockLost,
}

/// Failure of a lock-related management operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockError {
    SessionLockLost,
    MessageLockLost,
}

/// A queue or subscription: the main store plus the dead-letter queue, behind one mutex.
#[derive(Debug)]
pub(crate) struct Entity {
    /// `topic/Subscriptions/sub` (configured spelling) or `queue`.
    pub path: String,
    pub settings: EntitySettings,
    state: Mutex<EntityState>,
    /// Woken when the main store gains available messages or a session lock changes.
    pub notify: Notify,
    /// Woken when the dead-letter queue gains available messages.
    pub dlq_notify: Notify,
    /// Accept-next-session receivers parked here, waiting for a session to become available.
    pub waiting_accepts: std::sync::atomic::AtomicUsize,
}

#[derive(Debug, Default)]
struct EntityState {
    main: Store,
    dlq: Store,
}

impl EntityState {
    fn store(&self, part: Part) -> &Store {
        match part {
            Part::Main => &self.main,
            Part::DeadLetter => &self.dlq,
        }
    }

    fn store_mut(&mut self, part: Part) -> &mut Store {
        match part {
            Part::Main => &mut self.main,
            Part::DeadLetter => &mut self.dlq,
        }
    }

    /// The store of `part` and the dead-letter queue its messages may move to (none for the
    /// dead-letter queue itself).
    fn store_and_dlq(&mut self, part: Part) -> (&mut Store, Option<&mut Store>) {
        match part {
            Part::Main => (&mut self.main, Some(&mut self.dlq)),
            Part::DeadLetter => (&mut self.dlq, None),
        }
    }
}

impl Entity {
    pub(crate) fn new(path: String, settings: EntitySettings) -> Self {
        Self {
            path,
            settings,
            state: Mutex::new(EntityState::default()),
            notify: Notify::new(),
            dlq_notify: Notify::new(),
            waiting_accepts: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EntityState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn notifier(&self, part: Part) -> &Notify {
        match part {
            Part::Main => &self.notify,
            Part::DeadLetter => &self.dlq_notify,
        }
    }

    /// Adds freshly accepted messages (already in sequence order). On a session entity a
    /// message without SessionId cannot be received by anyone, so it goes straight to the
    /// dead-letter queue, as Service Bus does for a topic's session-enabled subscription.
    pub(crate) fn enqueue(&self, messages: impl IntoIterator<Item = Stored>) {
        let mut dlq_grew = false;
        {
            let mut state = self.lock();
            let empty: Arc<str> = Arc::from("");
            for stored in messages {
                let key = match self.settings.requires_session {
                    true if stored.session.is_empty() => {
                        let (reason, description) = dead_letter::SESSION_ID_IS_NULL;
                        dead_letter::push_dead_letter(
                            &mut state.dlq,
                            stored,
                            Some(reason.to_owned()),
                            Some(description.to_owned()),
                        );
                        dlq_grew = true;
                        continue;
                    }
                    true => stored.session.clone(),
                    false => empty.clone(),
                };
                let store = &mut state.main;
                store.next_ttl_check_ms = store.next_ttl_check_ms.min(stored.expires_ms);
                store.len += 1;
                let queue = store.sessions.entry(key.clone()).or_default();
                queue.insert(stored);
                if queue.indexed.is_none() {
                    store.offer(&key);
                }
            }
        }
        if dlq_grew {
            self.dlq_notify.notify_waiters();
        }
        self.notify.notify_waiters();
    }
}
