//! Turns out-of-order acknowledgements into a checkpoint that never lies.
//!
//! Every item read (an event, a parked event, an idle-stream marker, the end of a collection
//! scan) gets the next sequence number in read order. Sends complete out of order across
//! sessions, so acks arrive in any order. The checkpoint is the position of the highest
//! sequence number below which *everything* is acknowledged: resuming after it can only repeat
//! events (deduplicated downstream), never skip one.
//!
//! Items without a position (events of a collection scan) hold the prefix back but cannot be
//! the checkpoint themselves; the scan's end marker carries the stream position to continue
//! from, so the checkpoint jumps there only once the whole scan is acknowledged.
//!
//! Memory: acknowledged items behind an unacknowledged one stay until it is acknowledged. A
//! bounded tracker ([`AckTracker::bounded`]) says when it is full ([`AckTracker::has_room`]) and
//! wakes [`AckTracker::freed`] when items leave the prefix; the reader waits for room before
//! reading on, so a stuck front stops the reader instead of growing without bound. Position
//! markers (idle stream) that arrive behind a stuck front replace the previous marker instead
//! of queueing: only the newest matters once everything before it is acknowledged.
//!
//! The tracker is generic over its position; the producer's is [`Position`], a change-stream
//! position, and [`Acks`] is the tracker the reader, the workers and the checkpointer share.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use mongodb::bson::{DateTime, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use tokio::sync::Notify;

/// Sequence number of a read item, in read order.
pub type Seq = u64;

/// A stream position the checkpoint can point at.
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    /// Resume token, for `startAfter`; turned into a document only when a checkpoint is saved.
    pub token: ResumeToken,
    /// Cluster time of the event, when the position is an event.
    pub cluster_time: Option<Timestamp>,
    /// Wall time of the event (or of the read, for idle and scan markers).
    pub wall_time: DateTime,
}

#[cfg(test)]
impl Position {
    pub(crate) fn test(i: u64) -> Self {
        Position {
            token: mongodb::bson::from_document(mongodb::bson::doc! { "_data": i.to_string() })
                .expect("a resume token"),
            cluster_time: None,
            wall_time: DateTime::from_millis(i as i64),
        }
    }
}

/// Shared acknowledgement state: the tracker and the count of events published.
pub type Acks = Arc<Mutex<AckTracker<Position>>>;

/// Tracks acknowledgements of a contiguous run of sequence numbers.
#[derive(Debug)]
pub struct AckTracker<P> {
    /// Sequence number of `pending[0]`.
    base: Seq,
    /// Items from `base` on: (acknowledged, is a published event, position).
    pending: VecDeque<(bool, bool, Option<P>)>,
    /// The newest position of the acknowledged prefix, not yet taken by [`Self::take`], with
    /// the number of events folded up to it.
    ready: Option<(P, u64)>,
    /// Acknowledged items folded into the prefix since the last take.
    advanced_by: u64,
    /// Published events (not markers, not parked events) folded into the prefix so far.
    events: u64,
    /// Most items held before [`Self::has_room`] says no.
    max: usize,
    /// Woken whenever items leave the prefix.
    freed: Arc<Notify>,
}

impl<P> Default for AckTracker<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P> AckTracker<P> {
    /// An empty tracker starting at sequence 0.
    pub fn new() -> Self {
        Self {
            base: 0,
            pending: VecDeque::new(),
            ready: None,
            advanced_by: 0,
            events: 0,
            max: usize::MAX,
            freed: Arc::default(),
        }
    }

    /// A tracker meant to hold at most `max` items: the reader checks [`Self::has_room`]
    /// before each read (waiting on [`Self::freed`]).
    pub fn bounded(max: usize) -> Self {
        Self {
            max: max.max(1),
            ..Self::new()
        }
    }

    /// False while the tracker holds its maximum: the reader must wait.
    pub fn has_room(&self) -> bool {
        self.pending.len() < self.max
    }

    /// Woken (`notify_waiters`) whenever items leave the prefix.
    pub fn freed(&self) -> Arc<Notify> {
        self.freed.clone()
    }

