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

use std::collections::BTreeMap;
use std::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mongodb::bson::Document;
use tokio_util::sync::CancellationToken;

use ordo_core::envelope::{Envelope, HASHED_ID_PREFIX};
use ordo_core::metrics as m;
use ordo_core::retry::Backoff;
use ordo_core::servicebus::receiver::{
    Accepted, Delivery, ReceiveError, SessionReceiver, SessionSource,
};
use ordo_projection::event_version;
use ordo_projection::{fold_events, Gap, Projection, ReadModel};

use crate::config::ProjectorSection;
use crate::readiness::Readiness;
use crate::settle::{self, Action, Decision, Fault, Item, Outcome, Stop};
use crate::store::{BlockRecord, StoreError, Written};
use crate::Store;

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
    /// The faults `/readyz` reports.
    pub readiness: Readiness,
    /// Lets one worker at a time try the broker while it is down ([`BrokerGate`]).
    gate: BrokerGate,
}

/// While Service Bus is down, one worker at a time tries it, and sleeps its backoff before it
/// lets the next one try; the others wait. Without it every session worker reconnected on its
/// own backoff: 32 workers retried about 17 times a second through an outage, and the retry
/// alert fired on any outage. The first answer opens the gate for all. The gate starts
/// closed: until the broker first answered, it is as good as down.
///
/// A probe waits at most [`PROBE_ACCEPT_WAIT`] for a session: an idle broker answers an
/// accept only when its hold ends (60 s on Service Bus), and readiness must come back within
/// seconds of the broker, also with `accept_timeout` set above that hold.
#[derive(Debug)]
struct BrokerGate {
    down: AtomicBool,
    /// Failures since the broker last answered, of all workers: the backoff is the process's,
    /// or each worker would take its turn with a short delay of its own.
    failures: AtomicU64,
    probe: Arc<tokio::sync::Mutex<()>>,
}

/// The longest a probe waits for a session (see [`BrokerGate`]).
const PROBE_ACCEPT_WAIT: Duration = Duration::from_secs(3);

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
    async fn pass(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        if !self.down.load(SeqCst) {
            return None;
        }
        let permit = self.probe.clone().lock_owned().await;
        // Those queued behind a probe that found the broker back all go at once.
        self.down.load(SeqCst).then_some(permit)
    }

    fn up(&self) {
        self.down.store(false, SeqCst);
        self.failures.store(0, Relaxed);
    }

    /// Marks the broker down; the number of failures before this one.
    fn failed(&self) -> u64 {
        self.down.store(true, SeqCst);
        self.failures.fetch_add(1, Relaxed)
    }
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

fn selects(p: &dyn Projection, e: &Document) -> bool {
    p.selects(
        e.get_str("aggregateType").ok(),
        e.get_str("eventType").unwrap_or_default(),
    )
}

fn decode<M: Delivery>(msg: &M) -> Result<Event, Fault> {
    let fault = |reason: &'static str, description: String| Fault {
        reason,
        description,
        projection: "*".into(),
    };
    Envelope::check_version(msg.envelope_version())
        .map_err(|e| fault(REASON_VERSION, e.to_string()))?;
    let body = msg.body().map_err(|e| fault(REASON_DECODE, e))?;
    let env = Envelope::decode(body).map_err(|e| match e {
        ordo_core::envelope::DecodeError::Version(_) => fault(REASON_VERSION, e.to_string()),
        _ => fault(REASON_DECODE, e.to_string()),
    })?;
    let doc = env
        .to_event_document()
        .map_err(|e| fault(REASON_DECODE, e.to_string()))?;
    Ok(Event {
        version: env.event_id,
        aggregate_id: env.aggregate_id.clone(),
        timestamp_ms: env.timestamp_millis(),
        doc,
    })
}

