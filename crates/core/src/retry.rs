//! Capped exponential backoff with jitter: the delays every retry loop of ordo waits.
//!
//! Each loop (publishing, the change stream, checkpoints, the lease, session work)
//! classifies its own errors, holds its own readiness fault while it retries, counts each retry
//! in `ordo_retries_total{operation, reason}`, and retries until it works or the daemon stops;
//! nothing is retried a bounded number of times and then dropped. What they share is this
//! sequence of delays.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

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
}