    /// Registers a position that needs no send, acknowledged at once. Behind an acknowledged
    /// marker still waiting for the front, it replaces that marker's position instead of
    /// queueing: the newer position covers the older one.
    pub fn push_acked_marker(&mut self, position: P) {
        if let Some((true, false, Some(last))) = self.pending.back_mut() {
            *last = position;
            return;
        }
        let seq = self.push_marker(Some(position));
        self.ack(seq);
    }

    /// Acknowledges `seq` as parked: it holds and then passes the prefix like an event, but
    /// is not counted as published.
    pub fn ack_parked(&mut self, seq: Seq) {
        if seq >= self.base {
            if let Some(slot) = self.pending.get_mut((seq - self.base) as usize) {
                slot.1 = false;
            }
        }
        self.ack(seq);
    }

    /// Registers the next item, an event to publish; returns its sequence number.
    pub fn push(&mut self, position: Option<P>) -> Seq {
        self.push_item(true, position)
    }

    /// Registers the next item, one that is not a published event (an idle-stream or end-of-scan
    /// marker, a parked event): it holds the prefix like an event but is not counted.
    pub fn push_marker(&mut self, position: Option<P>) -> Seq {
        self.push_item(false, position)
    }

    fn push_item(&mut self, event: bool, position: Option<P>) -> Seq {
        let seq = self.base + self.pending.len() as u64;
        self.pending.push_back((false, event, position));
        seq
    }

    /// Acknowledges `seq`. Unknown or already folded sequence numbers are ignored (a retry that
    /// acks twice is harmless).
    pub fn ack(&mut self, seq: Seq) {
        if seq < self.base {
            return;
        }
        let idx = (seq - self.base) as usize;
        if let Some(slot) = self.pending.get_mut(idx) {
            slot.0 = true;
        }
        let before = self.base;
        while let Some((true, _, _)) = self.pending.front() {
            let (_, event, pos) = self.pending.pop_front().expect("front exists");
            self.base += 1;
            self.advanced_by += 1;
            self.events += u64::from(event);
            if let Some(pos) = pos {
                self.ready = Some((pos, self.events));
            }
        }
        if self.base != before {
            self.freed.notify_waiters();
        }
    }

    /// Items read and not yet part of the acknowledged prefix.
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// Items folded into the prefix since the last take.
    pub fn advanced_by(&self) -> u64 {
        self.advanced_by
    }

    /// The newest position of the acknowledged prefix, if it moved since the last take.
    pub fn take_checkpoint(&mut self) -> Option<P> {
        self.take().map(|(p, _)| p)
    }

    /// Like [`Self::take_checkpoint`], with the number of published events the acknowledged
    /// prefix holds up to that position (counted since the tracker was created).
    pub fn take(&mut self) -> Option<(P, u64)> {
        self.advanced_by = 0;
        self.ready.take()
    }

    /// The number of published events up to the position a take would return, if any.
    pub fn ready_events(&self) -> Option<u64> {
        self.ready.as_ref().map(|(_, events)| *events)
    }

