//! What the projector's `/readyz` says: ready while MongoDB answers and no worker is stuck on a
//! fault. Workers raise an [`Alarm`] while their connect or accept fails (broker unreachable,
//! credentials refused, topic or subscription missing or without sessions) or while a batch is
//! retried for a database fault; the probe task in `lib.rs` pings MongoDB and publishes the
//! verdict. An alarm is lowered when its holder succeeds, or when it is dropped (a worker that
//! panics does not leave the process unready for good).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The faults that make the projector unready.
#[derive(Debug)]
pub struct Readiness {
    broker: AtomicUsize,
    store: AtomicUsize,
    database: AtomicBool,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            broker: AtomicUsize::new(0),
            store: AtomicUsize::new(0),
            database: AtomicBool::new(true),
        }
    }
}

impl Readiness {
    /// True while nothing is failing.
    pub fn is_ready(&self) -> bool {
        self.broker.load(Ordering::SeqCst) == 0
            && self.store.load(Ordering::SeqCst) == 0
            && self.database.load(Ordering::SeqCst)
    }

    /// The probe's verdict on MongoDB.
    pub fn set_database_reachable(&self, reachable: bool) {
        self.database.store(reachable, Ordering::SeqCst);
    }

    /// An alarm for a worker's Service Bus connection.
    pub fn broker_alarm(&self) -> Alarm<'_> {
        Alarm {
            count: &self.broker,
            raised: false,
        }
    }

    /// An alarm for a batch retried for a database fault.
    pub fn store_alarm(&self) -> Alarm<'_> {
        Alarm {
            count: &self.store,
            raised: false,
        }
    }
}

/// One holder's vote against readiness.
#[derive(Debug)]
pub struct Alarm<'a> {
    count: &'a AtomicUsize,
    raised: bool,
}

impl Alarm<'_> {
    /// The holder is failing.
    pub fn raise(&mut self) {
        if !self.raised {
            self.raised = true;
            self.count.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The holder works again.
    pub fn lower(&mut self) {
        if self.raised {
            self.raised = false;
            self.count.fetch_sub(1, Ordering::SeqCst);
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
