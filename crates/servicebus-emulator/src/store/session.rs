//! Sessions: granting a session lock (named or next available), renewing it, session state,
//! and giving a session's locked messages back when its lock goes away.
//!
//! A session lock covers every message of the session that its holder received: their message
//! locks follow the session lock (Service Bus has no per-message lock inside a session).

use std::sync::Arc;

use super::{
    settle::settle_in, AcquireError, Entity, EntitySettings, EntityState, Holder, LockError,
    Release, SessionLock, SessionQueue,
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

    /// The unlocked session with the oldest available message; expired locks met on the way
    /// are released first.
    fn acquire_next(
        &self,
        state: &mut EntityState,
        holder: &Holder,
        now: i64,
    ) -> (Result<(Arc<str>, i64), AcquireError>, bool) {
        let mut expired = Vec::new();
        let mut best: Option<(i64, Arc<str>)> = None;
        for (key, queue) in &state.main.sessions {
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
        let released = !expired.is_empty();
        for key in expired {
            release_session_messages(state, &key, &self.settings, Release::Lost);
        }
        match best {
            Some((_, key)) => (Ok(self.grant(state, key, holder, now)), released),
            None => (Err(AcquireError::NoneAvailable), released),
        }
    }

    fn grant(
        &self,
        state: &mut EntityState,
        key: Arc<str>,
        holder: &Holder,
        now: i64,
    ) -> (Arc<str>, i64) {
        let until = now + self.settings.lock_ms;
        let queue = state.main.sessions.entry(key.clone()).or_default();
        queue.lock = Some(SessionLock {
            holder: holder.clone(),
            until_ms: until,
        });
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
        self.with_held_session(session, connection, link_name, now, |queue| {
            if let Some(lock) = &mut queue.lock {
                lock.until_ms = until;
            }
            for stored in queue.messages.values_mut() {
                if let Some(l) = &mut stored.lock {
                    l.until_ms = until;
                }
            }
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
        let mut guard = self.lock();
        let queue = guard
            .main
            .sessions
            .get_mut(session)
            .ok_or(LockError::SessionLockLost)?;
        held_lock(queue, connection, link_name, now)?;
        Ok(f(queue))
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
    queue.lock = None;
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
}
