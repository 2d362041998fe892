//! One batch of a held session: receive → decide → settle, with the lock renewed while it
//! runs; pausing for a fault that is not the events', and blocking the aggregate at a poison.

use super::message::{aggregate_of, block_record, decode};
use super::renewal::Renewal;
use super::session::{After, Held};
use super::{Activity, Engine, Event, WorkError};
use crate::settle::{
    self, Action, Decision, Item, Outcome, Poison, Stop, REASON_BLOCKED, REASON_FOREIGN,
};
use crate::store::BlockRecord;
use ordo_core::envelope::session_id;
use ordo_core::metrics as m;
use ordo_core::readiness::dependency;
use ordo_core::retry::Retry;
use ordo_core::servicebus::receiver::{Delivery, SessionReceiver};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

impl Engine {
    /// Runs `fut` while renewing the session lock every renewal interval. `None` when a renewal
    /// failed (the lock is gone: the caller must not settle anything).
    pub(super) async fn renewing<R: SessionReceiver, T>(
        &self,
        session: &mut R,
        renewal: &mut Renewal,
        fut: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        tokio::pin!(fut);
        loop {
            let next = renewal.due();
            tokio::select! {
                r = &mut fut => return Some(r),
                _ = tokio::time::sleep_until(next.into()) => {
                    match session.renew_lock().await {
                        Ok(()) => {
                            metrics::counter!(m::LOCK_RENEWALS).increment(1);
                            renewal.renewed();
                        }
                        Err(e) => {
                            self.lock_trouble(session.session_id(), &e);
                            return None;
                        }
                    }
                }
            }
        }
    }

    /// The aggregate's outcome for this batch: already blocked, or applied. Reads
    /// `ordo_blocked` once per session, and on every batch while blocked (a repair may have
    /// lifted it).
    pub(super) async fn outcome(
        &self,
        held: &mut Held,
        aggregate_id: &str,
        events: &[&Event],
    ) -> Result<(i64, Outcome), WorkError> {
        if !held.checked_blocked || held.blocked.is_some() {
            let was = held.blocked;
            held.blocked = self.store.blocked_at(aggregate_id).await?;
            held.checked_blocked = true;
            if was.is_some() && held.blocked.is_none() {
                tracing::info!(aggregate = %aggregate_id, "aggregate was repaired; resuming");
                held.models = vec![None; self.projections.len()];
            }
        }
        if let Some(at) = held.blocked {
            return Ok((at - 1, Outcome::Blocked { at }));
        }
        let a = self.apply(held, aggregate_id, events).await?;
        Ok((
            a.base,
            Outcome::Applied {
                durable: a.durable,
                stop: a.stop,
            },
        ))
    }

    /// Dead-letters, first, every event whose aggregate's session id is not this session's, or
    /// whose aggregate is not the batch's first (`ForeignAggregate`): one session is one
    /// aggregate by contract, and such an event comes from another publisher, or from an
    /// aggregate whose id differs from this one only in case. It is neither folded into this
    /// aggregate's model nor a reason to block it; its own aggregate gets it from the events
    /// collection (`reconcile`, `repair`, or gap filling at its next event). Returns the rest,
    /// `None` when a settle failed (the lock may be gone).
    async fn settle_foreign<R: SessionReceiver>(
        &self,
        session: &mut R,
        msgs: Vec<R::Message>,
        decoded: Vec<Result<Event, Poison>>,
    ) -> Option<(Vec<R::Message>, Vec<Result<Event, Poison>>)> {
        let sid = session.session_id().to_string();
        // Compared without case: Service Bus is reported to treat session ids so, and may hand
        // one back in another case than it was sent (azure-sdk-for-java#48759).
        let sid_lower = sid.to_lowercase();
        let own_session = |aggregate: &str| session_id(aggregate).to_lowercase() == sid_lower;
        // Two aggregates whose ids differ only in case share a session there: the first one
        // of the batch keeps it, the other's events are foreign to it.
        let mut owner: Option<String> = None;
        let mut kept = (
            Vec::with_capacity(msgs.len()),
            Vec::with_capacity(msgs.len()),
        );
        for (msg, d) in msgs.into_iter().zip(decoded) {
            let foreign = match &d {
                Ok(e)
                    if !own_session(&e.aggregate_id)
                        || owner.as_ref().is_some_and(|o| *o != e.aggregate_id) =>
                {
                    Some(e)
                }
                Ok(e) => {
                    owner.get_or_insert_with(|| e.aggregate_id.clone());
                    None
                }
                Err(_) => None,
            };
            let Some(e) = foreign else {
                kept.0.push(msg);
                kept.1.push(d);
                continue;
            };
            let description = format!(
                "event {} of aggregate {:?} arrived in session {sid:?}, the session of another aggregate; one session must carry one aggregate",
                e.version, e.aggregate_id
            );
            let msg_id = msg.message_id().unwrap_or_default();
            tracing::error!(session = %sid, message_id = %msg_id, aggregate = %e.aggregate_id, description = %description, "event of another aggregate dead-lettered");
            if let Err(err) = session
                .dead_letter(&msg, REASON_FOREIGN, &description)
                .await
            {
                self.lock_trouble(&sid, &err);
                return None;
            }
            metrics::counter!(m::DEAD_LETTERED, "reason" => REASON_FOREIGN).increment(1);
        }
        Some(kept)
    }

