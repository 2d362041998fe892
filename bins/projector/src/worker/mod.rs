//! The session worker: accept a session, receive batches, fold, write once, settle.
//!
//! Per batch: decode every message; fold the decodable prefix into the aggregate's in-memory
//! read models (healing gaps from the events collection); write each changed model once,
//! guarded by the version it was read at; then settle as [`crate::settle::decide`] says. The
//! session lock is renewed between steps and, while a batch is applied or retried, by a timer
//! racing the work (receiver methods take `&mut self`, so renewal cannot run on its own task).
//! A renewal or settle that fails means the lock may be gone: the session is dropped and
//! nothing more is settled; the broker redelivers, and the version rule turns what was already
//! written into duplicates.
//!
//! Faults are sorted by whose they are. One that belongs to the events (an undecodable body,
//! an unsupported envelope version, a projection error, a gap not healed within
//! `gap_timeout`, an invalid or duplicated source event reached by healing, a read model the
//! server refuses to store) is poison: dead-lettered with a reason, the aggregate blocked in
//! `ordo_blocked` and the session state, and later messages dead-lettered as
//! `AggregateBlocked` so the subscription never stalls behind them; `ordo-projector repair`
//! re-projects the aggregate from the events collection, which holds them all. Any other fault
//! (database unreachable, a fail point, a timeout, a guard-conflict storm) is retried in place
//! with backoff for as long as it lasts, holding the session and its lock, so the broker's
//! delivery count does not move for a fault that is not the message's.
//!
//! Files: this one (the worker loop and the held session), `batch.rs` (one batch: decide,
//! settle, pause on a fault, block on poison), `apply.rs` (fold, heal gaps, guarded write),
//! `gate.rs` (one prober while the broker is down), `message.rs` (what a message says).

mod apply;
mod batch;
mod gate;
mod message;

use gate::{BrokerGate, PROBE_ACCEPT_WAIT};
use message::{aggregate_of, block_record, decode, selects};

use std::collections::BTreeMap;
use std::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mongodb::bson::Document;
use tokio_util::sync::CancellationToken;

use ordo_core::envelope::{session_id, Envelope, HASHED_ID_PREFIX};
use ordo_core::metrics as m;
use ordo_core::retry::Backoff;
use ordo_core::servicebus::receiver::{
    Accepted, Delivery, ReceiveError, SessionReceiver, SessionSource,
};
use ordo_projection::event_version;
use ordo_projection::{fold_events, Gap, Projection, ReadModel};

use crate::config::ProjectorSection;
use crate::settle::{self, Action, Decision, Fault, Item, Outcome, Stop};
use crate::store::{BlockRecord, StoreError, Written};
use crate::Store;
use ordo_core::readiness::{self, dependency, Alarm, Readiness};

pub use crate::settle::REASON_BLOCKED;
/// Dead-letter reason for a body that is not an envelope.
pub const REASON_DECODE: &str = "UndecodableMessage";
/// Dead-letter reason for an envelope version this build does not read.
pub const REASON_VERSION: &str = "UnsupportedEnvelopeVersion";
/// Dead-letter reason for an event a projection cannot apply.
pub const REASON_PROJECTION: &str = "ProjectionError";
/// Dead-letter reason for missing events that did not appear within `gap_timeout`.
pub const REASON_GAP: &str = "GapNotHealed";
/// Dead-letter reason for a source event, reached by healing, that breaks the contract.
pub const REASON_SOURCE: &str = "InvalidSourceEvent";
/// Dead-letter reason for two source documents with the same (aggregateId, eventId).
pub const REASON_DUPLICATE: &str = "DuplicateVersion";
/// Dead-letter reason for an event whose aggregate's session id is not the session it came in:
/// one session must carry one aggregate, and folding it would write it into the wrong model.
pub const REASON_FOREIGN: &str = "ForeignAggregate";
/// Dead-letter reason for a read model the server refuses to store (validator, 16 MB).
pub const REASON_REFUSED: &str = "ReadModelRefused";

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
    /// Tasks restarted by their supervisor since start.
    pub restarts: AtomicU64,
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
            WorkError::Store(e) if e.is_retryable() => "transient",
            WorkError::Store(_) => "database",
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

/// State of a held session.
struct Held {
    /// Per projection: the model and the version stored in the database.
    models: Vec<Option<(ReadModel, i64)>>,
    blocked: Option<i64>,
    checked_blocked: bool,
    state_says_blocked: bool,
}

