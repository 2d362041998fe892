//! No task dies alone: every long-running task of the projector (session workers, the readiness
//! probe, the heartbeat, the blocked-aggregates gauge) runs under [`supervise`], which respawns
//! it with backoff when it panics or returns before shutdown, and counts each restart in
//! `ordo_task_restarts_total{task}`. A panic in one session worker therefore never shrinks the
//! pool: its session is released (the broker redelivers), and a fresh worker takes its place.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use ordo_core::metrics as m;
use ordo_core::retry::Backoff;

/// A task that ran this long before failing was healthy: its next restart starts the backoff
/// over instead of waiting the longest delay.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

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
    let mut delays = backoff.delays();
    loop {
        let started = Instant::now();
        let ended = tokio::spawn(start()).await;
        if cancel.is_cancelled() {
            return;
        }
        match ended {
            Ok(()) => tracing::error!(task, "task ended before shutdown; restarting it"),
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(not a string)".into());
                tracing::error!(task, panic = %message, "task panicked; restarting it");
            }
            Err(e) => tracing::error!(task, error = %e, "task was cancelled; restarting it"),
        }
        metrics::counter!(m::TASK_RESTARTS, "task" => task).increment(1);
        on_restart();
        if started.elapsed() >= HEALTHY_RUN {
            delays = backoff.delays();
        }
        let delay = delays.next().unwrap_or(backoff.max);
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
