//! Sessions: granting a session lock (named or next available), renewing it, session state,
//! and giving a session's locked messages back when its lock goes away.
//!
//! A session lock covers every message of the session that its holder received: their message
//! locks follow the session lock (Service Bus has no per-message lock inside a session).

use std::sync::Arc;

use super::{
    settle::settle_in, AcquireError, Entity, EntitySettings, EntityState, Holder, LockError,
    Release, SessionLock, SessionQueue, Store,
};

impl Entity {
    /// Grants a session lock: the named one, or the unlocked session whose oldest available
    /// message is the oldest of all (so no session starves behind busy ones).
    pub(crate) fn acquire_session(
        &self,
        wanted: Option<&str>,
        holder: &Holder,
        now: i64,
    ) -> Result<(Arc<str>, i64), AcquireError> {
        let (result, released_any) = {
            let mut guard = self.lock();
            match wanted {
                Some(id) => self.acquire_named(&mut guard, id, holder, now),
                None => self.acquire_next(&mut guard, holder, now),
            }
        };
        if released_any {
            self.dlq_notify.notify_waiters();
        }
        result
    }

    /// The named session, unless another receiver holds an unexpired lock on it. The second
    /// value says whether an expired holder's messages were released.
    fn acquire_named(
        &self,
        state: &mut EntityState,
        id: &str,
        holder: &Holder,
        now: i64,
    ) -> (Result<(Arc<str>, i64), AcquireError>, bool) {
        let key: Arc<str> = match state.main.sessions.get_key_value(id) {
            Some((k, _)) => k.clone(),
            None => Arc::from(id),
        };
        let queue = state.main.sessions.entry(key.clone()).or_default();
        let released = match &queue.lock {
            Some(lock) if lock.until_ms > now => return (Err(AcquireError::Locked), false),
            Some(_) => {
                release_session_messages(state, &key, &self.settings, Release::Lost);
                true
            }
            None => false,
        };
        (Ok(self.grant(state, key, holder, now)), released)
    }

    /// The unlocked session with the oldest available message; expired locks are released
    /// first, so their sessions compete too.
    fn acquire_next(
        &self,
        state: &mut EntityState,
        holder: &Holder,
        now: i64,
    ) -> (Result<(Arc<str>, i64), AcquireError>, bool) {
        let released = self.release_expired_locks(state, now);
        match state.main.next_available() {
            Some(key) => (Ok(self.grant(state, key, holder, now)), released),
            None => (Err(AcquireError::NoneAvailable), released),
        }
    }

    /// Releases every session lock that expired by `now` (as lost: delivery count + 1);
    /// whether there was one.
    pub(super) fn release_expired_locks(&self, state: &mut EntityState, now: i64) -> bool {
        let mut released = false;
        while let Some((until, key)) = state.main.lock_expiry.first().cloned() {
            if until > now {
                break;
            }
            release_session_messages(state, &key, &self.settings, Release::Lost);
            released = true;
        }
        released
    }

    fn grant(
        &self,
        state: &mut EntityState,
        key: Arc<str>,
        holder: &Holder,
        now: i64,
    ) -> (Arc<str>, i64) {
        let until = now + self.settings.lock_ms;
        let store = &mut state.main;
        store.withdraw(&key);
        let queue = store.sessions.entry(key.clone()).or_default();
        queue.lock = Some(SessionLock {
            holder: holder.clone(),
            until_ms: until,
        });
        store.lock_expiry.insert((until, key.clone()));
        (key, until)
    }

    /// Extends a session lock held by the requesting connection (and link, when named).
    pub(crate) fn renew_session_lock(
        &self,
        session: &str,
        connection: u64,
        link_name: Option<&str>,
        now: i64,
    ) -> Result<i64, LockError> {
        let until = now + self.settings.lock_ms;
        self.with_held_key(session, connection, link_name, now, |store, key| {
            let queue = store.sessions.get_mut(key).expect("held");
            let lock = queue.lock.as_mut().expect("held");
            let before = std::mem::replace(&mut lock.until_ms, until);
            for stored in queue.messages.values_mut() {
                if let Some(l) = &mut stored.lock {
                    l.until_ms = until;
                }
            }
            store.lock_expiry.remove(&(before, key.clone()));
            store.lock_expiry.insert((until, key.clone()));
            until
        })
    }

    /// Session state; `None` when never set (the wire answer is then an empty binary).
    pub(crate) fn session_state(
        &self,
        session: &str,
        connection: u64,
        link_name: Option<&str>,
        now: i64,
    ) -> Result<Option<Vec<u8>>, LockError> {
        self.with_held_session(session, connection, link_name, now, |queue| {
            queue.state.clone()
        })
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
        self.with_held_session(session, connection, link_name, now, |queue| {
            queue.state = state;
        })
    }

