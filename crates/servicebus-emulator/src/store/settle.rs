//! Settlement: what a receiver's outcome (or the loss of its lock) does to a locked message,
//! and the lock checks Service Bus applies before it settles.
//!
//! | outcome | message |
//! |---|---|
//! | complete | removed |
//! | abandon, lock lost | delivery count + 1; back in line ahead of later messages, or dead-lettered at `max_delivery_count` |
//! | defer | moved to the deferred set (received again only by sequence number) |
//! | dead-letter | moved to the dead-letter queue with reason and description |
//! | unsent, released | back in line as it was |

use std::sync::Arc;

use fe2o3_amqp_types::messaging::MessageAnnotations;

use super::{
    dead_letter::{push_dead_letter, redeliver_or_dead_letter},
    session::release_session_messages,
    Entity, EntitySettings, EntityState, LinkId, LockError, Part, Release, Settle, Store, Stored,
};

impl Entity {
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
                ),
                Part::DeadLetter => {
                    let (grew, _) = settle_in(&mut state.dlq, None, token, settle, &self.settings);
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

    /// Whether a message of `session` earlier than `seq` is waiting to be delivered again
    /// (abandoned, lock lost) while `seq` is taken: then `seq` must go back behind it.
    pub(crate) fn returned_before(&self, part: Part, session: Option<&Arc<str>>, seq: i64) -> bool {
        let guard = self.lock();
        let key: &str = session.map_or("", |s| s);
        guard
            .store(part)
            .sessions
            .get(key)
            .is_some_and(|queue| queue.returned_before(seq))
    }

    /// Puts back a message a link took but did not send, without waking other links: the same
    /// link picks again right away (used when something earlier in line came back).
    pub(crate) fn put_back(&self, part: Part, token: u128) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let store = state.store_mut(part);
        settle_in(store, None, token, Settle::Unsent, &self.settings);
    }

    /// Releases what an ending link still holds: its unsettled messages (ahead of later
    /// messages; delivery count + 1 unless `release` says the receiver closed the link) and its
    /// session lock.
    pub(crate) fn release_link(
        &self,
        part: Part,
        tokens: impl IntoIterator<Item = u128>,
        session: Option<&Arc<str>>,
        link: LinkId,
        release: Release,
    ) {
        let mut dlq_grew = false;
        let mut main_grew = false;
        {
            let mut guard = self.lock();
            let state = &mut *guard;
            for token in tokens {
                let (m, d) = match release {
                    Release::Lost => lose_lock(state, part, token, &self.settings),
                    Release::Closed => {
                        let store = state.store_mut(part);
                        settle_in(store, None, token, Settle::Unsent, &self.settings)
                    }
                };
                main_grew |= m;
                dlq_grew |= d;
            }
            if let Some(key) = session {
                if let Some(queue) = state.main.sessions.get_mut(key) {
                    if queue.lock.as_ref().is_some_and(|l| l.holder.link == link) {
                        release_session_messages(state, key, &self.settings, release);
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
}

/// Whether `token` still locks its message: the message lock unexpired or, on a session entity,
/// the session lock unexpired.
pub(super) fn lock_held(
    store: &Store,
    token: u128,
    sessionful: bool,
    now: i64,
) -> Result<(), LockError> {
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

/// Returns a locked message of `part` whose lock is gone (released or expired); the pair says
/// whether the main queue and the dead-letter queue grew.
pub(super) fn lose_lock(
    state: &mut EntityState,
    part: Part,
    token: u128,
    settings: &EntitySettings,
) -> (bool, bool) {
    match part {
        Part::Main => settle_in(
            &mut state.main,
            Some(&mut state.dlq),
            token,
            Settle::Lost,
            settings,
        ),
        Part::DeadLetter => {
            let (grew, _) = settle_in(&mut state.dlq, None, token, Settle::Lost, settings);
            (false, grew)
        }
    }
}

/// Settles one locked message; returns (main store gained available messages, DLQ grew).
pub(super) fn settle_in(
    store: &mut Store,
    dlq: Option<&mut Store>,
    token: u128,
    settle: Settle,
    settings: &EntitySettings,
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
            redeliver_or_dead_letter(store, dlq, &key, seq, settings)
        }
        Settle::Lost => {
            stored.delivery_count += 1;
            redeliver_or_dead_letter(store, dlq, &key, seq, settings)
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
                push_dead_letter(dlq, stored, reason, description);
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

pub(super) fn merge_annotations(stored: &mut Stored, props: Option<MessageAnnotations>) {
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
