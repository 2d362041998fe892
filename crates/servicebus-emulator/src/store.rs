//! Message stores of queues and subscriptions: sessions, locks, settlement, dead-lettering.
//!
//! Everything here is synchronous and runs under one `std::sync::Mutex` per entity, held only
//! for the bookkeeping of a delivery or settlement (never across an await). The AMQP side
//! (`server`) turns wire events into calls on [`Entity`].
//!
//! Ordering invariant of a [`SessionQueue`]: messages with `seq >= cursor` have never been
//! handed out since they were last released; messages below the cursor are either locked by a
//! receiver or listed in `released`. The next delivery is the smallest released message, else
//! the first message at or after the cursor, so redeliveries always go out before later messages
//! of the same session.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use fe2o3_amqp_types::{
    messaging::{Body, Message, MessageAnnotations},
    primitives::{SimpleValue, Value},
};
use tokio::sync::Notify;

use crate::{
    stats::{DeadLetteredMessage, EntityStats, SessionStats},
    wire,
};

/// Messages as stored: the producer's message, decoded once.
pub(crate) type AmqpMessage = Message<Body<Value>>;

/// Identifies one broker-side sender link (a receiver of the client) for lock ownership.
pub(crate) type LinkId = u64;

/// Current wall-clock time in Unix milliseconds; locks and TTLs are wall-clock like the service.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

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

#[derive(Debug, Default)]
struct SessionQueue {
    messages: BTreeMap<i64, Stored>,
    cursor: i64,
    released: BTreeSet<i64>,
    state: Option<Vec<u8>>,
    lock: Option<SessionLock>,
}