    /// Runs `f` on a session's queue while the requesting connection (and link, when named)
    /// holds the session lock; [`LockError::SessionLockLost`] otherwise.
    fn with_held_session<T>(
        &self,
        session: &str,
        connection: u64,
        link_name: Option<&str>,
        now: i64,
        f: impl FnOnce(&mut SessionQueue) -> T,
    ) -> Result<T, LockError> {
        self.with_held_key(session, connection, link_name, now, |store, key| {
            f(store.sessions.get_mut(key).expect("held"))
        })
    }

    /// [`Self::with_held_session`] for what needs the whole store (the lock index) and the
    /// session's key.
    fn with_held_key<T>(
        &self,
        session: &str,
        connection: u64,
        link_name: Option<&str>,
        now: i64,
        f: impl FnOnce(&mut Store, &Arc<str>) -> T,
    ) -> Result<T, LockError> {
        let mut guard = self.lock();
        let store = &mut guard.main;
        let key = match store.sessions.get_key_value(session) {
            Some((key, _)) => key.clone(),
            None => return Err(LockError::SessionLockLost),
        };
        let queue = store.sessions.get_mut(&key).expect("present");
        held_lock(queue, connection, link_name, now)?;
        Ok(f(store, &key))
    }
}

/// The session lock, when the requesting connection (and link, when named) still holds it.
pub(super) fn held_lock<'a>(
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

/// Drops a session lock and puts every message it had locked back in line: as a lost lock
/// (delivery count + 1) when the lock expired or its connection vanished, untouched when its
/// receiver closed the link ([`Release`]).
pub(super) fn release_session_messages(
    state: &mut EntityState,
    key: &Arc<str>,
    settings: &EntitySettings,
    release: Release,
) {
    let Some(queue) = state.main.sessions.get_mut(key) else {
        return;
    };
    if let Some(lock) = queue.lock.take() {
        state.main.lock_expiry.remove(&(lock.until_ms, key.clone()));
    }
    let tokens: Vec<u128> = queue
        .messages
        .values()
        .filter_map(|s| s.lock.as_ref().map(|l| l.token))
        .collect();
    for token in tokens {
        settle_in(
            &mut state.main,
            Some(&mut state.dlq),
            token,
            release.settle(),
            settings,
        );
    }
    state.main.offer(key);
}

/// The index behind "accept the next session": `available` holds every unlocked session with a
/// message to hand out, under that message's sequence number, and `lock_expiry` every session
/// lock under its expiry. A session enters `available` when a message arrives while it is
/// unlocked and not filed yet (`Entity::enqueue`) and when its lock goes; it
/// leaves when it is granted. An entry can go stale only when unlocked messages leave (time
/// to live), which [`Store::next_available`] checks.
impl Store {
    /// Files `key` under its first available message if it is unlocked and has one.
    pub(super) fn offer(&mut self, key: &Arc<str>) {
        self.withdraw(key);
        let Some(queue) = self.sessions.get_mut(key) else {
            return;
        };
        if queue.lock.is_some() {
            return;
        }
        if let Some(seq) = queue.first_available() {
            queue.indexed = Some(seq);
            self.available.insert((seq, key.clone()));
        }
    }

    /// Takes `key` out of `available`.
    fn withdraw(&mut self, key: &Arc<str>) {
        if let Some(seq) = self.sessions.get_mut(key).and_then(|q| q.indexed.take()) {
            self.available.remove(&(seq, key.clone()));
        }
    }

    /// The unlocked session with the oldest available message, taken out of `available`.
    fn next_available(&mut self) -> Option<Arc<str>> {
        while let Some((seq, key)) = self.available.pop_first() {
            let Some(queue) = self.sessions.get_mut(&key) else {
                continue;
            };
            queue.indexed = None;
            if queue.lock.is_some() {
                continue;
            }
            match queue.first_available() {
                Some(first) if first == seq => return Some(key),
                Some(_) => self.offer(&key),
                None => {}
            }
        }
        None
    }

    /// Forgets the sessions with nothing left: no message, no state, no lock.
    pub(super) fn drop_idle_sessions(&mut self) {
        let Store {
            sessions,
            available,
            ..
        } = self;
        sessions.retain(|key, queue| {
            if !queue.is_idle() {
                return true;
            }
            if let Some(seq) = queue.indexed {
                available.remove(&(seq, key.clone()));
            }
            false
        });
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
