//! Sweeping: expired session locks, message locks and time-to-live, checked periodically so
//! they take effect without traffic on the entity.

use super::{
    dead_letter::expire, deferred::settle_deferred, settle::lose_lock, Entity, EntityState, Part,
    Settle,
};

/// Which stores gained available messages during a sweep, so their links are woken.
#[derive(Debug, Default)]
struct Grew {
    main: bool,
    dlq: bool,
}

impl Entity {
    /// Expires locks and messages; called periodically by the sweeper.
    pub(crate) fn sweep(&self, now: i64) {
        let grew = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let mut grew = Grew::default();
            self.expire_session_locks(state, now, &mut grew);
            self.expire_deferred_locks(state, now, &mut grew);
            self.expire_message_locks(state, now, &mut grew);
            self.expire_messages(state, now, &mut grew);
            state.main.drop_idle_sessions();
            grew
        };
        if grew.main {
            self.notify.notify_waiters();
        }
        if grew.dlq {
            self.dlq_notify.notify_waiters();
        }
    }

    fn expire_session_locks(&self, state: &mut EntityState, now: i64, grew: &mut Grew) {
        if self.release_expired_locks(state, now) {
            grew.main = true;
            grew.dlq = true;
        }
    }

    /// Locks on deferred messages received by sequence number.
    fn expire_deferred_locks(&self, state: &mut EntityState, now: i64, grew: &mut Grew) {
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
                grew.dlq |= settle_deferred(store, dlq, token, Settle::Lost, &self.settings);
            }
        }
    }

    /// Message locks outside sessions (inside a session they follow the session lock).
    fn expire_message_locks(&self, state: &mut EntityState, now: i64, grew: &mut Grew) {
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
                let (m, d) = lose_lock(state, part, token, &self.settings);
                grew.main |= m || part == Part::Main;
                grew.dlq |= d || part == Part::DeadLetter;
            }
        }
    }

    /// Time-to-live of messages that are not locked; only the main store, dead-lettered
    /// messages never expire.
    fn expire_messages(&self, state: &mut EntityState, now: i64, grew: &mut Grew) {
        if state.main.next_ttl_check_ms > now {
            return;
        }
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
                grew.dlq |= expire(Some(&mut state.dlq), stored, &self.settings);
            }
        }
    }
}