impl SessionQueue {
    fn first_available(&self) -> Option<i64> {
        let released = self.released.first().copied();
        let fresh = self.messages.range(self.cursor..).next().map(|(s, _)| *s);
        match (released, fresh) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn take_next(&mut self) -> Option<i64> {
        if let Some(seq) = self.released.pop_first() {
            return Some(seq);
        }
        let seq = self.messages.range(self.cursor..).next().map(|(s, _)| *s)?;
        self.cursor = seq + 1;
        Some(seq)
    }

    fn insert(&mut self, stored: Stored) {
        let seq = stored.seq;
        self.messages.insert(seq, stored);
        if seq < self.cursor {
            self.released.insert(seq);
        }
    }

    fn is_idle(&self) -> bool {
        self.messages.is_empty() && self.state.is_none() && self.lock.is_none()
    }
}

/// One store (the entity or its dead-letter queue).
#[derive(Debug, Default)]
pub(crate) struct Store {
    sessions: HashMap<Arc<str>, SessionQueue>,
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

const DEAD_LETTER_REASON: &str = "DeadLetterReason";
const DEAD_LETTER_DESCRIPTION: &str = "DeadLetterErrorDescription";

impl Entity {
    pub(crate) fn new(path: String, settings: EntitySettings) -> Self {
        Self {
            path,
            settings,
            state: Mutex::new(EntityState::default()),
            notify: Notify::new(),
            dlq_notify: Notify::new(),
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

    /// Adds freshly accepted messages (already in sequence order).
    pub(crate) fn enqueue(&self, messages: impl IntoIterator<Item = Stored>) {
        {
            let mut state = self.lock();
            let empty: Arc<str> = Arc::from("");
            for stored in messages {
                let key = if self.settings.requires_session {
                    stored.session.clone()
                } else {
                    empty.clone()
                };
                let store = &mut state.main;
                store.next_ttl_check_ms = store.next_ttl_check_ms.min(stored.expires_ms);
                store.len += 1;
                store.sessions.entry(key).or_default().insert(stored);
            }
        }
        self.notify.notify_waiters();
    }

    /// Grants a session lock: the named one, or the unlocked session whose oldest available
    /// message is the oldest of all (so no session starves behind busy ones).
    pub(crate) fn acquire_session(
        &self,
        wanted: Option<&str>,
        holder: &Holder,
        now: i64,
    ) -> Result<(Arc<str>, i64), AcquireError> {
        let until = now + self.settings.lock_ms;
        let mut released_any = false;
        let result = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let store = &mut state.main;
            match wanted {
                Some(id) => {
                    let key: Arc<str> = match store.sessions.get_key_value(id) {
                        Some((k, _)) => k.clone(),
                        None => Arc::from(id),
                    };
                    let queue = store.sessions.entry(key.clone()).or_default();
                    match &queue.lock {
                        Some(lock) if lock.until_ms > now => Err(AcquireError::Locked),
                        _ => {
                            if queue.lock.is_some() {
                                release_session_messages(
                                    &mut state.main,
                                    &mut state.dlq,
                                    &key,
                                    &self.settings,
                                    now,
                                );
                                released_any = true;
                            }
                            let queue = state.main.sessions.get_mut(&key).expect("present");
                            queue.lock = Some(SessionLock {
                                holder: holder.clone(),
                                until_ms: until,
                            });
                            Ok((key, until))
                        }
                    }
                }
                None => {
                    let mut expired = Vec::new();
                    let mut best: Option<(i64, Arc<str>)> = None;
                    for (key, queue) in &store.sessions {
                        if let Some(lock) = &queue.lock {
                            if lock.until_ms > now {
                                continue;
                            }
                            expired.push(key.clone());
                        }
                        if let Some(seq) = queue.first_available() {
                            if best.as_ref().is_none_or(|(b, _)| seq < *b) {
                                best = Some((seq, key.clone()));
                            }
                        }
                    }
                    for key in expired {
                        release_session_messages(
                            &mut state.main,
                            &mut state.dlq,
                            &key,
                            &self.settings,
                            now,
                        );
                        released_any = true;
                    }
                    match best {
                        Some((_, key)) => {
                            let queue = state.main.sessions.get_mut(&key).expect("present");
                            queue.lock = Some(SessionLock {
                                holder: holder.clone(),
                                until_ms: until,
                            });
                            Ok((key, until))
                        }
                        None => Err(AcquireError::NoneAvailable),
                    }
                }
            }
        };
        if released_any {
            self.dlq_notify.notify_waiters();
        }
        result
    }

    /// Picks and locks the next message for a link. `session` is the granted session of a
    /// session receiver; `delete` is receive-and-delete mode (the message leaves on delivery).
    pub(crate) fn next_delivery(
        &self,
        part: Part,
        session: Option<&Arc<str>>,
        link: LinkId,
        delete: bool,
        now: i64,
    ) -> Next {
        let mut dlq_grew = false;
        let next = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let (store, mut dlq) = state.store_and_dlq(part);
            let empty: Arc<str> = Arc::from("");
            let key = session.unwrap_or(&empty);
            let Some(queue) = store.sessions.get_mut(key) else {
                return if session.is_some() {
                    Next::SessionLockLost
                } else {
                    Next::Empty
                };
            };
            let locked_until = match (session, &queue.lock) {
                (Some(_), Some(lock)) if lock.holder.link == link && lock.until_ms > now => {
                    Some(lock.until_ms)
                }
                (Some(_), _) => return Next::SessionLockLost,
                (None, _) => None,
            };
            let mut result = Next::Empty;
            let mut expired = Vec::new();
            while let Some(seq) = queue.take_next() {
                let stored = queue.messages.get_mut(&seq).expect("indexed");
                if stored.expires_ms <= now {
                    expired.push(seq);
                    continue;
                }
                let until = locked_until.unwrap_or(now + self.settings.lock_ms);
                let token = new_token();
                let delivery = Delivery {
                    token,
                    seq,
                    message: stored.message.clone(),
                    enqueued_ms: stored.enqueued_ms,
                    delivery_count: stored.delivery_count,
                    locked_until_ms: until,
                };
                if delete {
                    queue.messages.remove(&seq);
                    store.len -= 1;
                } else {
                    stored.lock = Some(MessageLock {
                        token,
                        until_ms: until,
                    });
                    store.tokens.insert(token, (key.clone(), seq));
                }
                result = Next::Deliver(delivery);
                break;
            }
            for seq in expired {
                let queue = store.sessions.get_mut(key).expect("present");
                if let Some(stored) = queue.messages.remove(&seq) {
                    store.len -= 1;
                    if let (Some(dlq), true) =
                        (dlq.as_deref_mut(), self.settings.dead_letter_on_expiry)
                    {
                        push_dead_letter(
                            dlq,
                            stored,
                            Some("TTLExpiredException".into()),
                            Some("The message expired and was dead lettered.".into()),
                            None,
                        );
                        dlq_grew = true;
                    }
                }
            }
            result
        };
        if dlq_grew {
            self.dlq_notify.notify_waiters();
        }
        next
    }

