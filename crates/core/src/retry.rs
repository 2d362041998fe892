//! Retrying: the capped, jittered backoff and [`Retry`], the step most retry loops of ordo
//! take after a failure.
//!
//! Each loop classifies its own errors and, where the failure makes its daemon unready, holds
//! its own readiness fault (`crate::readiness`) while it retries (the producer's event index
//! check holds none: publishing does not need the index, and a database that is down faults
//! the change stream). In publishing and parking, the change stream and the scan, loading,
//! claiming and the final save of checkpoints, the lease, the event index check and the
//! projector's batches, the step after a failure is
//! [`Retry::pause`] (or [`Retry::next`] for a loop that also wakes on something else): count the
//! retry in `ordo_retries_total{operation, reason}`, log it, wait the next delay or stop when
//! the daemon does. Nothing is retried a bounded number of times and then dropped.
//!
//! These loops count or wait their own way instead, each for the reason its own doc gives:
//! - the projector's accept `back_off` (`worker/accept.rs`): its delay is indexed by the
//!   failures of every worker since the broker last answered, not by this worker's own
//!   sequence; its wait also ends when the broker probe answers again; and its `reason` is the
//!   broker's AMQP condition, known only at run time, where `Retry` takes a `&'static str`.
//!   An unclear refusal of an accept, which is no fault, is counted and waited out there too,
//!   on the worker's own delays.
//! - the projector's broker probe (`probes.rs`): the same run-time `reason`, and it logs an
//!   outage once, when it begins, not at every check.
//! - the producer's broker probe (`probe.rs`): it runs at a fixed interval whether a check
//!   failed or not, so there is no backoff to step; it counts and logs a failure itself.
//! - the producer's periodic checkpoint save (`checkpointer.rs`) and the projector's periodic
//!   reconciliation (`reconcile`): the next try is the next tick, not a backoff delay, so they
//!   count and log a failure themselves.
//! - the change stream meeting an event over 16 MB: counted, and the stream reopens at once.
//! - the projector's wait for events still in flight (`store/events.rs`,
//!   `wait_for_events`): a bounded poll, not a retry; nothing failed, so nothing is counted.
//! - `repair`'s wait for a session a worker still holds (`blocked_state.rs`, `clear_one`): a
//!   one-shot command's bounded wait for a refusal that is no fault; what is still refused
//!   after it is reported to the operator.
//!
//! A version guard that finds its document moved is no fault either: the writer reads the
//! document again and folds again, a bounded number of times, and hands on what is still
//! moving: a worker's batch, after more than `transient_retry_limit` conflicts (at least 3),
//! is retried in place like any other fault, with `reason="conflicts"`, holding its session
//! (`worker/apply.rs`, `worker/batch.rs`); reconciliation leaves the model to the worker after
//! 3 (`reconcile/catch_up.rs`); `repair` reports an error after 10 (`store/models.rs`). The
//! workers' and reconciliation's conflicts are counted in `ordo_guard_conflicts_total`.

use std::{fmt::Display, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// Backoff bounds.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// An endless sequence of jittered delays, doubling up to `max`.
    pub fn delays(&self) -> impl Iterator<Item = Duration> {
        let cap = self.max;
        ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
            .map(move |d| d.min(cap))
    }
}

/// One retry loop: the operation it retries (the `operation` label) and where it is in its
/// backoff.
pub struct Retry {
    op: &'static str,
    backoff: Backoff,
    delays: Box<dyn Iterator<Item = Duration> + Send>,
}

impl std::fmt::Debug for Retry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retry")
            .field("op", &self.op)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl Retry {
    /// A loop retrying `op` with delays from `backoff` (each daemon's `retry_initial` and
    /// `retry_max`).
    pub fn new(op: &'static str, backoff: Backoff) -> Self {
        Self {
            op,
            backoff,
            delays: Box::new(backoff.delays()),
        }
    }

    /// Counts a retry of the operation for `reason` (a short label: `database`, `busy`, ...),
    /// logs `error` at warn, and returns how long to wait before the next attempt.
    pub fn next(&mut self, reason: &'static str, error: &dyn Display) -> Duration {
        let delay = self.delays.next().unwrap_or(self.backoff.max);
        ::metrics::counter!(crate::metrics::RETRIES, "operation" => self.op, "reason" => reason)
            .increment(1);
        tracing::warn!(
            op = self.op,
            reason,
            delay_ms = delay.as_millis() as u64,
            error = %error,
            "retrying"
        );
        delay
    }

    /// Counts a retry of the operation for `reason` that is made at once, without a delay nor
    /// a step of the backoff (the failure was not the dependency's: a stale link, say), and
    /// logs `error` at info.
    pub fn at_once(&self, reason: &'static str, error: &dyn Display) {
        ::metrics::counter!(crate::metrics::RETRIES, "operation" => self.op, "reason" => reason)
            .increment(1);
        tracing::info!(op = self.op, reason, error = %error, "retrying at once");
    }

    /// [`next`](Self::next), then waits the delay out; false when `cancel` fires first, and the
    /// loop should end. `error` is `Sync` so the pause can be held across the wait in a task.
    pub async fn pause(
        &mut self,
        reason: &'static str,
        error: &(dyn Display + Sync),
        cancel: &CancellationToken,
    ) -> bool {
        let delay = self.next(reason, error);
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = cancel.cancelled() => false,
        }
    }

    /// Starts the backoff over, after an attempt that worked.
    pub fn reset(&mut self) {
        self.delays = Box::new(self.backoff.delays());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        let b = Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(200),
        };
        let d: Vec<_> = b.delays().take(20).collect();
        assert_eq!(d.len(), 20, "the sequence never ends");
        assert!(d.iter().all(|x| *x <= Duration::from_millis(200)));
        assert!(
            d[19] >= Duration::from_millis(100),
            "reaches the cap region: {d:?}"
        );
    }

    fn tiny() -> Backoff {
        Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(4),
        }
    }

    #[tokio::test]
    async fn a_pause_ends_early_and_says_stop_when_cancelled() {
        let mut retry = Retry::new(
            "test",
            Backoff {
                initial: Duration::from_secs(3600),
                max: Duration::from_secs(3600),
            },
        );
        let cancel = CancellationToken::new();
        cancel.cancel();
        let paused =
            tokio::time::timeout(Duration::from_secs(5), retry.pause("x", &"boom", &cancel))
                .await
                .expect("a cancelled pause returns at once");
        assert!(!paused);
    }

    #[tokio::test]
    async fn a_pause_waits_its_delay_and_says_go_on() {
        let mut retry = Retry::new("test", tiny());
        let cancel = CancellationToken::new();
        assert!(retry.pause("x", &"boom", &cancel).await);
    }

    #[test]
    fn delays_grow_until_reset_starts_them_over() {
        let mut retry = Retry::new(
            "test",
            Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(100),
            },
        );
        let first = retry.next("x", &"boom");
        for _ in 0..8 {
            retry.next("x", &"boom");
        }
        let later = retry.next("x", &"boom");
        assert!(later > first * 4, "{first:?} then {later:?}");
        retry.reset();
        let again = retry.next("x", &"boom");
        assert!(again < later / 4, "{again:?} after reset, {later:?} before");
    }
}
