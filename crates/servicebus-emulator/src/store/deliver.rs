//! Handing messages out: the next message of a link's session (or of the entity), locked for
//! peek-lock receivers or removed for receive-and-delete ones.

use std::sync::Arc;

use super::{dead_letter::expire, Delivery, Entity, LinkId, MessageLock, Next, Part};

impl Entity {
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
                    dlq_grew |= expire(dlq.as_deref_mut(), stored, &self.settings);
                }
            }
            result
        };
        if dlq_grew {
            self.dlq_notify.notify_waiters();
        }
        next
    }
}

/// A fresh lock token.
pub(super) fn new_token() -> u128 {
    uuid::Uuid::new_v4().as_u128()
}
