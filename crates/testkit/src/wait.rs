//! Polling helpers: tests wait for a condition with a deadline instead of sleeping.

use std::fmt::Debug;
use std::future::Future;
use std::panic::Location;
use std::time::Duration;

use tokio::time::Instant;

/// How often conditions are re-evaluated. Short, so tests finish as soon as the condition holds.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `condition` until it returns true; panics naming the caller's line if `timeout` passes
/// first. The condition is always evaluated at least once, and once more at the deadline.
#[track_caller]
pub fn wait_until<F, Fut>(timeout: Duration, condition: F) -> impl Future<Output = ()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let caller = Location::caller();
    let mut condition = condition;
    async move {
        let waited = wait_for_inner(caller, timeout, || {
            let fut = condition();
            async move { fut.await.then_some(()) }
        })
        .await;
        if waited.is_none() {
            panic!("condition not met within {timeout:?} (wait_until at {caller})");
        }
    }
}

/// Polls `probe` until it yields `Some(value)` and returns the value; panics naming the caller's
/// line if `timeout` passes first.
#[track_caller]
pub fn wait_for<T, F, Fut>(timeout: Duration, probe: F) -> impl Future<Output = T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let caller = Location::caller();
    async move {
        match wait_for_inner(caller, timeout, probe).await {
            Some(value) => value,
            None => panic!("no value within {timeout:?} (wait_for at {caller})"),
        }
    }
}

/// Polls `probe` until it returns `Ok`; on timeout panics with the last error, which usually
/// says more than "timed out" does.
#[track_caller]
pub fn wait_until_ok<T, E, F, Fut>(timeout: Duration, probe: F) -> impl Future<Output = T>
where
    E: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let caller = Location::caller();
    let mut probe = probe;
    async move {
        let _waiting = crate::watchdog::waiting(caller);
        let deadline = Instant::now() + timeout;
        loop {
            // Kept as it is and formatted only for the panic: most probes fail many times.
            let last = match bounded(deadline, probe()).await {
                Some(Ok(value)) => return value,
                Some(Err(e)) => Some(e),
                None => None,
            };
            if Instant::now() >= deadline {
                let last = last.map_or_else(
                    || "the last probe did not return by the deadline".to_owned(),
                    |e| format!("{e:?}"),
                );
                panic!("still failing after {timeout:?} (wait_until_ok at {caller}): {last}");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// `probe`'s answer, or `None` once `deadline` has passed: a probe that hangs (a database call
/// without a reply) ends the wait at its deadline like a probe that keeps saying no.
async fn bounded<T>(deadline: Instant, probe: impl Future<Output = T>) -> Option<T> {
    // A probe started at the deadline still gets one poll interval to answer.
    tokio::time::timeout_at(deadline.max(Instant::now() + POLL_INTERVAL), probe)
        .await
        .ok()
}

async fn wait_for_inner<T, F, Fut>(
    caller: &'static Location<'static>,
    timeout: Duration,
    mut probe: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let _waiting = crate::watchdog::waiting(caller);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = bounded(deadline, probe()).await.flatten() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline - Instant::now())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn wait_until_returns_once_the_condition_holds() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        wait_until(Duration::from_secs(5), move || {
            let c = c.clone();
            async move { c.fetch_add(1, Ordering::SeqCst) + 1 >= 3 }
        })
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    #[should_panic(expected = "condition not met within")]
    async fn wait_until_panics_on_timeout() {
        wait_until(Duration::from_millis(50), || async { false }).await;
    }

    #[tokio::test]
    async fn wait_for_yields_the_value() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let v = wait_for(Duration::from_secs(5), move || {
            let c = c.clone();
            async move {
                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                (n == 2).then_some(n * 10)
            }
        })
        .await;
        assert_eq!(v, 20);
    }

    #[tokio::test]
    #[should_panic(expected = "boom")]
    async fn wait_until_ok_reports_the_last_error() {
        wait_until_ok(Duration::from_millis(50), || async { Err::<(), _>("boom") }).await;
    }

    /// A probe that never answers (a database call without a reply) ends the wait at its
    /// deadline, naming the caller, instead of hanging the test.
    #[tokio::test]
    async fn a_probe_that_never_answers_ends_the_wait_at_its_deadline() {
        let started = Instant::now();
        let hung = tokio::spawn(wait_until(Duration::from_millis(200), || {
            std::future::pending::<bool>()
        }));
        let panic = hung.await.expect_err("the wait must panic").into_panic();
        let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            message.contains("condition not met within 200ms"),
            "{message}"
        );
        assert!(message.contains("wait.rs"), "{message}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let hung = tokio::spawn(wait_until_ok(Duration::from_millis(200), || {
            std::future::pending::<Result<(), String>>()
        }));
        let panic = hung.await.expect_err("the wait must panic").into_panic();
        let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            message.contains("did not return by the deadline"),
            "{message}"
        );
    }
}