/// The aggregate a batch belongs to: from a decoded body, else from the `aggregateId`
/// property, else the session id (which is the aggregate id unless it was too long and is
/// its `sha256:` digest; a block recorded under a digest names it in its description).
fn aggregate_of<M: Delivery>(
    session_id: &str,
    msgs: &[M],
    decoded: &[Result<Event, Fault>],
) -> String {
    decoded
        .iter()
        .find_map(|d| d.as_ref().ok().map(|e| e.aggregate_id.clone()))
        .or_else(|| msgs.iter().find_map(|m| m.aggregate_id()))
        .unwrap_or_else(|| session_id.to_string())
}

/// The `ordo_blocked` record of a poison. Under a `sha256:` session id (nothing in the batch
/// named the aggregate) the description says so: `repair` needs the real id.
fn block_record(aggregate_id: &str, stop: &Stop, poison_message_id: String) -> BlockRecord {
    let mut description = stop.fault.description.clone();
    if aggregate_id.starts_with(HASHED_ID_PREFIX) {
        description.push_str(
            " (no message of the batch could be read: recorded under the session id, the digest of the aggregate id)",
        );
    }
    BlockRecord {
        aggregate_id: aggregate_id.to_string(),
        projection: stop.fault.projection.clone(),
        blocked_at_event_id: stop.version,
        reason: stop.fault.reason.to_string(),
        description,
        message_id: poison_message_id,
    }
}

