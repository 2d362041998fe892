//! Restarting a supervised task: the one rule both daemons restart their tasks by.
//!
//! A supervised task that panics is started again after a delay from its [`Backoff`]; a task
//! that had run for [`HEALTHY_RUN`] before it ended starts the backoff over, so one panic a day
//! waits the shortest delay, not the longest. Every restart is counted in
//! `ordo_task_restarts_total{task}`, and its log line carries the panic's message
//! ([`panic_message`]).
//!
//! What ends supervision is the caller's: the projector's tasks run until shutdown and are
//! also restarted when they return early (`ordo_projector::supervise`); the producer's
//! publishing workers end when the dispatcher drains, and one that fails stops publishing
//! (`ordo_producer::dispatch::supervise`).

use std::any::Any;
use std::time::{Duration, Instant};

use crate::metrics as m;
use crate::retry::Backoff;

/// A task that ran this long before failing was healthy: its next restart starts the backoff
/// over instead of waiting the longest delay.
pub const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// The restarts of one supervised task (or pool of like tasks): the delay before each, and
/// the metric.
pub struct Restarts {
    task: &'static str,
    backoff: Backoff,
    delays: Box<dyn Iterator<Item = Duration> + Send>,
}

impl std::fmt::Debug for Restarts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restarts")
            .field("task", &self.task)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl Restarts {
    /// Restarts of `task` (its label in `ordo_task_restarts_total`), delayed by `backoff`.
    pub fn new(task: &'static str, backoff: Backoff) -> Self {
        Self {
            task,
            backoff,
            delays: Box::new(backoff.delays()),
        }
    }

    /// Counts a restart of a run that started at `started` and returns how long to wait
    /// before starting it again.
    pub fn next_delay(&mut self, started: Instant) -> Duration {
        metrics::counter!(m::TASK_RESTARTS, "task" => self.task).increment(1);
        if started.elapsed() >= HEALTHY_RUN {
            self.delays = Box::new(self.backoff.delays());
        }
        self.delays.next().unwrap_or(self.backoff.max)
    }
}

/// The message a panic carried (`panic!("...")` with or without arguments), for a log line.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }

    #[test]
    fn delays_grow_until_a_healthy_run_starts_them_over() {
        let mut restarts = Restarts::new("test", backoff());
        let now = Instant::now();
        let mut last = Duration::ZERO;
        for _ in 0..8 {
            last = restarts.next_delay(now);
        }
        assert!(last >= Duration::from_secs(5), "{last:?}");
        let long_ago = now - HEALTHY_RUN - Duration::from_secs(1);
        let after_healthy = restarts.next_delay(long_ago);
        assert!(
            after_healthy <= Duration::from_millis(200),
            "{after_healthy:?}"
        );
    }

    #[test]
    fn a_panic_message_is_read_from_either_kind_of_payload() {
        let text = |payload: Box<dyn Any + Send>| panic_message(payload.as_ref());
        assert_eq!(text(Box::new("static")), "static");
        assert_eq!(text(Box::new(format!("formatted {}", 1))), "formatted 1");
        assert_eq!(text(Box::new(7)), "a panic without a message");
    }
}
