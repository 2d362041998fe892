//! What `/readyz` answers: ready unless some dependency is failing right now.
//!
//! Each place that can fail holds a [`Fault`] while its operation keeps failing and drops it
//! on the first success. The guard is counted per dependency, and dropping it is the only way
//! to clear it, so a task that returns or panics in the middle of a fault clears its own share:
//! readiness cannot stay stuck at 503 after the failing code is gone, nor at 200 while any
//! holder still fails.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use ordo_core::telemetry::Health;

/// The dependencies readiness tracks (also the `dependency` field of its logs).
pub mod dependency {
    /// The database: change stream, scans, parking, checkpoints, leases.
    pub const MONGODB: &str = "mongodb";
    /// The broker: connecting, authenticating, the topic, sends.
    pub const SERVICEBUS: &str = "servicebus";
    /// The acknowledged prefix has not moved for longer than `producer.checkpoint_stuck_after`.
    pub const CHECKPOINT: &str = "checkpoint";
}

/// Faults currently held, per dependency, and the health flag they drive.
#[derive(Debug)]
pub struct Readiness {
    health: Arc<Health>,
    faults: Mutex<BTreeMap<&'static str, usize>>,
}

impl Readiness {
    /// Ready (no fault) over `health`.
    pub fn new(health: Arc<Health>) -> Arc<Self> {
        health.set_ready(true);
        Arc::new(Self {
            health,
            faults: Mutex::default(),
        })
    }

    /// Marks `dependency` as failing until the returned guard is dropped.
    pub fn fault(self: &Arc<Self>, dependency: &'static str) -> Fault {
        let mut faults = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
        let n = faults.entry(dependency).or_default();
        *n += 1;
        if *n == 1 {
            tracing::warn!(dependency, "not ready: dependency failing");
        }
        self.health.set_ready(false);
        Fault {
            readiness: self.clone(),
            dependency,
        }
    }

    /// Holds a fault in `slot` (once, however often the operation fails).
    pub fn hold(self: &Arc<Self>, slot: &mut Option<Fault>, dependency: &'static str) {
        if slot.is_none() {
            *slot = Some(self.fault(dependency));
        }
    }

    /// The dependencies failing now.
    pub fn failing(&self) -> Vec<&'static str> {
        let faults = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
        faults
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(d, _)| *d)
            .collect()
    }
}

/// A dependency failing; dropping it says the holder's operation works again (or is gone).
#[derive(Debug)]
pub struct Fault {
    readiness: Arc<Readiness>,
    dependency: &'static str,
}

impl Drop for Fault {
    fn drop(&mut self) {
        let mut faults = self
            .readiness
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = faults.entry(self.dependency).or_default();
        *n = n.saturating_sub(1);
        if *n == 0 {
            tracing::info!(dependency = self.dependency, "dependency recovered");
        }
        let ready = faults.values().all(|n| *n == 0);
        self.readiness.health.set_ready(ready);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_fault_is_dropped_even_by_a_panicking_holder() {
        let health = Health::new();
        health.set_started();
        let r = Readiness::new(health.clone());
        assert!(health.is_ready());
        let a = r.fault(dependency::MONGODB);
        let b = r.fault(dependency::MONGODB);
        let c = r.fault(dependency::SERVICEBUS);
        drop(a);
        assert!(!health.is_ready());
        assert_eq!(r.failing(), [dependency::MONGODB, dependency::SERVICEBUS]);
        drop(b);
        assert!(!health.is_ready());
        // A holder that panics still clears its fault.
        let held = std::thread::spawn(move || {
            let _c = c;
            panic!("holder dies");
        })
        .join();
        assert!(held.is_err());
        assert!(health.is_ready());
        let mut slot = None;
        r.hold(&mut slot, dependency::CHECKPOINT);
        r.hold(&mut slot, dependency::CHECKPOINT);
        assert_eq!(r.failing(), [dependency::CHECKPOINT]);
        slot = None;
        assert!(slot.is_none() && health.is_ready());
    }
}