    /// Works one received batch: dead-letters what is foreign to the session, decides what to do
    /// with the rest (retrying in place a fault that is not the events'), blocks the aggregate
    /// at a poison, settles every message, and clears a session state that says "blocked" once
    /// the aggregate is not.
    pub(super) async fn batch<R: SessionReceiver>(
        &self,
        session: &mut R,
        held: &mut Held,
        msgs: Vec<R::Message>,
        renewal: &mut Renewal,
        cancel: &CancellationToken,
    ) -> After {
        let started = Instant::now();
        let decoded: Vec<Result<Event, Poison>> = msgs.iter().map(decode).collect();
        let Some((msgs, decoded)) = self.settle_foreign(session, msgs, decoded).await else {
            return After::Drop;
        };
        if msgs.is_empty() {
            return After::Continue;
        }
        let aggregate_id = aggregate_of(session.session_id(), &msgs, &decoded);
        let decided = self.decide(session, held, &aggregate_id, &decoded, renewal, cancel);
        let Some((actions, block)) = decided.await else {
            // Lock lost, or shutdown: nothing settled, the broker redelivers.
            return After::Drop;
        };
        if let Some(stop) = &block {
            let record = block_record(&aggregate_id, stop, poison_message_id(&msgs, &actions));
            if !self.block(session, held, &record, renewal, cancel).await {
                return After::Drop;
            }
        }
        if !self
            .settle_messages(session, &aggregate_id, &msgs, &decoded, &actions)
            .await
        {
            return After::Drop;
        }
        if held.blocked.is_none() && held.state_says_blocked {
            if session.set_state(Vec::new()).await.is_err() {
                return After::Drop;
            }
            held.state_says_blocked = false;
        }
        let elapsed = started.elapsed();
        metrics::histogram!(m::APPLY_LATENCY).record(elapsed.as_secs_f64());
        tracing::debug!(aggregate = %aggregate_id, messages = msgs.len(), elapsed_us = elapsed.as_micros() as u64, "batch settled");
        After::Continue
    }

    /// What to do with each message of the batch ([`settle::decide`]) and where to block, if
    /// anywhere. A fault that is not the events' own is retried in place, holding the session
    /// and renewing its lock, for as long as it lasts; `None` when the lock was lost or the
    /// process is shutting down.
    async fn decide<R: SessionReceiver>(
        &self,
        session: &mut R,
        held: &mut Held,
        aggregate_id: &str,
        decoded: &[Result<Event, Poison>],
        renewal: &mut Renewal,
        cancel: &CancellationToken,
    ) -> Option<(Vec<Action>, Option<Stop>)> {
        let items = items_of(decoded);
        let events = decodable_prefix(decoded);
        let mut alarm = self.readiness.alarm(dependency::MONGODB);
        let mut attempt: u32 = 0;
        let mut retry = Retry::new("apply", self.backoff());
        loop {
            let work = self.outcome(held, aggregate_id, &events);
            let (stored, outcome, error) = match self.renewing(session, renewal, work).await? {
                Ok((stored, outcome)) => (stored, outcome, None),
                Err(e) => (0, Outcome::Interrupted, Some(e)),
            };
            if let Decision::Settle { actions, block } = settle::decide(&items, stored, &outcome) {
                return Some((actions, block));
            }
            attempt += 1;
            // A fault that outlasts the retry budget is an outage, not a blip: the process
            // reports it (503) until the batch goes through.
            if attempt > self.cfg.transient_retry_limit {
                alarm.raise();
            }
            let reason = error.as_ref().map_or("none", WorkError::reason);
            let error = error.map(|e| e.to_string()).unwrap_or_default();
            let delay = tracing::warn_span!("batch", aggregate = %aggregate_id, attempt)
                .in_scope(|| retry.next(reason, &error));
            held.models = vec![None; self.projections.len()];
            held.checked_blocked = false;
            if !self.pause(session, renewal, delay, cancel).await {
                return None;
            }
        }
    }

