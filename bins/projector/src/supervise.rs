//! No task dies alone: every long-running task of the projector (session workers, the readiness
//! probe, the heartbeat, the blocked-aggregates gauge) runs under [`supervise`], which respawns
//! it when it panics or returns before shutdown, by the restart rule both daemons share
//! ([`ordo_core::restart`]: backoff, started over after a healthy run, counted in
//! `ordo_task_restarts_total{task}`). A panic in one session worker therefore never shrinks the
//! pool: its session is released (the broker redelivers), and a fresh worker takes its place.
//!
//! Unlike the producer's publishing workers, a task here has no normal end before shutdown, so
//! an early return is restarted like a panic.

use std::future::Future;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use ordo_core::restart::{panic_message, Restarts};
use ordo_core::retry::Backoff;

/// Runs `start()` until `cancel`, respawning it after a panic or an early return. Calls
/// `on_restart` once per restart (besides the metric), for callers that keep their own count.
pub async fn supervise<F, Fut>(
    task: &'static str,
    cancel: CancellationToken,
    backoff: Backoff,
    mut start: F,
    on_restart: impl Fn(),
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut restarts = Restarts::new(task, backoff);
    loop {
        let started = Instant::now();
        let ended = tokio::spawn(start()).await;
        if cancel.is_cancelled() {
            return;
        }
        match ended {
            Ok(()) => tracing::error!(task, "task ended before shutdown; restarting it"),
            Err(e) if e.is_panic() => {
                let message = panic_message(e.into_panic().as_ref());
                tracing::error!(task, panic = %message, "task panicked; restarting it");
            }
            Err(e) => tracing::error!(task, error = %e, "task was cancelled; restarting it"),
        }
        let delay = restarts.next_delay(started);
        on_restart();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_panicking_task_is_restarted_until_it_runs() {
        let runs = Arc::new(AtomicUsize::new(0));
        let restarts = Arc::new(AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        let backoff = Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(5),
        };
        let (r, c) = (runs.clone(), cancel.clone());
        let counted = restarts.clone();
        supervise(
            "test",
            cancel.clone(),
            backoff,
            move || {
                let r = r.clone();
                let c = c.clone();
                async move {
                    if r.fetch_add(1, Ordering::SeqCst) < 3 {
                        panic!("boom");
                    }
                    c.cancel();
                }
            },
            move || {
                counted.fetch_add(1, Ordering::SeqCst);
            },
        )
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 4);
        assert_eq!(restarts.load(Ordering::SeqCst), 3);
    }
}
