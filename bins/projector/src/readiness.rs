//! What the projector's `/readyz` says: ready once the broker has answered an accept, while
//! MongoDB answers and no worker is stuck on a fault. Workers raise an [`Alarm`] while their
//! connect or accept fails (broker unreachable, credentials refused, topic or subscription
//! missing or without sessions) or while a batch is retried for a database fault; the probes
//! in `probes.rs` ping MongoDB and check Service Bus apart from the accepts. Every change is
//! published to the health endpoint at once.
//! An alarm is lowered when its holder succeeds, or when it is dropped (a worker that panics
//! does not leave the process unready for good).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use ordo_core::telemetry::Health;

/// The faults that make the projector unready.
#[derive(Debug)]
pub struct Readiness {
    broker: AtomicUsize,
    store: AtomicUsize,
    database: AtomicBool,
    broker_answered: AtomicBool,
    health: OnceLock<Arc<Health>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            broker: AtomicUsize::new(0),
            store: AtomicUsize::new(0),
            database: AtomicBool::new(true),
            broker_answered: AtomicBool::new(false),
            health: OnceLock::new(),
        }
    }
}

impl Readiness {
    /// True once the broker has answered and while nothing is failing.
    pub fn is_ready(&self) -> bool {
        self.broker_answered.load(Ordering::SeqCst)
            && self.broker.load(Ordering::SeqCst) == 0
            && self.store.load(Ordering::SeqCst) == 0
            && self.database.load(Ordering::SeqCst)
    }

    /// Sends every later verdict to `health` (and this one).
    pub fn publish_to(&self, health: Arc<Health>) {
        let _ = self.health.set(health);
        self.publish();
    }

    fn publish(&self) {
        if let Some(h) = self.health.get() {
            h.set_ready(self.is_ready());
        }
    }

    /// The probe's verdict on MongoDB.
    pub fn set_database_reachable(&self, reachable: bool) {
        self.database.store(reachable, Ordering::SeqCst);
        self.publish();
    }

    /// A worker's accept was answered by the broker (a session, or none available): the
    /// connection, the credentials and the subscription work.
    pub fn broker_answered(&self) {
        if !self.broker_answered.swap(true, Ordering::SeqCst) {
            self.publish();
        }
    }

    /// Whether a worker's accept has been answered since start.
    pub fn has_broker_answered(&self) -> bool {
        self.broker_answered.load(Ordering::SeqCst)
    }

    /// An alarm for a worker's Service Bus connection.
    pub fn broker_alarm(&self) -> Alarm<'_> {
        Alarm {
            readiness: self,
            count: &self.broker,
            raised: false,
        }
    }

    /// An alarm for a batch retried for a database fault.
    pub fn store_alarm(&self) -> Alarm<'_> {
        Alarm {
            readiness: self,
            count: &self.store,
            raised: false,
        }
    }
}

/// One holder's vote against readiness.
#[derive(Debug)]
pub struct Alarm<'a> {
    readiness: &'a Readiness,
    count: &'a AtomicUsize,
    raised: bool,
}

impl Alarm<'_> {
    /// The holder is failing.
    pub fn raise(&mut self) {
        if !self.raised {
            self.raised = true;
            self.count.fetch_add(1, Ordering::SeqCst);
            self.readiness.publish();
        }
    }

    /// Whether this holder votes against readiness now.
    pub fn is_raised(&self) -> bool {
        self.raised
    }

    /// The holder works again.
    pub fn lower(&mut self) {
        if self.raised {
            self.raised = false;
            self.count.fetch_sub(1, Ordering::SeqCst);
            self.readiness.publish();
        }
    }
}

impl Drop for Alarm<'_> {
    fn drop(&mut self) {
        self.lower();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_alarm_holds_readiness_until_lowered_or_dropped() {
        let r = Readiness::default();
        assert!(!r.is_ready(), "not before the broker answered");
        r.broker_answered();
        assert!(r.is_ready());
        let mut a = r.broker_alarm();
        let mut b = r.store_alarm();
        a.raise();
        a.raise();
        b.raise();
        assert!(!r.is_ready());
        a.lower();
        assert!(!r.is_ready(), "the store alarm is still raised");
        drop(b);
        assert!(r.is_ready());
        r.set_database_reachable(false);
        assert!(!r.is_ready());
    }
}