    /// Completes, dead-letters or abandons each message as `actions` say, counting what was
    /// applied, duplicated or dead-lettered. `false` when a settle failed (the lock may be gone).
    async fn settle_messages<R: SessionReceiver>(
        &self,
        session: &mut R,
        aggregate_id: &str,
        msgs: &[R::Message],
        decoded: &[Result<Event, Poison>],
        actions: &[Action],
    ) -> bool {
        // The batch is written: its events count as applied (or as duplicates) whatever
        // becomes of the completes below. Counted at each complete, the events after a refused
        // one were never counted, and their redelivery counts as duplicates.
        let now_ms = mongodb::bson::DateTime::now().timestamp_millis();
        for (d, action) in decoded.iter().zip(actions) {
            if let Action::Complete { applied } = action {
                count_written(*applied, d.as_ref().ok(), now_ms, &self.activity);
            }
        }
        for (msg, action) in msgs.iter().zip(actions) {
            let r = match action {
                Action::Complete { .. } => session.complete(msg).await,
                Action::DeadLetter {
                    reason,
                    description,
                } => {
                    if *reason != REASON_BLOCKED {
                        let msg_id = msg.message_id().unwrap_or_default();
                        tracing::error!(aggregate = %aggregate_id, message_id = %msg_id, reason, description = %description, "poison message");
                    }
                    session
                        .dead_letter(msg, reason, description)
                        .await
                        .map(|()| {
                            metrics::counter!(m::DEAD_LETTERED, "reason" => reason.to_string())
                                .increment(1);
                        })
                }
                Action::Abandon => session.abandon(msg).await,
            };
            if let Err(e) = r {
                self.lock_trouble(session.session_id(), &e);
                return false;
            }
        }
        true
    }

    /// Sleeps `delay` while renewing the session lock; `false` when the lock was lost or the
    /// process is shutting down.
    pub(super) async fn pause<R: SessionReceiver>(
        &self,
        session: &mut R,
        renewal: &mut Renewal,
        delay: Duration,
        cancel: &CancellationToken,
    ) -> bool {
        let sleep = async {
            tokio::select! {
                _ = tokio::time::sleep(delay) => true,
                _ = cancel.cancelled() => false,
            }
        };
        self.renewing(session, renewal, sleep).await == Some(true)
    }

    /// Records the block before the poison is dead-lettered, so a crash in between leaves the
    /// aggregate blocked rather than open to the events after the poison. The record is
    /// retried like any database write; `false` when the session must be dropped.
    pub(super) async fn block<R: SessionReceiver>(
        &self,
        session: &mut R,
        held: &mut Held,
        record: &BlockRecord,
        renewal: &mut Renewal,
        cancel: &CancellationToken,
    ) -> bool {
        let mut retry = Retry::new("block", self.backoff());
        loop {
            match self
                .renewing(session, renewal, self.store.block(record))
                .await
            {
                None => return false,
                Some(Ok(())) => break,
                Some(Err(e)) => {
                    let delay = tracing::warn_span!("block", aggregate = %record.aggregate_id)
                        .in_scope(|| retry.next(e.reason(), &e));
                    if !self.pause(session, renewal, delay, cancel).await {
                        return false;
                    }
                }
            }
        }
        metrics::counter!(m::AGGREGATES_BLOCKED).increment(1);
        tracing::error!(aggregate = %record.aggregate_id, blocked_at = record.blocked_at_event_id, reason = %record.reason, "aggregate blocked");
        held.blocked = Some(record.blocked_at_event_id);
        held.checked_blocked = true;
        if session
            .set_state(crate::blocked_state::text(record))
            .await
            .is_err()
        {
            return false;
        }
        held.state_says_blocked = true;
        true
    }
}

/// What the settlement rule sees of each message: its version, or why it cannot be read.
fn items_of(decoded: &[Result<Event, Poison>]) -> Vec<Item> {
    decoded
        .iter()
        .map(|d| match d {
            Ok(e) => Item::Event(e.version),
            Err(f) => Item::Undecodable(f.clone()),
        })
        .collect()
}

/// The events before the first message that cannot be read: only they may be applied.
fn decodable_prefix(decoded: &[Result<Event, Poison>]) -> Vec<&Event> {
    let cut = decoded
        .iter()
        .position(Result::is_err)
        .unwrap_or(decoded.len());
    decoded[..cut]
        .iter()
        .filter_map(|d| d.as_ref().ok())
        .collect()
}

/// The message id of the poison a block stops at: the first message dead-lettered for a
/// reason of its own (not [`REASON_BLOCKED`]); empty when there is none.
fn poison_message_id<M: Delivery>(msgs: &[M], actions: &[Action]) -> String {
    actions
        .iter()
        .position(|a| matches!(a, Action::DeadLetter { reason, .. } if *reason != REASON_BLOCKED))
        .and_then(|i| msgs[i].message_id())
        .unwrap_or_default()
}

/// Counts a message the batch's write covered: applied (with its end-to-end lag when the
/// event carries a time), or a duplicate.
fn count_written(applied: bool, event: Option<&Event>, now_ms: i64, activity: &Activity) {
    if !applied {
        metrics::counter!(m::DUPLICATES).increment(1);
        return;
    }
    metrics::counter!(m::EVENTS_APPLIED).increment(1);
    activity.applied.fetch_add(1, Relaxed);
    if let Some(ts) = event.and_then(|e| e.timestamp_ms) {
        metrics::histogram!(m::END_TO_END_LAG).record((now_ms - ts).max(0) as f64 / 1000.0);
    }
}
