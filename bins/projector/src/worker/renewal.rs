//! When a held session's lock is renewed: every `lock_renewal_interval`, or every third of the
//! lock when the broker grants one too short for that interval.

use super::Engine;
use crate::config::MIN_LOCK_RENEWAL_INTERVAL;
use ordo_core::servicebus::receiver::SessionReceiver;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// A held session's next renewal: `every` after the accept or the last renewal.
pub(super) struct Renewal {
    last: Instant,
    every: Duration,
}

impl Renewal {
    /// When the lock is to be renewed next.
    pub(super) fn due(&self) -> Instant {
        self.last + self.every
    }

    /// The lock was renewed now.
    pub(super) fn renewed(&mut self) {
        self.last = Instant::now();
    }
}

impl Engine {
    /// The renewal of `session`, just accepted: every `lock_renewal_interval`, unless that is
    /// more than half the lock the broker granted (the subscription's lock duration is
    /// shorter than the configuration assumes); then every third of the granted lock, with a
    /// warning, once per process, that names the key. Renewing on the configured interval
    /// would lose every lock held longer than its duration: the messages would be delivered
    /// again and again and dead-lettered at the subscription's max delivery count.
    pub(super) fn renewal<R: SessionReceiver>(&self, session: &R) -> Renewal {
        let configured = self.cfg.lock_renewal_interval;
        let every = match session.lock_left() {
            Some(granted) if configured > granted / 2 => {
                let every = (granted / 3).max(MIN_LOCK_RENEWAL_INTERVAL);
                if !self.short_lock_warned.swap(true, Relaxed) {
                    tracing::warn!(
                        lock_renewal_interval = ?configured,
                        lock_granted = ?granted,
                        renewing_every = ?every,
                        "projector.lock_renewal_interval is more than half the session lock the \
                         broker grants (the subscription's lock duration): renewing every third \
                         of the lock instead; set the key to a third of the lock duration"
                    );
                }
                every
            }
            _ => configured,
        };
        Renewal {
            last: Instant::now(),
            every,
        }
    }
}
