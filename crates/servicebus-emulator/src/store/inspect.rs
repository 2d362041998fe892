//! Inspection: counters, peeks and dead-letter snapshots, without locking or removing anything.

use super::{Entity, Part, Stored};
use crate::stats::{EntityStats, SessionStats};

impl Entity {
    /// Counters of the entity and, on a session entity, of each session.
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
            waiting_accepts: self
                .waiting_accepts
                .load(std::sync::atomic::Ordering::Relaxed),
            sessions,
        }
    }

    /// The dead-letter queue in sequence order.
    pub(crate) fn dead_letters(&self) -> Vec<Stored> {
        let guard = self.lock();
        let mut out: Vec<Stored> = guard
            .dlq
            .sessions
            .values()
            .flat_map(|q| q.messages.values().cloned())
            .collect();
        out.sort_by_key(|m| m.seq);
        out
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
}
