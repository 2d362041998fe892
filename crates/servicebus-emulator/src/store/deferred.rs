//! Deferred messages: set aside by their receiver, received again only by sequence number
//! (`$management` receive-by-sequence-number) and settled by lock token (update-disposition).

use super::{
    dead_letter::{max_delivery_count_exceeded, push_dead_letter},
    deliver::new_token,
    session::held_lock,
    settle::merge_annotations,
    DeferredError, Entity, EntitySettings, LockError, MessageLock, Part, Settle, Store, Stored,
};

impl Entity {
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
}

/// Applies a settlement to a locked deferred message; returns whether the dead-letter queue grew.
/// A deferred message that is not completed or dead-lettered stays deferred.
pub(super) fn settle_deferred(
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
        push_dead_letter(dlq, stored, reason, description);
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
                let (reason, description) = max_delivery_count_exceeded(settings);
                dead_letter(store, dlq, Some(reason), Some(description), None)
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
