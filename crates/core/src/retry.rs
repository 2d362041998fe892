//! Capped exponential backoff with jitter, retried until it works or the daemon stops.
//!
//! Every fault path of ordo (broker down, database dropped, a write conflict storm) goes
//! through [`forever`]: the caller classifies errors once (`is_retryable`), and a fatal error
//! or cancellation ends the loop; nothing is retried a bounded number of times and then dropped.

use std::future::Future;
use std::time::Duration;

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

/// Why [`forever`] gave up.
#[derive(Debug)]
pub enum Stopped<E> {
    /// The error is not worth retrying.
    Fatal(E),
    /// The daemon is shutting down.
    Cancelled,
}

/// Runs `op` until it succeeds, retrying errors `is_retryable` accepts with backoff; logs each
/// retry and counts it in `ordo_retries_total{operation}`.
pub async fn forever<T, E, F, Fut>(
    what: &'static str,
    backoff: Backoff,
    cancel: &CancellationToken,
    is_retryable: impl Fn(&E) -> bool,
    mut op: F,
) -> Result<T, Stopped<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut delays = backoff.delays();
    let mut attempt: u64 = 0;
    loop {
        if cancel.is_cancelled() {
            return Err(Stopped::Cancelled);
        }
        let result = tokio::select! {
            r = op() => r,
            _ = cancel.cancelled() => return Err(Stopped::Cancelled),
        };
        match result {
            Ok(v) => {
                if attempt > 0 {
                    tracing::info!(op = what, attempts = attempt + 1, "recovered");
                }
                return Ok(v);
            }
            Err(e) if is_retryable(&e) => {
                attempt += 1;
                let delay = delays.next().unwrap_or(backoff.max);
                metrics::counter!(crate::metrics::RETRIES, "operation" => what).increment(1);
                tracing::warn!(op = what, attempt, delay_ms = delay.as_millis() as u64, error = %e, "retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return Err(Stopped::Cancelled),
                }
            }
            Err(e) => return Err(Stopped::Fatal(e)),
        }
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

    #[tokio::test]
    async fn retries_transient_errors_and_stops_on_fatal_or_cancel() {
        let cancel = CancellationToken::new();
        let b = Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(2),
        };
        let mut n = 0;
        let r: Result<u32, Stopped<String>> = forever(
            "t",
            b,
            &cancel,
            |e: &String| e == "transient",
            || {
                n += 1;
                let v = n;
                async move {
                    if v < 4 {
                        Err("transient".to_string())
                    } else {
                        Ok(v)
                    }
                }
            },
        )
        .await;
        assert_eq!(r.unwrap(), 4);

        let r: Result<u32, _> = forever(
            "t",
            b,
            &cancel,
            |e: &String| e == "transient",
            || async { Err("fatal".to_string()) },
        )
        .await;
        assert!(matches!(r, Err(Stopped::Fatal(e)) if e == "fatal"));

        cancel.cancel();
        let r: Result<u32, Stopped<String>> = forever(
            "t",
            b,
            &cancel,
            |_: &String| true,
            || async { Err("x".to_string()) },
        )
        .await;
        assert!(matches!(r, Err(Stopped::Cancelled)));
    }
}