    /// Applies a receiver's settlement (or the loss of its lock) to a delivered message.
    pub(crate) fn settle(&self, part: Part, token: u128, settle: Settle, now: i64) {
        let _ = self.settle_checked(part, token, settle, now, false);
    }

    /// Applies a receiver's settlement only while it holds the message's lock (and, on a
    /// session entity, the session lock), as Service Bus does; otherwise nothing changes and
    /// the error says which lock is gone.
    pub(crate) fn settle_if_locked(
        &self,
        part: Part,
        token: u128,
        settle: Settle,
        now: i64,
    ) -> Result<(), LockError> {
        self.settle_checked(part, token, settle, now, true)
    }

    fn settle_checked(
        &self,
        part: Part,
        token: u128,
        settle: Settle,
        now: i64,
        check: bool,
    ) -> Result<(), LockError> {
        let (main_grew, dlq_grew) = {
            let mut guard = self.lock();
            let state = &mut *guard;
            if check {
                let sessionful = self.settings.requires_session && part == Part::Main;
                let store = state.store(part);
                lock_held(store, token, sessionful, now)?;
            }
            match part {
                Part::Main => settle_in(
                    &mut state.main,
                    Some(&mut state.dlq),
                    token,
                    settle,
                    &self.settings,
                    now,
                ),
                Part::DeadLetter => {
                    let (grew, _) =
                        settle_in(&mut state.dlq, None, token, settle, &self.settings, now);
                    (false, grew)
                }
            }
        };
        if main_grew {
            self.notify.notify_waiters();
        }
        if dlq_grew {
            self.dlq_notify.notify_waiters();
        }
        Ok(())
    }

    /// Puts back a message a link took but did not send, without waking other links: the same
    /// link picks again right away (used when something earlier in line came back).
    pub(crate) fn put_back(&self, part: Part, token: u128) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let store = state.store_mut(part);
        settle_in(store, None, token, Settle::Unsent, &self.settings, now_ms());
    }

    /// Releases what a closing link still holds: its unsettled messages (delivery count + 1,
    /// ahead of later messages) and its session lock.
    pub(crate) fn release_link(
        &self,
        part: Part,
        tokens: impl IntoIterator<Item = u128>,
        session: Option<&Arc<str>>,
        link: LinkId,
    ) {
        let now = now_ms();
        let mut dlq_grew = false;
        let mut main_grew = false;
        {
            let mut guard = self.lock();
            let state = &mut *guard;
            for token in tokens {
                let (m, d) = lose_lock(state, part, token, &self.settings, now);
                main_grew |= m;
                dlq_grew |= d;
            }
            if let Some(key) = session {
                if let Some(queue) = state.main.sessions.get_mut(key) {
                    if queue.lock.as_ref().is_some_and(|l| l.holder.link == link) {
                        release_session_messages(
                            &mut state.main,
                            &mut state.dlq,
                            key,
                            &self.settings,
                            now,
                        );
                        main_grew = true;
                        dlq_grew = true;
                    }
                }
            }
        }
        if main_grew {
            self.notify.notify_waiters();
        }
        if dlq_grew {
            self.dlq_notify.notify_waiters();
        }
    }

    /// Extends a session lock held by the requesting connection (and link, when named).
    pub(crate) fn renew_session_lock(
        &self,
        session: &str,
        connection: u64,
        link_name: Option<&str>,
        now: i64,
    ) -> Result<i64, LockError> {
        let mut guard = self.lock();
        let lock_ms = self.settings.lock_ms;
        let queue = guard
            .main
            .sessions
            .get_mut(session)
            .ok_or(LockError::SessionLockLost)?;
        let lock = held_lock(queue, connection, link_name, now)?;
        lock.until_ms = now + lock_ms;
        let until = lock.until_ms;
        for stored in queue.messages.values_mut() {
            if let Some(l) = &mut stored.lock {
                l.until_ms = until;
            }
        }
        Ok(until)
    }

