//! Graceful shutdown, the same shape in both daemons: one root [`CancellationToken`], every
//! long-running task on [`Shutdown::tracker`], and one bounded drain at the end
//! ([`Shutdown::drain`]) within the grace period (`[shutdown] grace_period`).
//!
//! On SIGTERM or SIGINT the token is cancelled. Readiness flips first (the telemetry server
//! watches the same token), then every loop stops taking work and the daemon drains:
//! - the projector's workers finish or release the session they hold; they are independent of
//!   one another, so waiting for all of them at once is enough: the drain waits at most the
//!   grace period;
//! - the producer's tasks (the readiness probes, the events index check, the lease loop and
//!   its active term's reader, publishing workers, checkpointer and lease keeper) are on the
//!   tracker too, but its term stops its own tasks in order within the grace period
//!   (`bins/producer/src/term.rs`): the reader stops, the publishing workers drain (0.6 of
//!   it), the checkpointer and lease keeper stop (0.1 each), the checkpoint is saved over what
//!   was acknowledged (0.2), then the lease is released. The tracker cannot replace that
//!   order, as it only waits for all tasks at once: the final checkpoint may cover only what
//!   the drained workers got acknowledged, and the lease must be held while it is saved. So
//!   the term keeps its tasks' handles, and the drain waits for the term with the rest, bounded
//!   by the grace period plus two [`LAST_STEP`]s (the lease release, and a margin), so the
//!   bound never cuts the term's order short. A producer that stops with an error cancels the
//!   token itself, so its other tasks end with it.
//!
//! Sub-tasks a tracked task owns (the producer's change-stream reading task, its publishing
//! workers in their supervisor's `JoinSet`) are not on the tracker: they end, or are aborted,
//! with their owner.
//!
//! What is left after the grace period (the lease release, the projector's heartbeat removal,
//! the database client's close) is bounded by 2 s each: a hung database never holds a
//! shutdown. A second signal does not wait: the process exits at once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long each last step at exit (a lease release, a heartbeat removal, a database client's
/// close) may wait: a hung database never answers.
pub const LAST_STEP: Duration = Duration::from_secs(2);

/// Runs `step`, the removal of something that also expires on its own (a lease, a heartbeat),
/// waiting at most [`LAST_STEP`]; a failure or a timeout is logged as `what`, not returned.
pub async fn last_step<T, E: std::fmt::Display>(
    what: &'static str,
    step: impl std::future::Future<Output = Result<T, E>>,
) {
    match tokio::time::timeout(LAST_STEP, step).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(step = what, error = %e, "failed at exit; it expires on its own")
        }
        Err(_) => tracing::warn!(step = what, "timed out at exit; it expires on its own"),
    }
}

/// The root token and tracker of a daemon.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Cancelled when the daemon must stop.
    pub token: CancellationToken,
    /// Every long-running task of the daemon.
    pub tracker: TaskTracker,
}

/// How the drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every task finished within the grace period.
    Clean,
    /// The grace period ran out with tasks still running.
    TimedOut,
}

impl Shutdown {
    /// A fresh root.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels the token on the first SIGTERM/SIGINT; exits the process with status 130 on the
    /// second, for an operator who does not want to wait.
    pub fn listen_for_signals(&self) {
        let token = self.token.clone();
        tokio::spawn(async move {
            let first = wait_for_signal().await;
            tracing::info!(signal = first, "shutdown requested");
            token.cancel();
            let second = wait_for_signal().await;
            tracing::warn!(signal = second, "second signal: exiting without waiting");
            std::process::exit(130);
        });
    }

    /// Waits for the tracked tasks, at most `grace`.
    pub async fn drain(&self, grace: Duration) -> Drained {
        self.tracker.close();
        match tokio::time::timeout(grace, self.tracker.wait()).await {
            Ok(()) => Drained::Clean,
            Err(_) => {
                tracing::warn!(
                    grace_ms = grace.as_millis() as u64,
                    tasks = self.tracker.len(),
                    "grace period over with tasks still running"
                );
                Drained::TimedOut
            }
        }
    }
}

#[cfg(unix)]
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "ctrl-c"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_tasks_and_is_bounded() {
        let s = Shutdown::new();
        let token = s.token.clone();
        s.tracker.spawn(async move { token.cancelled().await });
        s.token.cancel();
        assert_eq!(s.drain(Duration::from_secs(5)).await, Drained::Clean);

        let s = Shutdown::new();
        s.tracker.spawn(std::future::pending::<()>());
        assert_eq!(s.drain(Duration::from_millis(50)).await, Drained::TimedOut);
    }
}
