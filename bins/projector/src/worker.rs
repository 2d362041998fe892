//! The session worker: accept a session, receive batches, fold, write once, settle.
//!
//! Per batch: decode every message; fold the decodable prefix into the aggregate's in-memory
//! read models (healing gaps from the events collection); write each changed model once,
//! guarded by the version it was read at; only then complete the messages. The session lock is
//! renewed between steps and, while a batch is applied, by a timer racing the apply (receiver
//! methods take `&mut self`, so renewal cannot run on its own task). A renewal or settle that
//! fails means the lock may be gone: the session is dropped and nothing more is settled; the
//! broker redelivers, and the version rule turns what was already written into duplicates.
//!
//! Poison (undecodable body, unsupported envelope version, projection error, a gap not healed
//! within `gap_timeout`) is dead-lettered with a reason and the aggregate is blocked: a
//! document in `ordo_blocked` and the session state. Later messages of a blocked aggregate are
//! dead-lettered with reason `AggregateBlocked` rather than deferred, so the subscription never
//! stalls behind them; `ordo-projector repair` re-projects the aggregate from the events
//! collection (which holds every event, including those), so nothing is lost by not applying
//! them here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mongodb::bson::Document;
use tokio_util::sync::CancellationToken;

use ordo_core::envelope::Envelope;
use ordo_core::metrics as m;
use ordo_core::projection::fold::event_version;
use ordo_core::projection::{fold_events, Projection, ReadModel, Step};
use ordo_core::retry::Backoff;
use ordo_core::servicebus::receiver::{Delivery, ReceiveError, SessionReceiver, SessionSource};

use crate::config::ProjectorSection;
use crate::store::{BlockRecord, StoreError, Written};
use crate::Store;

/// Dead-letter reason for later messages of a blocked aggregate.
pub const REASON_BLOCKED: &str = "AggregateBlocked";
/// Dead-letter reason for a body that is not an envelope.
pub const REASON_DECODE: &str = "UndecodableMessage";
/// Dead-letter reason for an envelope version this build does not read.
pub const REASON_VERSION: &str = "UnsupportedEnvelopeVersion";
/// Dead-letter reason for an event a projection cannot apply.
pub const REASON_PROJECTION: &str = "ProjectionError";
/// Dead-letter reason for missing events that did not appear within `gap_timeout`.
pub const REASON_GAP: &str = "GapNotHealed";

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
}

/// What this process is doing, for its heartbeat in `ordo_projectors`.
#[derive(Debug, Default)]
pub struct Activity {
    /// Sessions held now.
    pub sessions_held: std::sync::atomic::AtomicU64,
    /// Events applied since start.
    pub applied: std::sync::atomic::AtomicU64,
}

impl Activity {
    fn held(&self, delta: i64) {
        use std::sync::atomic::Ordering::Relaxed;
        if delta > 0 {
            self.sessions_held.fetch_add(1, Relaxed);
        } else {
            self.sessions_held.fetch_sub(1, Relaxed);
        }
        metrics::gauge!(m::SESSIONS_HELD).increment(delta as f64);
    }
}

/// Why work on a batch stopped without settling it normally.
#[derive(Debug, thiserror::Error)]
enum WorkError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("version guard failed {0} times in a row")]
    ConflictStorm(u32),
}