    /// Session state; `None` when never set (the wire answer is then an empty binary).
    pub(crate) fn session_state(
        &self,
        session: &str,
        connection: u64,
        link_name: Option<&str>,
        now: i64,
    ) -> Result<Option<Vec<u8>>, LockError> {
        let mut guard = self.lock();
        let queue = guard
            .main
            .sessions
            .get_mut(session)
            .ok_or(LockError::SessionLockLost)?;
        held_lock(queue, connection, link_name, now)?;
        Ok(queue.state.clone())
    }

    /// Replaces the session state; `None` clears it.
    pub(crate) fn set_session_state(
        &self,
        session: &str,
        state: Option<Vec<u8>>,
        connection: u64,
        link_name: Option<&str>,
        now: i64,
    ) -> Result<(), LockError> {
        let mut guard = self.lock();
        let queue = guard
            .main
            .sessions
            .get_mut(session)
            .ok_or(LockError::SessionLockLost)?;
        held_lock(queue, connection, link_name, now)?;
        queue.state = state;
        Ok(())
    }

    /// Extends message locks; session messages follow their session lock.
    pub(crate) fn renew_message_locks(
        &self,
        part: Part,
        tokens: &[u128],
        now: i64,
    ) -> Result<Vec<i64>, LockError> {
        let mut guard = self.lock();
        let lock_ms = self.settings.lock_ms;
        let store = guard.store_mut(part);
        let mut out = Vec::with_capacity(tokens.len());
        for token in tokens {
            if let Some(seq) = store.deferred_tokens.get(token) {
                let lock = store
                    .deferred
                    .get_mut(seq)
                    .and_then(|s| s.lock.as_mut())
                    .filter(|l| l.until_ms > now)
                    .ok_or(LockError::MessageLockLost)?;
                lock.until_ms = now + lock_ms;
                out.push(lock.until_ms);
                continue;
            }
            let (key, seq) = store
                .tokens
                .get(token)
                .ok_or(LockError::MessageLockLost)?
                .clone();
            let queue = store
                .sessions
                .get_mut(&key)
                .ok_or(LockError::MessageLockLost)?;
            let session_until = queue.lock.as_ref().map(|l| l.until_ms);
            let stored = queue
                .messages
                .get_mut(&seq)
                .ok_or(LockError::MessageLockLost)?;
            let lock = stored.lock.as_mut().ok_or(LockError::MessageLockLost)?;
            if lock.until_ms <= now {
                return Err(LockError::MessageLockLost);
            }
            lock.until_ms = if self.settings.requires_session && part == Part::Main {
                session_until.ok_or(LockError::SessionLockLost)?
            } else {
                now + lock_ms
            };
            out.push(lock.until_ms);
        }
        Ok(out)
    }