    /// Puts back a position (and its event count) whose save failed, unless a newer one arrived
    /// meanwhile.
    pub fn restore(&mut self, position: P, events: u64) {
        if self.ready.is_none() {
            self.ready = Some((position, events));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn out_of_order_acks_become_a_prefix() {
        let mut t = AckTracker::new();
        for i in 0..4u32 {
            t.push(Some(i));
        }
        t.ack(2);
        t.ack(1);
        assert_eq!(t.take_checkpoint(), None, "0 is still unacknowledged");
        t.ack(0);
        assert_eq!(t.take_checkpoint(), Some(2));
        t.ack(3);
        assert_eq!(t.take_checkpoint(), Some(3));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn a_stuck_front_fills_a_bounded_tracker_and_idle_markers_do_not_grow_it() {
        let mut t = AckTracker::bounded(3);
        let stuck = t.push(Some(0u32));
        let a = t.push(Some(1));
        t.ack(a);
        for i in 2..1000 {
            t.push_acked_marker(i);
        }
        assert_eq!(
            t.outstanding(),
            3,
            "idle markers behind a stuck front collapse into one"
        );
        assert!(!t.has_room());
        t.ack(stuck);
        assert!(t.has_room());
        assert_eq!(t.take_checkpoint(), Some(999));
    }

    #[test]
    fn a_parked_item_passes_the_prefix_uncounted() {
        let mut t = AckTracker::new();
        let a = t.push(Some("a"));
        let b = t.push(Some("b"));
        t.ack_parked(b);
        t.ack(a);
        assert_eq!(t.take(), Some(("b", 1)));
    }

    #[test]
    fn positionless_items_hold_the_prefix_but_are_not_checkpoints() {
        let mut t = AckTracker::new();
        t.push(Some("a"));
        t.push(None);
        t.push(Some("end"));
        t.ack(0);
        assert_eq!(t.take_checkpoint(), Some("a"));
        t.ack(2);
        assert_eq!(t.take_checkpoint(), None);
        t.ack(1);
        assert_eq!(t.take_checkpoint(), Some("end"));
    }

    #[test]
    fn only_events_up_to_the_checkpoint_are_counted() {
        let mut t = AckTracker::new();
        t.push(Some("e1"));
        t.push_marker(Some("idle"));
        t.push(None);
        t.push(None);
        t.push_marker(Some("scan end"));
        t.ack(0);
        t.ack(1);
        assert_eq!(t.take(), Some(("idle", 1)), "a marker is not an event");
        t.ack(2);
        t.ack(3);
        assert_eq!(t.take(), None, "scanned events wait for the end marker");
        t.ack(4);
        assert_eq!(t.take(), Some(("scan end", 3)));
    }

    /// One step of a random run: read an item (with or without a position) or ack one of
    /// the read items, chosen by index into the unacked set.
    #[derive(Debug, Clone)]
    enum Op {
        Read { positioned: bool },
        Ack(prop::sample::Index),
        Take,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => any::<bool>().prop_map(|p| Op::Read { positioned: p }),
            3 => any::<prop::sample::Index>().prop_map(Op::Ack),
            1 => Just(Op::Take),
        ]
    }

    proptest! {
        /// Model: the set of acked seqs. Law: a taken checkpoint (position = its seq) is
        /// (1) a positioned item, (2) never beyond an unacked item (every seq <= it is acked),
        /// (3) never older than the previous one, and (4) once everything is acked and taken,
        /// it is the last positioned item.
        #[test]
        fn checkpoint_is_the_acked_prefix(ops in prop::collection::vec(op(), 1..300)) {
            let mut t: AckTracker<Seq> = AckTracker::new();
            let mut read: Vec<bool> = Vec::new(); // positioned?
            let mut acked: Vec<bool> = Vec::new();
            let mut last: Option<Seq> = None;
            fn check(last: &mut Option<Seq>, cp: Option<Seq>, acked: &[bool], read: &[bool]) -> Result<(), TestCaseError> {
                if let Some(cp) = cp {
                    prop_assert!(read[cp as usize], "checkpoint at a positionless item");
                    prop_assert!(acked[..=cp as usize].iter().all(|a| *a), "checkpoint passes an unacked event");
                    if let Some(l) = *last {
                        prop_assert!(cp > l, "checkpoint moved backwards or repeated: {l} -> {cp}");
                    }
                    *last = Some(cp);
                }
                Ok(())
            }
            for op in ops {
                match op {
                    Op::Read { positioned } => {
                        let seq = t.push(positioned.then_some(read.len() as Seq));
                        prop_assert_eq!(seq as usize, read.len());
                        read.push(positioned);
                        acked.push(false);
                    }
                    Op::Ack(ix) => {
                        let unacked: Vec<usize> = (0..acked.len()).filter(|i| !acked[*i]).collect();
                        if !unacked.is_empty() {
                            let i = unacked[ix.index(unacked.len())];
                            acked[i] = true;
                            t.ack(i as Seq);
                        }
                    }
                    Op::Take => {
                        let cp = t.take_checkpoint();
                        check(&mut last, cp, &acked, &read)?;
                    }
                }
            }
            for (i, a) in acked.iter_mut().enumerate() {
                if !*a {
                    *a = true;
                    t.ack(i as Seq);
                }
            }
            let cp = t.take_checkpoint();
            check(&mut last, cp, &acked, &read)?;
            let final_expected = read.iter().rposition(|p| *p).map(|i| i as Seq);
            prop_assert_eq!(last, final_expected);
            prop_assert_eq!(t.outstanding(), 0);
        }
    }
}
