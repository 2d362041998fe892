//! What `/readyz` answers, for both daemons: ready unless some dependency is failing right now.
//!
//! Each place that can fail holds a [`Fault`] while its operation keeps failing and drops it on
//! the first success ([`Readiness::hold`], or an [`Alarm`] for a holder that raises and lowers
//! in a loop). Faults are counted per dependency, and dropping one is the only way to clear it,
//! so a task that returns or panics in the middle of a fault clears its own share: readiness
//! cannot stay stuck at 503 after the failing code is gone, nor at 200 while any holder still
//! fails. A dependency that has not answered yet since start holds a fault of its own
//! ([`Readiness::pending`]). Every change is published to the health endpoint at once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use crate::telemetry::Health;

/// The dependencies readiness tracks (also the `dependency` field of its logs).
pub mod dependency {
    /// The database: change stream, scans, reads and writes of documents, the ping.
    pub const MONGODB: &str = "mongodb";
    /// The broker: connecting, authenticating, the topic or subscription, sends and accepts.
    pub const SERVICEBUS: &str = "servicebus";
    /// The producer's acknowledged prefix has not moved for longer than
    /// `producer.checkpoint_stuck_after`.
    pub const CHECKPOINT: &str = "checkpoint";
}

/// Faults currently held, per dependency, and the health flag they drive.
#[derive(Debug, Default)]
pub struct Readiness {
    faults: Mutex<BTreeMap<&'static str, usize>>,
    health: OnceLock<Arc<Health>>,
}

impl Readiness {
    /// Ready (no fault), published nowhere until [`Readiness::publish_to`].
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Sends this verdict and every later one to `health` (the first call decides).
    pub fn publish_to(&self, health: Arc<Health>) {
        let faults = self.lock();
        let _ = self.health.set(health);
        self.publish(&faults);
    }

    /// True while no fault is held.
    pub fn is_ready(&self) -> bool {
        self.lock().values().all(|n| *n == 0)
    }

    /// Marks `dependency` as failing until the returned guard is dropped.
    pub fn fault(self: &Arc<Self>, dependency: &'static str) -> Fault {
        self.raise(dependency, || {
            tracing::warn!(dependency, "not ready: dependency failing");
        })
    }

    /// Marks `dependency` as not answered yet (since start) until the guard is dropped.
    pub fn pending(self: &Arc<Self>, dependency: &'static str) -> Fault {
        self.raise(dependency, || {
            tracing::info!(dependency, "not ready until the dependency answers");
        })
    }

    fn raise(self: &Arc<Self>, dependency: &'static str, first: impl FnOnce()) -> Fault {
        let mut faults = self.lock();
        let n = faults.entry(dependency).or_default();
        *n += 1;
        if *n == 1 {
            first();
        }
        self.publish(&faults);
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

    /// A verdict callback for a probe of `dependency`: `false` holds a fault, `true` drops it.
    pub fn follow(self: &Arc<Self>, dependency: &'static str) -> impl FnMut(bool) + Send {
        let mut alarm = self.alarm(dependency);
        move |reachable| {
            if reachable {
                alarm.lower();
            } else {
                alarm.raise();
            }
        }
    }

    /// An [`Alarm`] for a holder that fails and recovers in a loop.
    pub fn alarm(self: &Arc<Self>, dependency: &'static str) -> Alarm {
        Alarm {
            readiness: self.clone(),
            dependency,
            fault: None,
        }
    }

    /// The dependencies failing now.
    pub fn failing(&self) -> Vec<&'static str> {
        self.lock()
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(d, _)| *d)
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<&'static str, usize>> {
        self.faults.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called with the lock held, so two concurrent changes cannot publish out of order.
    fn publish(&self, faults: &BTreeMap<&'static str, usize>) {
        if let Some(health) = self.health.get() {
            health.set_ready(faults.values().all(|n| *n == 0));
        }
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
        let mut faults = self.readiness.lock();
        let n = faults.entry(self.dependency).or_default();
        *n = n.saturating_sub(1);
        if *n == 0 {
            tracing::info!(
                dependency = self.dependency,
                "dependency no longer failing (recovered, or its last failing holder stopped)"
            );
        }
        self.readiness.publish(&faults);
    }
}

/// One holder's vote against readiness, raised and lowered as its operation fails and works;
/// lowered when dropped.
#[derive(Debug)]
pub struct Alarm {
    readiness: Arc<Readiness>,
    dependency: &'static str,
    fault: Option<Fault>,
}

impl Alarm {
    /// The holder is failing (counted once, however often it is raised).
    pub fn raise(&mut self) {
        self.readiness.hold(&mut self.fault, self.dependency);
    }

    /// Whether this holder votes against readiness now.
    pub fn is_raised(&self) -> bool {
        self.fault.is_some()
    }

    /// The holder works again.
    pub fn lower(&mut self) {
        self.fault = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_fault_is_dropped_even_by_a_panicking_holder() {
        let health = Health::new();
        health.set_started();
        let r = Readiness::new();
        r.publish_to(health.clone());
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

    #[test]
    fn alarms_probes_and_a_pending_answer_hold_readiness_until_lowered_or_dropped() {
        let r = Readiness::new();
        let first_answer = r.pending(dependency::SERVICEBUS);
        assert!(!r.is_ready(), "not before the broker answered");
        drop(first_answer);
        assert!(r.is_ready());
        let mut a = r.alarm(dependency::SERVICEBUS);
        let mut b = r.alarm(dependency::MONGODB);
        a.raise();
        a.raise();
        b.raise();
        assert_eq!(r.failing(), [dependency::MONGODB, dependency::SERVICEBUS]);
        a.lower();
        assert!(!r.is_ready(), "the database alarm is still raised");
        drop(b);
        assert!(r.is_ready());
        let mut probe = r.follow(dependency::MONGODB);
        probe(false);
        probe(false);
        assert_eq!(r.failing(), [dependency::MONGODB]);
        probe(true);
        assert!(r.is_ready());
        // Published when the health endpoint comes later, too.
        probe(false);
        let health = Health::new();
        health.set_started();
        r.publish_to(health.clone());
        assert!(!health.is_ready());
        probe(true);
        assert!(health.is_ready());
    }
}