    /// Receives deferred messages by sequence number: locked (peek-lock, the lock token is
    /// returned) or removed (receive-and-delete). On a session entity the messages must belong
    /// to `session`, which the requesting receiver must hold. All or nothing.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn receive_deferred(
        &self,
        part: Part,
        seqs: &[i64],
        session: Option<&str>,
        peek_lock: bool,
        connection: u64,
        link_name: Option<&str>,
        now: i64,
    ) -> Result<Vec<(Option<u128>, Stored)>, DeferredError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let sessionful = self.settings.requires_session && part == Part::Main;
        let mut until = now + self.settings.lock_ms;
        if sessionful {
            let id = session.ok_or(DeferredError::SessionLockLost)?;
            let queue = state
                .main
                .sessions
                .get_mut(id)
                .ok_or(DeferredError::SessionLockLost)?;
            until = held_lock(queue, connection, link_name, now)
                .map_err(|_| DeferredError::SessionLockLost)?
                .until_ms;
        }
        let store = state.store_mut(part);
        for seq in seqs {
            match store.deferred.get(seq) {
                Some(s)
                    if s.lock.as_ref().is_none_or(|l| l.until_ms <= now)
                        && (!sessionful || session == Some(&*s.session)) => {}
                _ => return Err(DeferredError::NotFound(*seq)),
            }
        }
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            if !peek_lock {
                let stored = store.deferred.remove(seq).expect("checked");
                out.push((None, stored));
                continue;
            }
            let stored = store.deferred.get_mut(seq).expect("checked");
            if let Some(old) = stored.lock.take() {
                store.deferred_tokens.remove(&old.token);
            }
            let token = new_token();
            stored.lock = Some(MessageLock {
                token,
                until_ms: until,
            });
            store.deferred_tokens.insert(token, *seq);
            out.push((Some(token), stored.clone()));
        }
        Ok(out)
    }

    /// Settles a message by lock token through `$management` (update-disposition): a deferred
    /// message received by sequence number, or any other locked message.
    pub(crate) fn settle_by_token(
        &self,
        part: Part,
        token: u128,
        settle: Settle,
        now: i64,
    ) -> Result<(), LockError> {
        let dlq_grew = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let (store, dlq) = state.store_and_dlq(part);
            let Some(&seq) = store.deferred_tokens.get(&token) else {
                drop(guard);
                return self.settle_if_locked(part, token, settle, now);
            };
            let held = store
                .deferred
                .get(&seq)
                .and_then(|s| s.lock.as_ref())
                .is_some_and(|l| l.token == token && l.until_ms > now);
            if !held {
                return Err(LockError::MessageLockLost);
            }
            settle_deferred(store, dlq, token, settle, &self.settings)
        };
        if dlq_grew {
            self.dlq_notify.notify_waiters();
        }
        Ok(())
    }

    /// Messages from `from_seq` on, in sequence order, without locking them.
    pub(crate) fn peek(
        &self,
        part: Part,
        from_seq: i64,
        count: usize,
        session: Option<&str>,
    ) -> Vec<Stored> {
        let guard = self.lock();
        let store = guard.store(part);
        let mut all: Vec<&Stored> = Vec::new();
        for (key, queue) in &store.sessions {
            if session.is_none_or(|id| **key == *id) {
                all.extend(queue.messages.range(from_seq..).map(|(_, s)| s));
            }
        }
        all.extend(
            store
                .deferred
                .range(from_seq..)
                .map(|(_, s)| s)
                .filter(|s| session.is_none_or(|id| &*s.session == id)),
        );
        all.sort_by_key(|s| s.seq);
        all.into_iter().take(count).cloned().collect()
    }

    /// Expires locks and messages; called periodically by the sweeper.
    pub(crate) fn sweep(&self, now: i64) {
        let (main_grew, dlq_grew) = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let mut main_grew = false;
            let mut dlq_grew = false;
            // Session locks.
            let expired_sessions: Vec<Arc<str>> = state
                .main
                .sessions
                .iter()
                .filter(|(_, q)| q.lock.as_ref().is_some_and(|l| l.until_ms <= now))
                .map(|(k, _)| k.clone())
                .collect();
            for key in expired_sessions {
                release_session_messages(
                    &mut state.main,
                    &mut state.dlq,
                    &key,
                    &self.settings,
                    now,
                );
                main_grew = true;
                dlq_grew = true;
            }
            // Locks on deferred messages received by sequence number.
            for part in [Part::Main, Part::DeadLetter] {
                let store = state.store(part);
                let expired: Vec<u128> = store
                    .deferred_tokens
                    .iter()
                    .filter(|(_, seq)| {
                        store
                            .deferred
                            .get(seq)
                            .and_then(|s| s.lock.as_ref())
                            .is_none_or(|l| l.until_ms <= now)
                    })
                    .map(|(t, _)| *t)
                    .collect();
                for token in expired {
                    let (store, dlq) = state.store_and_dlq(part);
                    dlq_grew |= settle_deferred(store, dlq, token, Settle::Lost, &self.settings);
                }
            }
            // Message locks outside sessions.
            for part in [Part::Main, Part::DeadLetter] {
                let store = state.store(part);
                let expired: Vec<u128> = store
                    .tokens
                    .iter()
                    .filter(|(_, (key, seq))| {
                        store.sessions.get(key).is_some_and(|q| {
                            q.lock.is_none()
                                && q.messages
                                    .get(seq)
                                    .and_then(|s| s.lock.as_ref())
                                    .is_some_and(|l| l.until_ms <= now)
                        })
                    })
                    .map(|(t, _)| *t)
                    .collect();
                for token in expired {
                    let (m, d) = lose_lock(state, part, token, &self.settings, now);
                    main_grew |= m || part == Part::Main;
                    dlq_grew |= d || part == Part::DeadLetter;
                }
            }
            // Time-to-live of messages that are not locked.
            if state.main.next_ttl_check_ms <= now {
                let mut next = i64::MAX;
                let mut expired = Vec::new();
                for (key, queue) in &state.main.sessions {
                    for (seq, stored) in &queue.messages {
                        if stored.lock.is_some() {
                            continue;
                        }
                        if stored.expires_ms <= now {
                            expired.push((key.clone(), *seq));
                        } else {
                            next = next.min(stored.expires_ms);
                        }
                    }
                }
                state.main.next_ttl_check_ms = next;
                for (key, seq) in expired {
                    let queue = state.main.sessions.get_mut(&key).expect("present");
                    if let Some(stored) = queue.messages.remove(&seq) {
                        queue.released.remove(&seq);
                        state.main.len -= 1;
                        if self.settings.dead_letter_on_expiry {
                            push_dead_letter(
                                &mut state.dlq,
                                stored,
                                Some("TTLExpiredException".into()),
                                Some("The message expired and was dead lettered.".into()),
                                None,
                            );
                            dlq_grew = true;
                        }
                    }
                }
            }
            state.main.sessions.retain(|_, q| !q.is_idle());
            (main_grew, dlq_grew)
        };
        if main_grew {
            self.notify.notify_waiters();
        }
        if dlq_grew {
            self.dlq_notify.notify_waiters();
        }
    }

    pub(crate) fn stats(&self, now: i64) -> EntityStats {
        let guard = self.lock();
        let mut sessions = Vec::new();
        let mut locked = 0;
        for (key, queue) in &guard.main.sessions {
            let q_locked = queue.messages.values().filter(|s| s.lock.is_some()).count();
            locked += q_locked;
            if self.settings.requires_session {
                let lock = queue.lock.as_ref().filter(|l| l.until_ms > now);
                sessions.push(SessionStats {
                    id: key.to_string(),
                    active: queue.messages.len(),
                    locked: q_locked,
                    has_state: queue.state.is_some(),
                    holder: lock.map(|l| format!("{}/{}", l.holder.container, l.holder.link_name)),
                    locked_until_ms: lock.map(|l| l.until_ms),
                });
            }
        }
        sessions.sort_by(|a, b| a.id.cmp(&b.id));
        EntityStats {
            path: self.path.clone(),
            active: guard.main.len,
            locked,
            deferred: guard.main.deferred.len(),
            dead_lettered: guard.dlq.len,
            sessions,
        }
    }

    pub(crate) fn dead_letters(&self) -> Vec<DeadLetteredMessage> {
        let guard = self.lock();
        let mut out: Vec<DeadLetteredMessage> = guard
            .dlq
            .sessions
            .values()
            .flat_map(|q| q.messages.values())
            .map(|s| {
                let app = s.message.application_properties.as_ref();
                let text = |name: &str| match app.and_then(|a| a.0.get(name)) {
                    Some(SimpleValue::String(v)) => Some(v.clone()),
                    _ => None,
                };
                DeadLetteredMessage {
                    sequence_number: s.seq,
                    message_id: wire::message_id_text(&s.message),
                    session_id: s
                        .message
                        .properties
                        .as_ref()
                        .and_then(|p| p.group_id.clone()),
                    reason: text(DEAD_LETTER_REASON),
                    description: text(DEAD_LETTER_DESCRIPTION),
                    delivery_count: s.delivery_count,
                    body: wire::body_bytes(&s.message),
                }
            })
            .collect();
        out.sort_by_key(|m| m.sequence_number);
        out
    }
}