impl Engine {
    /// An engine with nothing running yet.
    pub fn new(projections: Vec<Arc<dyn Projection>>, store: Store, cfg: ProjectorSection) -> Self {
        Self {
            projections,
            store,
            cfg,
            activity: Activity::default(),
            readiness: Readiness::default(),
            gate: BrokerGate::default(),
        }
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
        let mut alarm = self.readiness.broker_alarm();
        let mut source: Option<S> = None;
        let mut delays = self.backoff().delays();
        'work: while !cancel.is_cancelled() {
            // Held from a connect through the backoff after its failure (see `BrokerGate`).
            let mut probe = None;
            let (op, error) = 'attempt: {
                let src = match source.as_mut() {
                    Some(s) => s,
                    None => {
                        probe = tokio::select! {
                            p = self.gate.pass() => p,
                            _ = cancel.cancelled() => break 'work,
                        };
                        if probe.is_none() {
                            // The gate is open: the broker answered someone since this worker
                            // failed, so its alarm need not wait for an accept of its own (up
                            // to `accept_timeout` on an idle broker) to come down.
                            alarm.lower();
                        }
                        let connected = tokio::select! {
                            r = connect() => r,
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
                    _ = cancel.cancelled() => break 'work,
                };
                match accepted {
                    Ok(Accepted::Session(session)) => {
                        self.readiness.broker_answered();
                        self.gate.up();
                        alarm.lower();
                        delays = self.backoff().delays();
                        drop(probe.take());
                        self.work_session(session, &cancel).await;
                    }
                    Ok(Accepted::Idle) => {
                        self.readiness.broker_answered();
                        self.gate.up();
                        alarm.lower();
                        delays = self.backoff().delays();
                    }
                    Ok(Accepted::GaveUp) => {
                        // The broker kept the attach open without refusing it: the connection,
                        // the credentials and the subscription work, no session was free.
                        self.readiness.broker_answered();
                        self.gate.up();
                        alarm.lower();
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
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => break,
            }
        }
        tracing::debug!(worker = index, "worker stopped");
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
            let wait = self
                .cfg
                .receive_wait
                .min(
                    self.cfg
                        .session_idle_timeout
                        .saturating_sub(idle_since.elapsed()),
                )
                .max(Duration::from_millis(10));
            let msgs = match session.receive(self.cfg.batch_size, wait).await {
                Ok(v) => v,
                Err(e) => {
                    self.lock_trouble(&sid, &e);
                    break;
                }
            };
            if msgs.is_empty() {
                if idle_since.elapsed() >= self.cfg.session_idle_timeout {
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

    fn lock_trouble(&self, sid: &str, e: &ReceiveError) {
        if e.is_lock_lost() {
            metrics::counter!(m::LOCKS_LOST).increment(1);
            tracing::warn!(session = %sid, error = %e, "session lock lost; dropping its work");
        } else {
            tracing::warn!(session = %sid, error = %e, "session failed; releasing it");
        }
    }

    /// Runs `fut` while renewing the session lock every renewal interval. `None` when a renewal
    /// failed (the lock is gone: the caller must not settle anything).
    async fn renewing<R: SessionReceiver, T>(
        &self,
        session: &mut R,
        last_renew: &mut Instant,
        fut: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        tokio::pin!(fut);
        loop {
            let next = *last_renew + self.cfg.lock_renewal_interval;
            tokio::select! {
                r = &mut fut => return Some(r),
                _ = tokio::time::sleep_until(next.into()) => {
                    match session.renew_lock().await {
                        Ok(()) => {
                            metrics::counter!(m::LOCK_RENEWALS).increment(1);
                            *last_renew = Instant::now();
                        }
                        Err(e) => {
                            self.lock_trouble(session.session_id(), &e);
                            return None;
                        }
                    }
                }
            }
        }
    }

    /// The aggregate's outcome for this batch: already blocked, or applied. Reads
    /// `ordo_blocked` once per session, and on every batch while blocked (a repair may have
    /// lifted it).
    async fn outcome(
        &self,
        held: &mut Held,
        aggregate_id: &str,
        events: &[&Event],
    ) -> Result<(i64, Outcome), WorkError> {
        if !held.checked_blocked || held.blocked.is_some() {
            let was = held.blocked;
            held.blocked = self.store.blocked_at(aggregate_id).await?;
            held.checked_blocked = true;
            if was.is_some() && held.blocked.is_none() {
                tracing::info!(aggregate = %aggregate_id, "aggregate was repaired; resuming");
                held.models = vec![None; self.projections.len()];
            }
        }
        if let Some(at) = held.blocked {
            return Ok((at - 1, Outcome::Blocked { at }));
        }
        let a = self.apply(held, aggregate_id, events).await?;
        Ok((
            a.base,
            Outcome::Applied {
                durable: a.durable,
                stop: a.stop,
            },
        ))
    }

    async fn batch<R: SessionReceiver>(
        &self,
        session: &mut R,
        held: &mut Held,
        msgs: Vec<R::Message>,
        last_renew: &mut Instant,
        cancel: &CancellationToken,
    ) -> After {
        let started = Instant::now();
        let decoded: Vec<Result<Event, Fault>> = msgs.iter().map(decode).collect();
        let aggregate_id = aggregate_of(session.session_id(), &msgs, &decoded);
        let items: Vec<Item> = decoded
            .iter()
            .map(|d| match d {
                Ok(e) => Item::Event(e.version),
                Err(f) => Item::Undecodable(f.clone()),
            })
            .collect();
        let cut = decoded
            .iter()
            .position(Result::is_err)
            .unwrap_or(decoded.len());
        let events: Vec<&Event> = decoded[..cut]
            .iter()
            .filter_map(|d| d.as_ref().ok())
            .collect();

        // Work out the outcome, retrying in place any fault that is not the events' own.
        let mut alarm = self.readiness.store_alarm();
        let mut attempt: u32 = 0;
        let mut delays = self.backoff().delays();
        let (actions, block) = loop {
            let work = self.outcome(held, &aggregate_id, &events);
            let (stored, outcome, error) = match self.renewing(session, last_renew, work).await {
                None => return After::Drop,
                Some(Ok((stored, outcome))) => (stored, outcome, None),
                Some(Err(e)) => (0, Outcome::Faulted, Some(e)),
            };
            let (reason, error) =
                error.map_or(("none", String::new()), |e| (e.reason(), e.to_string()));
            match settle::decide(&items, stored, &outcome) {
                Decision::Settle { actions, block } => break (actions, block),
                Decision::Retry => {
                    attempt += 1;
                    // A fault that outlasts the retry budget is an outage, not a blip: the
                    // process reports it (503) until the batch goes through.
                    if attempt > self.cfg.transient_retry_limit {
                        alarm.raise();
                    }
                    metrics::counter!(m::RETRIES, "operation" => "apply", "reason" => reason)
                        .increment(1);
                    let delay = delays.next().unwrap_or(self.cfg.retry_max);
                    tracing::warn!(aggregate = %aggregate_id, attempt, delay_ms = delay.as_millis() as u64, %error, "fault applying a batch; retrying in place");
                    held.models = vec![None; self.projections.len()];
                    held.checked_blocked = false;
                    if !self.pause(session, last_renew, delay, cancel).await {
                        // Lock lost, or shutdown: nothing settled, the broker redelivers.
                        return After::Drop;
                    }
                }
            }
        };
        drop(alarm);

        if let Some(stop) = &block {
            let poison = actions
                .iter()
                .position(
                    |a| matches!(a, Action::DeadLetter { reason, .. } if *reason != REASON_BLOCKED),
                )
                .and_then(|i| msgs[i].message_id())
                .unwrap_or_default();
            let record = block_record(&aggregate_id, stop, poison);
            if !self.block(session, held, &record, last_renew, cancel).await {
                return After::Drop;
            }
        }
        let now_ms = mongodb::bson::DateTime::now().timestamp_millis();
        for ((msg, d), action) in msgs.iter().zip(&decoded).zip(&actions) {
            let r = match action {
                Action::Complete { applied } => {
                    if *applied {
                        metrics::counter!(m::EVENTS_APPLIED).increment(1);
                        self.activity.applied.fetch_add(1, Relaxed);
                        if let Some(ts) = d.as_ref().ok().and_then(|e| e.timestamp_ms) {
                            metrics::histogram!(m::END_TO_END_LAG)
                                .record((now_ms - ts).max(0) as f64 / 1000.0);
                        }
                    } else {
                        metrics::counter!(m::DUPLICATES).increment(1);
                    }
                    session.complete(msg).await
                }
                Action::DeadLetter {
                    reason,
                    description,
                } => {
                    if *reason != REASON_BLOCKED {
                        let msg_id = msg.message_id().unwrap_or_default();
                        tracing::error!(aggregate = %aggregate_id, message_id = %msg_id, reason, description = %description, "poison message");
                    }
                    session
                        .dead_letter(msg, reason, description)
                        .await
                        .map(|()| {
                            metrics::counter!(m::DEAD_LETTERED, "reason" => reason.to_string())
                                .increment(1);
                        })
                }
                Action::Abandon => session.abandon(msg).await,
            };
            if let Err(e) = r {
                self.lock_trouble(session.session_id(), &e);
                return After::Drop;
            }
        }
        if held.blocked.is_none() && held.state_says_blocked {
            if session.set_state(Vec::new()).await.is_err() {
                return After::Drop;
            }
            held.state_says_blocked = false;
        }
        let elapsed = started.elapsed();
        metrics::histogram!(m::APPLY_LATENCY).record(elapsed.as_secs_f64());
        tracing::debug!(aggregate = %aggregate_id, messages = msgs.len(), elapsed_us = elapsed.as_micros() as u64, "batch settled");
        After::Continue
    }

    /// Sleeps `delay` while renewing the session lock; `false` when the lock was lost or the
    /// process is shutting down.
    async fn pause<R: SessionReceiver>(
        &self,
        session: &mut R,
        last_renew: &mut Instant,
        delay: Duration,
        cancel: &CancellationToken,
    ) -> bool {
        let sleep = async {
            tokio::select! {
                _ = tokio::time::sleep(delay) => true,
                _ = cancel.cancelled() => false,
            }
        };
        self.renewing(session, last_renew, sleep).await == Some(true)
    }

    /// Records the block before the poison is dead-lettered, so a crash in between leaves the
    /// aggregate blocked rather than open to the events after the poison. The record is
    /// retried like any database write; `false` when the session must be dropped.
    async fn block<R: SessionReceiver>(
        &self,
        session: &mut R,
        held: &mut Held,
        record: &BlockRecord,
        last_renew: &mut Instant,
        cancel: &CancellationToken,
    ) -> bool {
        let mut delays = self.backoff().delays();
        loop {
            match self
                .renewing(session, last_renew, self.store.block(record))
                .await
            {
                None => return false,
                Some(Ok(())) => break,
                Some(Err(e)) => {
                    let delay = delays.next().unwrap_or(self.cfg.retry_max);
                    let reason = if e.is_retryable() {
                        "transient"
                    } else {
                        "database"
                    };
                    metrics::counter!(m::RETRIES, "operation" => "block", "reason" => reason)
                        .increment(1);
                    tracing::warn!(aggregate = %record.aggregate_id, error = %e, "cannot record the blocked aggregate yet; retrying");
                    if !self.pause(session, last_renew, delay, cancel).await {
                        return false;
                    }
                }
            }
        }
        metrics::counter!(m::AGGREGATES_BLOCKED).increment(1);
        tracing::error!(aggregate = %record.aggregate_id, blocked_at = record.blocked_at_event_id, reason = %record.reason, "aggregate blocked");
        held.blocked = Some(record.blocked_at_event_id);
        held.checked_blocked = true;
        let state = format!(
            "blocked at v{} ({})",
            record.blocked_at_event_id, record.reason
        )
        .into_bytes();
        if session.set_state(state).await.is_err() {
            return false;
        }
        held.state_says_blocked = true;
        true
    }

    /// Folds `events` into every relevant projection and writes each changed model once.
    /// A fault of the events (poison, a refused write) becomes the returned stop; any other
    /// fault is an error, and the caller retries the batch.
    async fn apply(
        &self,
        held: &mut Held,
        aggregate_id: &str,
        events: &[&Event],
    ) -> Result<Applied, WorkError> {
        if !self.cfg.apply_delay.is_zero() {
            tokio::time::sleep(self.cfg.apply_delay).await;
        }
        let mut limit = events.iter().map(|e| e.version).max().unwrap_or(0);
        let mut stop: Option<Stop> = None;
        let mut healed: BTreeMap<i64, Document> = BTreeMap::new();
        let mut base = 0;
        // Load what is needed.
        for (pi, p) in self.projections.iter().enumerate() {
            if held.models[pi].is_none() && events.iter().any(|e| selects(p.as_ref(), &e.doc)) {
                let model = self.store.load(p.as_ref(), aggregate_id).await?;
                let v = model.version;
                held.models[pi] = Some((model, v));
            }
            if let Some((m, _)) = &held.models[pi] {
                base = base.max(m.version);
            }
        }
        let mut lower = |limit: &mut i64, s: Stop| {
            if s.version <= *limit {
                *limit = s.version - 1;
                stop = Some(s);
            }
        };
        // Phase 1: find where folding must stop (poison, unhealed gap), without writing.
        for (pi, p) in self.projections.iter().enumerate() {
            let Some((model, _)) = &held.models[pi] else {
                continue;
            };
            let mut model = model.clone();
            if let Some(s) = self
                .fold(p.as_ref(), &mut model, events, limit, &mut healed)
                .await?
            {
                lower(&mut limit, s);
            }
        }
        // Phase 2: fold up to the limit and write, reloading on a failed guard. A model
        // reloaded after a conflict can be older than the one phase 1 folded (a rebuild, an
        // operator's reset) and stop elsewhere: that stop lowers the limit too.
        for (pi, p) in self.projections.iter().enumerate() {
            let mut conflicts = 0;
            loop {
                let Some((stored, loaded)) = held.models[pi].clone() else {
                    break;
                };
                let mut model = stored.clone();
                if let Some(s) = self
                    .fold(p.as_ref(), &mut model, events, limit, &mut healed)
                    .await?
                {
                    lower(&mut limit, s);
                }
                if !model.needs_write(loaded) {
                    held.models[pi] = Some((model, loaded));
                    break;
                }
                match self.store.write(p.as_ref(), &model, loaded).await {
                    Ok(Written::Ok) => {
                        let v = model.version;
                        held.models[pi] = Some((model, v));
                        break;
                    }
                    Ok(Written::Conflict) => {
                        metrics::counter!(m::GUARD_CONFLICTS).increment(1);
                        conflicts += 1;
                        if conflicts > self.cfg.transient_retry_limit.max(3) {
                            return Err(WorkError::ConflictStorm(conflicts));
                        }
                        let fresh = self.store.load(p.as_ref(), aggregate_id).await?;
                        let v = fresh.version;
                        held.models[pi] = Some((fresh, v));
                    }
                    Err(e) if e.is_refusal() => {
                        tracing::error!(aggregate = %aggregate_id, projection = p.name(), error = %e, "the server refused the read model");
                        lower(
                            &mut limit,
                            Stop {
                                version: loaded + 1,
                                fault: Fault {
                                    reason: REASON_REFUSED,
                                    description: format!(
                                        "{} of {aggregate_id} up to v{}: {e}",
                                        p.collection(),
                                        model.version
                                    ),
                                    projection: p.name().to_string(),
                                },
                            },
                        );
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(Applied {
            durable: limit,
            base,
            stop,
        })
    }

    /// Folds the events up to `limit` into `model`, healing gaps from the events collection.
    /// Returns where folding must stop, if it must.
    async fn fold(
        &self,
        p: &dyn Projection,
        model: &mut ReadModel,
        events: &[&Event],
        limit: i64,
        healed: &mut BTreeMap<i64, Document>,
    ) -> Result<Option<Stop>, StoreError> {
        let docs: Vec<&Document> = events
            .iter()
            .filter(|e| e.version <= limit)
            .map(|e| &e.doc)
            .collect();
        let stop = |version: i64, reason: &'static str, description: String| {
            Some(Stop {
                version,
                fault: Fault {
                    reason,
                    description,
                    projection: p.name().to_string(),
                },
            })
        };
        loop {
            let err = match fold_events(p, model, docs.iter().copied()) {
                Ok(Some(Gap { from, to })) => {
                    if (from..=to).any(|v| !healed.contains_key(&v)) {
                        match self
                            .store
                            .heal(&model.id, from, to, self.cfg.gap_timeout)
                            .await
                        {
                            Ok(Some(found)) => {
                                metrics::counter!(m::GAPS_HEALED).increment(found.len() as u64);
                                tracing::info!(aggregate = %model.id, from, to, "gap healed from the events collection");
                                for e in found {
                                    healed.insert(event_version(&e), e);
                                }
                            }
                            Ok(None) => {
                                return Ok(stop(
                                    from,
                                    REASON_GAP,
                                    format!(
                                        "events v{from}..v{to} of {} not found in the events collection within {:?}",
                                        model.id, self.cfg.gap_timeout
                                    ),
                                ))
                            }
                            Err(e @ StoreError::BadEvent { .. }) => {
                                return Ok(stop(from, REASON_SOURCE, e.to_string()))
                            }
                            Err(e @ StoreError::DuplicateVersion { .. }) => {
                                return Ok(stop(from, REASON_DUPLICATE, e.to_string()))
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    let mut failed = None;
                    for v in from..=to {
                        // Healing returned every version of the range, each once.
                        let Some(e) = healed.get(&v) else {
                            return Ok(stop(
                                v,
                                REASON_GAP,
                                format!("event v{v} of {} was not read while healing", model.id),
                            ));
                        };
                        if let Err(e) = model.apply(p, e) {
                            failed = Some(e);
                            break;
                        }
                    }
                    match failed {
                        None => continue,
                        Some(e) => e,
                    }
                }
                Ok(_) => return Ok(None),
                Err(e) => e,
            };
            tracing::error!(aggregate = %model.id, projection = p.name(), event_id = err.event_id, error = %err, "projection error");
            return Ok(stop(err.event_id, REASON_PROJECTION, err.to_string()));
        }
    }
}
