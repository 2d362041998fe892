//! The messages of one session (or of a session-less entity) in delivery order.
//!
//! Ordering invariant of a [`SessionQueue`]: messages with `seq >= cursor` have never been
//! handed out since they were last released; messages below the cursor are either locked by a
//! receiver or listed in `released`. The next delivery is the smallest released message, else
//! the first message at or after the cursor, so redeliveries always go out before later messages
//! of the same session.

use std::collections::{BTreeMap, BTreeSet};

use super::{SessionLock, Stored};

#[derive(Debug, Default)]
pub(super) struct SessionQueue {
    pub(super) messages: BTreeMap<i64, Stored>,
    pub(super) cursor: i64,
    pub(super) released: BTreeSet<i64>,
    pub(super) state: Option<Vec<u8>>,
    pub(super) lock: Option<SessionLock>,
    /// The sequence number this session is filed under in `Store::available`, if it is.
    pub(super) indexed: Option<i64>,
}

impl SessionQueue {
    /// The sequence number [`SessionQueue::take_next`] would hand out, without taking it.
    pub(super) fn first_available(&self) -> Option<i64> {
        let released = self.released.first().copied();
        let fresh = self.messages.range(self.cursor..).next().map(|(s, _)| *s);
        match (released, fresh) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether a message earlier than `seq` came back (abandoned, lock lost) and waits to be
    /// delivered again: then `seq`, taken meanwhile, must go back behind it.
    pub(super) fn returned_before(&self, seq: i64) -> bool {
        self.released.first().is_some_and(|&first| first < seq)
    }

    pub(super) fn take_next(&mut self) -> Option<i64> {
        if let Some(seq) = self.released.pop_first() {
            return Some(seq);
        }
        let seq = self.messages.range(self.cursor..).next().map(|(s, _)| *s)?;
        self.cursor = seq + 1;
        Some(seq)
    }

    pub(super) fn insert(&mut self, stored: Stored) {
        let seq = stored.seq;
        self.messages.insert(seq, stored);
        if seq < self.cursor {
            self.released.insert(seq);
        }
    }

    pub(super) fn is_idle(&self) -> bool {
        self.messages.is_empty() && self.state.is_none() && self.lock.is_none()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, sync::Arc};

    use proptest::prelude::*;

    use super::{SessionQueue, Stored};

    #[derive(Debug, Clone)]
    enum Op {
        /// A new message arrives (sequence numbers only grow, as at the ingress).
        Enqueue,
        /// The receiver takes the next message.
        Take,
        /// The `n`-th message currently out (modulo) comes back: abandon, lock loss.
        Release(usize),
        /// The `n`-th message currently out (modulo) is completed.
        Complete(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Enqueue),
            3 => Just(Op::Take),
            1 => any::<usize>().prop_map(Op::Release),
            2 => any::<usize>().prop_map(Op::Complete),
        ]
    }

    fn message(seq: i64) -> Stored {
        let message = fe2o3_amqp_types::messaging::Message::builder()
            .body(fe2o3_amqp_types::messaging::Body::Value(
                fe2o3_amqp_types::messaging::AmqpValue(fe2o3_amqp_types::primitives::Value::Null),
            ))
            .build();
        Stored::new(seq, Arc::new(message), 0, i64::MAX, Arc::from(""))
    }

    fn nth(out: &BTreeSet<i64>, n: usize) -> Option<i64> {
        (!out.is_empty()).then(|| *out.iter().nth(n % out.len()).expect("in range"))
    }

    proptest! {
        /// Whatever the interleaving of arrivals, takes, releases and completions, every take
        /// hands out the smallest sequence number that is waiting (not out, not completed):
        /// a released message goes out again before any later one.
        #[test]
        fn every_take_is_the_oldest_waiting_message(ops in prop::collection::vec(op(), 1..200)) {
            let mut queue = SessionQueue::default();
            let mut next_seq = 1;
            let mut waiting = BTreeSet::new();
            let mut out = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Enqueue => {
                        queue.insert(message(next_seq));
                        waiting.insert(next_seq);
                        next_seq += 1;
                    }
                    Op::Take => {
                        prop_assert_eq!(queue.first_available(), waiting.first().copied());
                        let taken = queue.take_next();
                        prop_assert_eq!(taken, waiting.pop_first());
                        out.extend(taken);
                    }
                    Op::Release(n) => {
                        if let Some(seq) = nth(&out, n) {
                            out.remove(&seq);
                            queue.released.insert(seq);
                            waiting.insert(seq);
                        }
                    }
                    Op::Complete(n) => {
                        if let Some(seq) = nth(&out, n) {
                            out.remove(&seq);
                            queue.messages.remove(&seq);
                        }
                    }
                }
            }
        }
    }
}