fn held_lock<'a>(
    queue: &'a mut SessionQueue,
    connection: u64,
    link_name: Option<&str>,
    now: i64,
) -> Result<&'a mut SessionLock, LockError> {
    match &mut queue.lock {
        Some(lock)
            if lock.until_ms > now
                && lock.holder.connection == connection
                && link_name.is_none_or(|n| n.is_empty() || *lock.holder.link_name == *n) =>
        {
            Ok(lock)
        }
        _ => Err(LockError::SessionLockLost),
    }
}

/// Whether `token` still locks its message: the message lock unexpired or, on a session entity,
/// the session lock unexpired.
fn lock_held(store: &Store, token: u128, sessionful: bool, now: i64) -> Result<(), LockError> {
    let lost = if sessionful {
        LockError::SessionLockLost
    } else {
        LockError::MessageLockLost
    };
    let (key, seq) = store.tokens.get(&token).ok_or(lost)?;
    let queue = store.sessions.get(key).ok_or(lost)?;
    if sessionful && queue.lock.as_ref().is_none_or(|l| l.until_ms <= now) {
        return Err(LockError::SessionLockLost);
    }
    match queue.messages.get(seq).and_then(|s| s.lock.as_ref()) {
        Some(lock) if lock.token == token && (sessionful || lock.until_ms > now) => Ok(()),
        _ => Err(lost),
    }
}

