//! The broker gate: while Service Bus is down, one session worker at a time probes it.

use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

/// While Service Bus is down, one worker at a time tries it, and sleeps its backoff before it
/// lets the next one try; the others wait. Without it every session worker reconnected on its
/// own backoff: 32 workers retried about 17 times a second through an outage, and the retry
/// alert fired on any outage. The first answer opens the gate for all, and so does the broker
/// probe answering again after an outage ([`Engine::broker_probe_recovered`]). The gate starts
/// closed: until the broker first answered an accept, it is as good as down.
///
/// A probe waits at most [`PROBE_ACCEPT_WAIT`] for a session: an idle broker answers an
/// accept only when its hold ends (60 s on Service Bus), and readiness must come back within
/// seconds of the broker, also with `accept_timeout` set above that hold.
#[derive(Debug)]
pub(super) struct BrokerGate {
    down: AtomicBool,
    /// Failures since the broker last answered, of all workers: the backoff is the process's,
    /// or each worker would take its turn with a short delay of its own.
    failures: AtomicU64,
    probe: Arc<tokio::sync::Mutex<()>>,
}

/// The longest a probe waits for a session (see [`BrokerGate`]).
pub(super) const PROBE_ACCEPT_WAIT: Duration = Duration::from_secs(3);

impl Default for BrokerGate {
    fn default() -> Self {
        Self {
            down: AtomicBool::new(true),
            failures: AtomicU64::new(0),
            probe: Arc::default(),
        }
    }
}

impl BrokerGate {
    /// The probe permit when the broker is down (waits for it), nothing when it is up.
    pub(super) async fn pass(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        if !self.down.load(SeqCst) {
            return None;
        }
        let permit = self.probe.clone().lock_owned().await;
        // Those queued behind a probe that found the broker back all go at once.
        self.down.load(SeqCst).then_some(permit)
    }

    pub(super) fn up(&self) {
        self.down.store(false, SeqCst);
        self.failures.store(0, Relaxed);
    }

    /// Marks the broker down; the number of failures before this one.
    pub(super) fn failed(&self) -> u64 {
        self.down.store(true, SeqCst);
        self.failures.fetch_add(1, Relaxed)
    }
}
