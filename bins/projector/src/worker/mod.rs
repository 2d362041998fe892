//! The session worker: accept a session, receive batches, fold, write once, settle.
//!
//! Per batch: decode every message; fold the decodable prefix into the aggregate's in-memory
//! read models (filling gaps from the events collection); write each changed model once,
//! guarded by the version it was read at; then settle as [`crate::settle::decide`] says. The
//! session lock is renewed between steps and, while a batch is applied or retried, by a timer
//! racing the work (receiver methods take `&mut self`, so renewal cannot run on its own task).
//! A renewal or settle that fails means the lock may be gone: the session is dropped and
//! nothing more is settled; the broker redelivers, and the version rule turns what was already
//! written into duplicates.
//!
//! Faults are sorted by whose they are. One that belongs to the events (an undecodable body,
//! an unsupported envelope version, a projection error, a gap not filled within
//! `gap_timeout`, an invalid or duplicated source event read to fill a gap, a read model the
//! server refuses to store) is poison: dead-lettered with a reason, the aggregate blocked in
//! `ordo_blocked` and the session state, and later messages dead-lettered as
//! `AggregateBlocked` so the subscription never stalls behind them; `ordo-projector repair`
//! re-projects the aggregate from the events collection, which holds them all. Any other fault
//! (database unreachable, a fail point, a timeout, a guard-conflict storm) is retried in place
//! with backoff for as long as it lasts, holding the session and its lock, so the broker's
//! delivery count does not move for a fault that is not the message's.
//!
//! Files: this one (the engine and what its parts share), `accept.rs` (a worker's accept loop
//! and its retries), `release.rs` (sessions a worker is done with, closed in the background),
//! `session.rs` (one held session, its lock renewed between batches), `renewal.rs` (when a
//! session's lock is renewed),
//! `batch.rs` (one batch: decide, settle, pause on a fault, block on poison), `apply.rs` (fold and
//! guarded write), `gap.rs` (gaps filled from the events collection), `gate.rs` (one prober while the broker is down), `message.rs`
//! (what a message says).

mod accept;
mod apply;
mod batch;
mod gap;
mod gate;
mod message;
mod release;
mod renewal;
mod session;

use gate::BrokerGate;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::Document;

use ordo_core::readiness::{self, dependency, Readiness};
use ordo_core::retry::Backoff;
use ordo_projection::Projection;

use crate::config::ProjectorSection;
use crate::settle::Stop;
use crate::store::StoreError;
use crate::Store;

pub use crate::settle::{
    REASON_BLOCKED, REASON_DECODE, REASON_DUPLICATE, REASON_FOREIGN, REASON_GAP, REASON_PROJECTION,
    REASON_REFUSED, REASON_SOURCE, REASON_VERSION,
};

/// Everything a worker shares with the others.
#[derive(Debug)]
pub struct Engine {
    /// Every projection, declarative or custom.
    pub projections: Vec<Arc<dyn Projection>>,
    /// The database.
    pub store: Store,
    /// `[projector]`.
    pub cfg: ProjectorSection,
    /// Counters the heartbeat reports (`ordo-projector status`).
    pub activity: Activity,
    /// The faults `/readyz` reports: workers raise an alarm while their connect or accept
    /// fails (broker unreachable, credentials refused, topic or subscription missing or without
    /// sessions) or while a batch is retried for a database fault; the probes in `probes.rs`
    /// ping MongoDB and check Service Bus apart from the accepts.
    pub readiness: Arc<Readiness>,
    /// Held until a worker's accept is first answered: only an accept shows that the
    /// connection, the credentials and a session-enabled subscription all work.
    unanswered: std::sync::Mutex<Option<readiness::Fault>>,
    /// Lets one worker at a time try the broker while it is down ([`BrokerGate`]).
    gate: BrokerGate,
    /// Bumped by the broker probe when it fails: accepts in flight may wait on a dead
    /// connection, and are given up.
    probe_failures: tokio::sync::watch::Sender<u64>,
    /// Bumped by the broker probe when it answers again after failing: connects begun during
    /// the outage may hang on a connection the broker never serves, and are started over.
    probe_recoveries: tokio::sync::watch::Sender<u64>,
    /// Set once a session was granted a lock too short for `lock_renewal_interval` (warned
    /// about once per process, [`renewal`]).
    short_lock_warned: std::sync::atomic::AtomicBool,
}

/// What this process is doing, for its heartbeat in `ordo_projectors` and for tests.
#[derive(Debug, Default)]
pub struct Activity {
    /// Sessions held now.
    pub sessions_held: AtomicU64,
    /// Events applied since start.
    pub applied: AtomicU64,
    /// Session workers running now.
    pub workers: AtomicU64,
    /// Tasks restarted by their supervisor since start, and session releases that panicked.
    pub restarts: AtomicU64,
    /// Accepts of this process answered with a session since one was last answered "no
    /// session available": from two on, the broker had sessions waiting for a worker.
    pub sessions_in_a_row: AtomicU64,
}

/// Counts a session (or a worker) for as long as it lives, panics included.
struct Counted<'a> {
    count: &'a AtomicU64,
    gauge: Option<&'static str>,
}

impl<'a> Counted<'a> {
    fn new(count: &'a AtomicU64, gauge: Option<&'static str>) -> Self {
        count.fetch_add(1, Relaxed);
        if let Some(g) = gauge {
            metrics::gauge!(g).increment(1.0);
        }
        Self { count, gauge }
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Relaxed);
        if let Some(g) = self.gauge {
            metrics::gauge!(g).decrement(1.0);
        }
    }
}

/// Why applying a batch failed for a reason that is not the events' own.
#[derive(Debug, thiserror::Error)]
enum WorkError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("version guard failed {0} times in a row")]
    ConflictStorm(u32),
}

impl WorkError {
    /// The `reason` label of `ordo_retries_total`.
    fn reason(&self) -> &'static str {
        match self {
            WorkError::Store(e) => e.reason(),
            WorkError::ConflictStorm(_) => "conflicts",
        }
    }
}

/// A decoded message.
struct Event {
    doc: Document,
    version: i64,
    aggregate_id: String,
    timestamp_ms: Option<i64>,
}

/// How the apply of a batch ended, when it ended with nothing left to retry.
struct Applied {
    /// Highest version durable in every read model the batch touched.
    durable: i64,
    /// Highest version stored before the batch.
    base: i64,
    /// The poison the apply stopped at.
    stop: Option<Stop>,
}

impl Engine {
    /// An engine with nothing running yet.
    pub fn new(projections: Vec<Arc<dyn Projection>>, store: Store, cfg: ProjectorSection) -> Self {
        let readiness = Readiness::new();
        Self {
            projections,
            store,
            cfg,
            activity: Activity::default(),
            unanswered: std::sync::Mutex::new(Some(readiness.pending(dependency::SERVICEBUS))),
            readiness,
            gate: BrokerGate::default(),
            probe_failures: tokio::sync::watch::Sender::new(0),
            probe_recoveries: tokio::sync::watch::Sender::new(0),
            short_lock_warned: Default::default(),
        }
    }

    fn backoff(&self) -> Backoff {
        self.cfg.backoff()
    }

    /// The delays between restarts of a failed task: the retry backoff, at least 100 ms, so a
    /// task that panics at once does not spin.
    pub fn backoff_for_restarts(&self) -> Backoff {
        Backoff {
            initial: self.cfg.retry_initial.max(Duration::from_millis(100)),
            max: self.cfg.retry_max.max(Duration::from_millis(100)),
        }
    }
}