/// Applies a settlement to a locked deferred message; returns whether the dead-letter queue grew.
/// A deferred message that is not completed or dead-lettered stays deferred.
fn settle_deferred(
    store: &mut Store,
    dlq: Option<&mut Store>,
    token: u128,
    settle: Settle,
    settings: &EntitySettings,
) -> bool {
    let Some(seq) = store.deferred_tokens.remove(&token) else {
        return false;
    };
    let Some(stored) = store.deferred.get_mut(&seq) else {
        return false;
    };
    stored.lock = None;
    let dead_letter = |store: &mut Store, dlq: Option<&mut Store>, reason, description, props| {
        let Some(dlq) = dlq else { return false };
        let mut stored = store.deferred.remove(&seq).expect("present");
        merge_annotations(&mut stored, props);
        push_dead_letter(dlq, stored, reason, description, None);
        true
    };
    match settle {
        Settle::Complete => {
            store.deferred.remove(&seq);
            false
        }
        Settle::Defer(props) => {
            merge_annotations(stored, props);
            false
        }
        Settle::Abandon(_) | Settle::Lost => {
            if let Settle::Abandon(props) = settle {
                merge_annotations(stored, props);
            }
            stored.delivery_count += 1;
            if stored.delivery_count >= settings.max_delivery_count {
                let description = format!(
                    "Message could not be consumed after {} delivery attempts.",
                    settings.max_delivery_count
                );
                let reason = Some("MaxDeliveryCountExceeded".to_owned());
                dead_letter(store, dlq, reason, Some(description), None)
            } else {
                false
            }
        }
        Settle::Unsent => false,
        Settle::DeadLetter {
            reason,
            description,
            properties,
        } => dead_letter(store, dlq, reason, description, properties),
    }
}

fn new_token() -> u128 {
    uuid::Uuid::new_v4().as_u128()
}

/// Settles one locked message; returns (main store gained available messages, DLQ grew).
/// Returns a locked message of `part` whose lock is gone (released or expired); the pair says
/// whether the main queue and the dead-letter queue grew.
fn lose_lock(
    state: &mut EntityState,
    part: Part,
    token: u128,
    settings: &EntitySettings,
    now: i64,
) -> (bool, bool) {
    match part {
        Part::Main => settle_in(
            &mut state.main,
            Some(&mut state.dlq),
            token,
            Settle::Lost,
            settings,
            now,
        ),
        Part::DeadLetter => {
            let (grew, _) = settle_in(&mut state.dlq, None, token, Settle::Lost, settings, now);
            (false, grew)
        }
    }
}