impl WorkError {
    fn is_retryable(&self) -> bool {
        match self {
            WorkError::Store(e) => e.is_retryable(),
            WorkError::ConflictStorm(_) => true,
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

/// Where folding stopped short of the batch.
#[derive(Debug, Clone)]
struct Stop {
    /// First version not applied.
    version: i64,
    projection: String,
    reason: &'static str,
    description: String,
}

enum FoldEnd {
    Done,
    Stopped(Stop),
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

fn decode<M: Delivery>(msg: &M) -> Result<Event, (&'static str, String)> {
    Envelope::check_version(msg.envelope_version()).map_err(|e| (REASON_VERSION, e.to_string()))?;
    let body = msg.body().map_err(|e| (REASON_DECODE, e))?;
    let env = Envelope::decode(body).map_err(|e| match e {
        ordo_core::envelope::DecodeError::Version(_) => (REASON_VERSION, e.to_string()),
        _ => (REASON_DECODE, e.to_string()),
    })?;
    let doc = env
        .to_event_document()
        .map_err(|e| (REASON_DECODE, e.to_string()))?;
    Ok(Event {
        version: env.event_id,
        aggregate_id: env.aggregate_id.clone(),
        timestamp_ms: env.timestamp_millis(),
        doc,
    })
}

impl Engine {
    fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.cfg.retry_initial,
            max: self.cfg.retry_max,
        }
    }

    /// One worker: accepts sessions until `cancel`, then returns after releasing its session.
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
        let mut source: Option<S> = None;
        let mut delays = self.backoff().delays();
        while !cancel.is_cancelled() {
            let src = match source.as_mut() {
                Some(s) => s,
                None => {
                    let connected = tokio::select! {
                        r = connect() => r,
                        _ = cancel.cancelled() => break,
                    };
                    match connected {
                        Ok(s) => source.insert(s),
                        Err(e) => {
                            let delay = delays.next().unwrap_or(self.cfg.retry_max);
                            tracing::warn!(worker = index, error = %e, delay_ms = delay.as_millis() as u64, "cannot connect to service bus");
                            tokio::select! {
                                _ = tokio::time::sleep(delay) => {}
                                _ = cancel.cancelled() => break,
                            }
                            continue;
                        }
                    }
                }
            };
            let accepted = tokio::select! {
                r = src.accept_next(self.cfg.accept_timeout) => r,
                _ = cancel.cancelled() => break,
            };
            match accepted {
                Ok(None) => {}
                Ok(Some(session)) => {
                    delays = self.backoff().delays();
                    self.work_session(session, &cancel).await;
                }
                Err(e) => {
                    let delay = delays.next().unwrap_or(self.cfg.retry_max);
                    tracing::warn!(worker = index, error = %e, delay_ms = delay.as_millis() as u64, "accepting a session failed; reconnecting");
                    source = None;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = cancel.cancelled() => break,
                    }
                }
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
        self.activity.held(1);
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
                self.activity.held(-1);
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
                .batch(&mut session, &mut held, msgs, &mut last_renew)
                .await
            {
                After::Continue => idle_since = Instant::now(),
                After::Drop => break,
            }
        }
        session.close().await;
        self.activity.held(-1);
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

    async fn batch<R: SessionReceiver>(
        &self,
        session: &mut R,
        held: &mut Held,
        msgs: Vec<R::Message>,
        last_renew: &mut Instant,
    ) -> After {
        let started = Instant::now();
        let decoded: Vec<Result<Event, (&'static str, String)>> = msgs.iter().map(decode).collect();
        let aggregate_id = decoded
            .iter()
            .find_map(|d| d.as_ref().ok().map(|e| e.aggregate_id.clone()))
            .unwrap_or_else(|| session.session_id().to_string());

        // Is the aggregate blocked? Checked once per session, and on every batch while blocked
        // (a repair may have lifted it).
        if !held.checked_blocked || held.blocked.is_some() {
            let was = held.blocked;
            let r = self
                .renewing(
                    session,
                    last_renew,
                    self.with_retries(|| self.store.blocked_at(&aggregate_id)),
                )
                .await;
            match r {
                None => return After::Drop,
                Some(Err(e)) => {
                    tracing::warn!(aggregate = %aggregate_id, error = %e, "cannot read ordo_blocked; abandoning the batch");
                    return self.abandon_all(session, &msgs).await;
                }
                Some(Ok(b)) => {
                    held.blocked = b;
                    held.checked_blocked = true;
                }
            }
            if was.is_some() && held.blocked.is_none() {
                tracing::info!(aggregate = %aggregate_id, "aggregate was repaired; resuming");
                held.models = vec![None; self.projections.len()];
            }
            if held.blocked.is_none() && held.state_says_blocked {
                if session.set_state(Vec::new()).await.is_err() {
                    return After::Drop;
                }
                held.state_says_blocked = false;
            }
        }
        if let Some(at) = held.blocked {
            for (msg, d) in msgs.iter().zip(&decoded) {
                let r = match d {
                    Ok(e) if e.version < at => {
                        metrics::counter!(m::DUPLICATES).increment(1);
                        session.complete(msg).await
                    }
                    _ => self.dead_letter(session, msg, REASON_BLOCKED, &format!("aggregate {aggregate_id} is blocked at v{at}; repair re-projects it from the events collection")).await,
                };
                if let Err(e) = r {
                    self.lock_trouble(session.session_id(), &e);
                    return After::Drop;
                }
            }
            return After::Continue;
        }

        let cut = decoded
            .iter()
            .position(Result::is_err)
            .unwrap_or(decoded.len());
        let events: Vec<&Event> = decoded[..cut]
            .iter()
            .filter_map(|d| d.as_ref().ok())
            .collect();

        // Apply, retrying transient faults in place while the lock is renewed.
        let mut attempt = 0;
        let mut delays = self.backoff().delays();
        let outcome = loop {
            let fut = self.apply(held, &aggregate_id, &events);
            match self.renewing(session, last_renew, fut).await {
                None => return After::Drop,
                Some(Ok(o)) => break o,
                Some(Err(e)) if e.is_retryable() && attempt < self.cfg.transient_retry_limit => {
                    attempt += 1;
                    metrics::counter!(m::RETRIES, "op" => "apply").increment(1);
                    let delay = delays.next().unwrap_or(self.cfg.retry_max);
                    tracing::warn!(aggregate = %aggregate_id, attempt, delay_ms = delay.as_millis() as u64, error = %e, "transient fault applying a batch; retrying");
                    held.models = vec![None; self.projections.len()];
                    if self
                        .renewing(session, last_renew, tokio::time::sleep(delay))
                        .await
                        .is_none()
                    {
                        return After::Drop;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(aggregate = %aggregate_id, attempts = attempt + 1, error = %e, "giving up on the batch for now; abandoning it for a later retry");
                    held.models = vec![None; self.projections.len()];
                    return self.abandon_all(session, &msgs).await;
                }
            }
        };
        let (limit, base, stop) = outcome;

        // Settle: completes for what is durable, then poison and blocked messages.
        let mut stop = stop;
        let mut poison_sent = false;
        let mut seen = std::collections::BTreeSet::new();
        let now_ms = mongodb::bson::DateTime::now().timestamp_millis();
        for (i, (msg, d)) in msgs.iter().zip(&decoded).enumerate() {
            let r = match d {
                Ok(e) if i < cut && e.version <= limit => {
                    if e.version <= base || !seen.insert(e.version) {
                        metrics::counter!(m::DUPLICATES).increment(1);
                    } else {
                        metrics::counter!(m::EVENTS_APPLIED).increment(1);
                        self.activity
                            .applied
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if let Some(ts) = e.timestamp_ms {
                            metrics::histogram!(m::END_TO_END_LAG)
                                .record((now_ms - ts).max(0) as f64 / 1000.0);
                        }
                    }
                    session.complete(msg).await
                }
                Ok(_) if stop.is_some() && !poison_sent => {
                    poison_sent = true;
                    let s = stop.as_ref().expect("checked");
                    self.dead_letter(session, msg, s.reason, &s.description).await
                }
                Err((reason, description)) if stop.is_none() && !poison_sent => {
                    poison_sent = true;
                    stop = Some(Stop {
                        version: limit.max(base) + 1,
                        projection: "*".into(),
                        reason,
                        description: description.clone(),
                    });
                    let msg_id = msg.message_id().unwrap_or_default();
                    tracing::error!(aggregate = %aggregate_id, message_id = %msg_id, reason, description = %description, "poison message");
                    self.dead_letter(session, msg, reason, description).await
                }
                _ => {
                    self.dead_letter(session, msg, REASON_BLOCKED, &format!("aggregate {aggregate_id} is blocked; repair re-projects it from the events collection")).await
                }
            };
            if let Err(e) = r {
                self.lock_trouble(session.session_id(), &e);
                return After::Drop;
            }
            if poison_sent && held.blocked.is_none() {
                if let Some(s) = &stop {
                    let record = BlockRecord {
                        aggregate_id: aggregate_id.clone(),
                        projection: s.projection.clone(),
                        blocked_at_event_id: s.version,
                        reason: s.reason.to_string(),
                        description: s.description.clone(),
                        message_id: msg.message_id().unwrap_or_default(),
                    };
                    if let Err(e) = self.with_retries(|| self.store.block(&record)).await {
                        tracing::error!(aggregate = %aggregate_id, error = %e, "cannot record the blocked aggregate; later messages are still dead-lettered while this session is held");
                    }
                    metrics::counter!(m::AGGREGATES_BLOCKED).increment(1);
                    tracing::error!(aggregate = %aggregate_id, blocked_at = s.version, reason = s.reason, "aggregate blocked");
                    held.blocked = Some(s.version);
                    let state = format!("blocked at v{} ({})", s.version, s.reason).into_bytes();
                    if session.set_state(state).await.is_err() {
                        return After::Drop;
                    }
                    held.state_says_blocked = true;
                }
            }
        }
        let elapsed = started.elapsed();
        metrics::histogram!(m::APPLY_LATENCY).record(elapsed.as_secs_f64());
        tracing::debug!(aggregate = %aggregate_id, messages = msgs.len(), elapsed_us = elapsed.as_micros() as u64, "batch settled");
        After::Continue
    }

    async fn dead_letter<R: SessionReceiver>(
        &self,
        session: &mut R,
        msg: &R::Message,
        reason: &str,
        description: &str,
    ) -> Result<(), ReceiveError> {
        session.dead_letter(msg, reason, description).await?;
        metrics::counter!(m::DEAD_LETTERED, "reason" => reason.to_string()).increment(1);
        Ok(())
    }

    async fn abandon_all<R: SessionReceiver>(&self, session: &mut R, msgs: &[R::Message]) -> After {
        for msg in msgs {
            if let Err(e) = session.abandon(msg).await {
                self.lock_trouble(session.session_id(), &e);
                break;
            }
        }
        // Release the session so another worker (or this one, later) retries it.
        After::Drop
    }

    async fn with_retries<T, Fut>(&self, op: impl Fn() -> Fut) -> Result<T, StoreError>
    where
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut delays = self.backoff().delays();
        let mut attempt = 0;
        loop {
            match op().await {
                Err(e) if e.is_retryable() && attempt < self.cfg.transient_retry_limit => {
                    attempt += 1;
                    tokio::time::sleep(delays.next().unwrap_or(self.cfg.retry_max)).await;
                }
                r => return r,
            }
        }
    }

    /// Folds `events` into every relevant projection and writes each changed model once.
    /// Returns the highest version now durable for the batch (`limit`), the highest version
    /// applied before the batch (`base`, for the duplicate metric), and where folding stopped.
    async fn apply(
        &self,
        held: &mut Held,
        aggregate_id: &str,
        events: &[&Event],
    ) -> Result<(i64, i64, Option<Stop>), WorkError> {
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
        // Phase 1: find where folding must stop (poison, unhealed gap), without writing.
        for (pi, p) in self.projections.iter().enumerate() {
            let Some((model, _)) = &held.models[pi] else {
                continue;
            };
            let mut model = model.clone();
            if let FoldEnd::Stopped(s) = self
                .fold(p.as_ref(), &mut model, events, limit, &mut healed)
                .await?
            {
                if s.version <= limit {
                    limit = s.version - 1;
                    stop = Some(s);
                }
            }
        }
        // Phase 2: fold up to the limit and write, reloading on a failed guard.
        for (pi, p) in self.projections.iter().enumerate() {
            let mut conflicts = 0;
            loop {
                let Some((stored, loaded)) = held.models[pi].clone() else {
                    break;
                };
                let mut model = stored.clone();
                self.fold(p.as_ref(), &mut model, events, limit, &mut healed)
                    .await?;
                if !model.needs_write(loaded) {
                    held.models[pi] = Some((model, loaded));
                    break;
                }
                match self.store.write(p.as_ref(), &model, loaded).await? {
                    Written::Ok => {
                        let v = model.version;
                        held.models[pi] = Some((model, v));
                        break;
                    }
                    Written::Conflict => {
                        metrics::counter!(m::GUARD_CONFLICTS).increment(1);
                        conflicts += 1;
                        if conflicts > self.cfg.transient_retry_limit.max(3) {
                            return Err(WorkError::ConflictStorm(conflicts));
                        }
                        let fresh = self.store.load(p.as_ref(), aggregate_id).await?;
                        let v = fresh.version;
                        held.models[pi] = Some((fresh, v));
                    }
                }
            }
        }
        Ok((limit, base, stop))
    }

    /// Folds the events up to `limit` into `model`, healing gaps from the events collection.
    async fn fold(
        &self,
        p: &dyn Projection,
        model: &mut ReadModel,
        events: &[&Event],
        limit: i64,
        healed: &mut BTreeMap<i64, Document>,
    ) -> Result<FoldEnd, StoreError> {
        let docs: Vec<&Document> = events
            .iter()
            .filter(|e| e.version <= limit)
            .map(|e| &e.doc)
            .collect();
        loop {
            let err = match fold_events(p, model, docs.iter().copied()) {
                Ok(None) => return Ok(FoldEnd::Done),
                Ok(Some(Step::Gap { from, to })) => {
                    let missing = (from..=to).any(|v| !healed.contains_key(&v));
                    if missing {
                        match self
                            .store
                            .heal(&model.id, from, to, self.cfg.gap_timeout)
                            .await?
                        {
                            Some(found) => {
                                metrics::counter!(m::GAPS_HEALED).increment(found.len() as u64);
                                tracing::info!(aggregate = %model.id, from, to, "gap healed from the events collection");
                                for e in found {
                                    healed.insert(event_version(&e), e);
                                }
                            }
                            None => {
                                return Ok(FoldEnd::Stopped(Stop {
                                    version: from,
                                    projection: p.name().to_string(),
                                    reason: REASON_GAP,
                                    description: format!(
                                        "events v{from}..v{to} of {} not found in the events collection within {:?}",
                                        model.id, self.cfg.gap_timeout
                                    ),
                                }))
                            }
                        }
                    }
                    let mut failed = None;
                    for v in from..=to {
                        if let Err(e) = model.apply(p, &healed[&v]) {
                            failed = Some(e);
                            break;
                        }
                    }
                    match failed {
                        None => continue,
                        Some(e) => e,
                    }
                }
                Ok(Some(_)) => return Ok(FoldEnd::Done),
                Err(e) => e,
            };
            tracing::error!(aggregate = %model.id, projection = p.name(), event_id = err.event_id, error = %err, "projection error");
            return Ok(FoldEnd::Stopped(Stop {
                version: err.event_id,
                projection: p.name().to_string(),
                reason: REASON_PROJECTION,
                description: err.to_string(),
            }));
        }
    }
}