/// What the session loop does after a batch.
enum After {
    Continue,
    Drop,
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
        }
    }

    /// The broker probe answers again after failing. Once an accept has been answered since
    /// start (so the subscription is known to take session receivers, which the probe's
    /// dead-letter peek does not show), this ends the outage as an accept's answer would: the
    /// gate opens, and a worker still connecting starts over on a fresh connection, because a
    /// connection begun while the broker was down can hang like an accept does.
    pub fn broker_probe_recovered(&self) {
        if self.has_broker_answered() {
            self.gate.up();
            self.probe_recoveries.send_modify(|n| *n += 1);
        }
    }

    /// Whether a worker's accept has been answered since start.
    pub fn has_broker_answered(&self) -> bool {
        self.unanswered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none()
    }

    /// The broker probe failed: every worker waiting in an accept reconnects, as after a
    /// failed accept of its own (an accept does not always notice its connection drop).
    pub fn broker_probe_failed(&self) {
        self.probe_failures.send_modify(|n| *n += 1);
    }

    fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.cfg.retry_initial,
            max: self.cfg.retry_max,
        }
    }

    /// The delays between restarts of a failed task: the retry backoff, at least 100 ms, so a
    /// task that panics at once does not spin.
    pub fn backoff_for_restarts(&self) -> Backoff {
        Backoff {
            initial: self.cfg.retry_initial.max(Duration::from_millis(100)),
            max: self.cfg.retry_max.max(Duration::from_millis(100)),
        }
    }

    /// One worker: accepts sessions until `cancel`, then returns after releasing its session.
    /// While its connect or accept fails it holds readiness down and counts its retries.
    pub async fn run_worker<S, F, Fut>(
        self: Arc<Self>,
        index: usize,
        connect: F,
        cancel: CancellationToken,
    ) where
        S: SessionSource,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<S, ReceiveError>>,
    {
        let _alive = Counted::new(&self.activity.workers, None);
        let mut alarm = self.readiness.alarm(dependency::SERVICEBUS);
        let mut source: Option<S> = None;
        let mut delays = self.backoff().delays();
        let mut probe_failed = self.probe_failures.subscribe();
        let mut probe_recovered = self.probe_recoveries.subscribe();
        'work: while !cancel.is_cancelled() {
            // Held from a connect through the backoff after its failure (see `BrokerGate`).
            let mut probe = None;
            let (op, error) = 'attempt: {
                let src = match source.as_mut() {
                    // A probe failure since this connection was opened ends its accept: one
                    // signalled between two accepts (or while a session was worked) is not
                    // lost.
                    Some(s) => s,
                    None => {
                        probe = tokio::select! {
                            p = self.gate.pass() => p,
                            _ = cancel.cancelled() => break 'work,
                        };
                        // A probe failure from now on (not one from the wait at the gate) ends
                        // this attempt's accept, also one signalled while connecting.
                        probe_failed.mark_unchanged();
                        if probe.is_none() {
                            // The gate is open: the broker answered someone since this worker
                            // failed, so its alarm need not wait for an accept of its own (up
                            // to `accept_timeout` on an idle broker) to come down.
                            alarm.lower();
                        }
                        probe_recovered.mark_unchanged();
                        let connected = tokio::select! {
                            r = connect() => r,
                            // The broker is back and this connect began before: start over.
                            _ = probe_recovered.changed() => continue 'work,
                            _ = cancel.cancelled() => break 'work,
                        };
                        match connected {
                            Ok(s) => source.insert(s),
                            Err(e) => break 'attempt ("connect", e),
                        }
                    }
                };
                let wait = match probe {
                    Some(_) => self.cfg.accept_timeout.min(PROBE_ACCEPT_WAIT),
                    None => self.cfg.accept_timeout,
                };
                let accepted = tokio::select! {
                    r = src.accept_next(wait) => r,
                    _ = probe_failed.changed() => {
                        source = None;
                        break 'attempt ("accept", ReceiveError::Broker(
                            "the broker probe failed while this accept waited".into(),
                        ));
                    }
                    _ = cancel.cancelled() => break 'work,
                };
                match accepted {
                    Ok(Accepted::Session(session)) => {
                        self.answered(&mut alarm);
                        delays = self.backoff().delays();
                        drop(probe.take());
                        self.work_session(session, &cancel).await;
                    }
                    Ok(Accepted::Idle) => {
                        self.answered(&mut alarm);
                        delays = self.backoff().delays();
                    }
                    Ok(Accepted::GaveUp) => {
                        // The broker kept the attach open without refusing it: the connection,
                        // the credentials and the subscription work, no session was free.
                        self.answered(&mut alarm);
                        tracing::debug!(
                            worker = index,
                            "accept timed out on the client; reconnecting"
                        );
                        source = None;
                    }
                    Ok(Accepted::Unclear) => {
                        // Neither proof of health nor of a fault: readiness stays as the last
                        // clear answer left it, and the next accept waits a little.
                        let delay = delays.next().unwrap_or(self.cfg.retry_max);
                        metrics::counter!(m::RETRIES, "operation" => "accept", "reason" => "unclear_refusal").increment(1);
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = cancel.cancelled() => break 'work,
                        }
                    }
                    Err(e) => {
                        source = None;
                        break 'attempt ("accept", e);
                    }
                }
                continue 'work;
            };
            alarm.raise();
            let failures = self.gate.failed();
            let delay = (self.backoff().delays())
                .nth(failures.min(64) as usize)
                .unwrap_or(self.cfg.retry_max);
            metrics::counter!(m::RETRIES, "operation" => op, "reason" => error.reason())
                .increment(1);
            tracing::warn!(worker = index, op, error = %error, delay_ms = delay.as_millis() as u64, "service bus unavailable; retrying");
            probe_recovered.mark_unchanged();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                // The broker is back: no need to wait out a long `retry_max`.
                _ = probe_recovered.changed() => {}
                _ = cancel.cancelled() => break,
            }
        }
        tracing::debug!(worker = index, "worker stopped");
    }

    /// The broker answered a worker's accept: readiness may count on it, the gate opens for
    /// every worker, and this worker's alarm comes down.
    fn answered(&self, alarm: &mut Alarm) {
        self.unanswered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        self.gate.up();
        alarm.lower();
    }

    /// Works one session until it is idle, its lock is lost, or shutdown.
    pub async fn work_session<R: SessionReceiver>(
        &self,
        mut session: R,
        cancel: &CancellationToken,
    ) {
        let held_now = Counted::new(&self.activity.sessions_held, Some(m::SESSIONS_HELD));
        let sid = session.session_id().to_string();
        tracing::debug!(session = %sid, "session accepted");
        let mut held = Held {
            models: vec![None; self.projections.len()],
            blocked: None,
            checked_blocked: false,
            state_says_blocked: false,
        };
        match session.state().await {
            Ok(state) => held.state_says_blocked = !state.is_empty(),
            Err(e) => {
                self.lock_trouble(&sid, &e);
                session.close().await;
                return;
            }
        }
        let mut last_renew = Instant::now();
        let mut idle_since = Instant::now();
        loop {
            if cancel.is_cancelled() {
                break;
            }
            if last_renew.elapsed() >= self.cfg.lock_renewal_interval {
                if let Err(e) = session.renew_lock().await {
                    self.lock_trouble(&sid, &e);
                    break;
                }
                metrics::counter!(m::LOCK_RENEWALS).increment(1);
                last_renew = Instant::now();
            }
            let idle_limit = self.idle_limit();
            let wait = self
                .cfg
                .receive_wait
                .min(idle_limit.saturating_sub(idle_since.elapsed()))
                .max(Duration::from_millis(10));
            let msgs = match session.receive(self.cfg.batch_size, wait).await {
                Ok(v) => v,
                Err(e) => {
                    self.lock_trouble(&sid, &e);
                    break;
                }
            };
            if msgs.is_empty() {
                if idle_since.elapsed() >= self.idle_limit() {
                    break;
                }
                continue;
            }
            match self
                .batch(&mut session, &mut held, msgs, &mut last_renew, cancel)
                .await
            {
                After::Continue => idle_since = Instant::now(),
                After::Drop => break,
            }
        }
        session.close().await;
        drop(held_now);
        tracing::debug!(session = %sid, "session released");
    }

    /// How long a held session may stay idle now: `session_idle_timeout`, or the shorter
    /// `busy_session_idle_timeout` (when set) while every worker holds a session, when other aggregates
    /// may be waiting at the broker for a worker this idle one keeps.
    fn idle_limit(&self) -> Duration {
        let idle = self.cfg.session_idle_timeout;
        match self.cfg.busy_session_idle_timeout {
            Some(busy)
                if self.activity.sessions_held.load(Relaxed)
                    >= self.activity.workers.load(Relaxed) =>
            {
                busy.min(idle)
            }
            _ => idle,
        }
    }

    fn lock_trouble(&self, sid: &str, e: &ReceiveError) {
        if e.is_lock_lost() {
            metrics::counter!(m::LOCKS_LOST).increment(1);
            tracing::warn!(session = %sid, error = %e, "session lock lost; dropping its work");
        } else {
            tracing::warn!(session = %sid, error = %e, "session failed; releasing it");
        }
    }
}