fn settle_in(
    store: &mut Store,
    dlq: Option<&mut Store>,
    token: u128,
    settle: Settle,
    settings: &EntitySettings,
    now: i64,
) -> (bool, bool) {
    let Some((key, seq)) = store.tokens.remove(&token) else {
        return (false, false);
    };
    let Some(queue) = store.sessions.get_mut(&key) else {
        return (false, false);
    };
    let Some(stored) = queue.messages.get_mut(&seq) else {
        return (false, false);
    };
    if stored.lock.as_ref().is_none_or(|l| l.token != token) {
        return (false, false);
    }
    stored.lock = None;
    match settle {
        Settle::Complete => {
            queue.messages.remove(&seq);
            store.len -= 1;
            (false, false)
        }
        Settle::Defer(props) => {
            let mut stored = queue.messages.remove(&seq).expect("present");
            merge_annotations(&mut stored, props);
            store.len -= 1;
            store.deferred.insert(seq, stored);
            (false, false)
        }
        Settle::Abandon(props) => {
            merge_annotations(stored, props);
            stored.delivery_count += 1;
            redeliver_or_dead_letter(store, dlq, &key, seq, settings, now)
        }
        Settle::Lost => {
            stored.delivery_count += 1;
            redeliver_or_dead_letter(store, dlq, &key, seq, settings, now)
        }
        Settle::Unsent => {
            queue.released.insert(seq);
            (true, false)
        }
        Settle::DeadLetter {
            reason,
            description,
            properties,
        } => match dlq {
            Some(dlq) => {
                let mut stored = queue.messages.remove(&seq).expect("present");
                store.len -= 1;
                merge_annotations(&mut stored, properties);
                push_dead_letter(dlq, stored, reason, description, None);
                (false, true)
            }
            // A dead-letter queue has no dead-letter queue: the message stays available.
            None => {
                queue.released.insert(seq);
                (true, false)
            }
        },
    }
}

/// After a failed delivery: back in line (ahead of later messages), or to the dead-letter queue
/// once the delivery count reaches the entity's maximum.
fn redeliver_or_dead_letter(
    store: &mut Store,
    dlq: Option<&mut Store>,
    key: &Arc<str>,
    seq: i64,
    settings: &EntitySettings,
    _now: i64,
) -> (bool, bool) {
    let queue = store.sessions.get_mut(key).expect("present");
    let count = queue
        .messages
        .get(&seq)
        .map(|s| s.delivery_count)
        .unwrap_or(0);
    match dlq {
        Some(dlq) if count >= settings.max_delivery_count => {
            let stored = queue.messages.remove(&seq).expect("present");
            store.len -= 1;
            push_dead_letter(
                dlq,
                stored,
                Some("MaxDeliveryCountExceeded".into()),
                Some(format!(
                    "Message could not be consumed after {} delivery attempts.",
                    settings.max_delivery_count
                )),
                None,
            );
            (false, true)
        }
        _ => {
            queue.released.insert(seq);
            (true, false)
        }
    }
}

/// Drops a session lock and puts every message it had locked back in line.
fn release_session_messages(
    store: &mut Store,
    dlq: &mut Store,
    key: &Arc<str>,
    settings: &EntitySettings,
    now: i64,
) {
    let Some(queue) = store.sessions.get_mut(key) else {
        return;
    };
    queue.lock = None;
    let tokens: Vec<u128> = queue
        .messages
        .values()
        .filter_map(|s| s.lock.as_ref().map(|l| l.token))
        .collect();
    for token in tokens {
        settle_in(store, Some(dlq), token, Settle::Lost, settings, now);
    }
}

fn merge_annotations(stored: &mut Stored, props: Option<MessageAnnotations>) {
    let Some(props) = props else { return };
    if props.0.is_empty() {
        return;
    }
    let message = Arc::make_mut(&mut stored.message);
    let annotations = message
        .message_annotations
        .get_or_insert_with(|| MessageAnnotations(Default::default()));
    for (k, v) in props.0 {
        annotations.0.insert(k, v);
    }
}

fn push_dead_letter(
    dlq: &mut Store,
    mut stored: Stored,
    reason: Option<String>,
    description: Option<String>,
    _source: Option<&str>,
) {
    stored.lock = None;
    let message = Arc::make_mut(&mut stored.message);
    let app = message.application_properties.get_or_insert_with(|| {
        fe2o3_amqp_types::messaging::ApplicationProperties(Default::default())
    });
    if let Some(reason) = reason {
        app.0
            .insert(DEAD_LETTER_REASON.to_owned(), SimpleValue::String(reason));
    }
    if let Some(description) = description {
        app.0.insert(
            DEAD_LETTER_DESCRIPTION.to_owned(),
            SimpleValue::String(description),
        );
    }
    dlq.len += 1;
    dlq.sessions
        .entry(Arc::from(""))
        .or_default()
        .insert(stored);
}
