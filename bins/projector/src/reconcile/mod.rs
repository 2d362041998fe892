//! Reconciliation: the backstop behind the broker. Finds every aggregate whose read model (per
//! projection) is behind the highest `eventId` of that aggregate in the events collection and
//! catches it up from there, whatever lost the events on the way: history lost by the producer,
//! messages the broker dead-lettered by itself (MaxDeliveryCountExceeded, TTL), a restart
//! before the first checkpoint, events inserted while no producer ran.
//!
//! What a run relies on:
//! - The events collection is the truth: an aggregate's read model is current when its
//!   `lastEventId` equals the highest `eventId` of the aggregate, for every projection that
//!   selects one of its (aggregateType, eventType) pairs.
//! - Catching up uses the worker's guarded write (`{_id, lastEventId, _epoch}`): a guard that fails
//!   means someone else (a live worker, a repair) moved the document; the run reads it again and
//!   decides again, and after a few such conflicts leaves the aggregate to the worker. It never
//!   writes an older version over a newer one.
//! - Blocked aggregates (`ordo_blocked`) are reported and not touched: `repair` owns them.
//! - Incremental runs find the aggregates with events since the last run from a change stream
//!   on the events collection, resumed from the token saved by the previous run
//!   (`ordo_reconcile`). Change-stream order is the server's commit order, so this works for
//!   any `_id` type and does not compare clocks; `_id` order is not insertion order for
//!   strings, UUIDs or composite ids. The first run, or a run whose token fell out of the
//!   oplog (ChangeStreamHistoryLost), does a full pass instead, after taking a new token, so
//!   nothing inserted during the pass is missed by the next run.
//! - An aggregate that could not be caught up (a hole in its history, an invalid event, a
//!   projection error, a conflict storm, a transient fault) is kept in the watermark document
//!   and checked again by the next run.
//!
//! Files: this one (a run, start to end, and the periodic task), `watermark.rs` (where the
//! next run resumes, and what it retries), `catch_up.rs` (comparing aggregates and catching up
//! the read models behind).

mod catch_up;
mod watermark;

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mongodb::change_stream::event::ResumeToken;

use ordo_core::metrics as m;
use ordo_projection::Projection;

use crate::store::StoreError;
use crate::Store;
use catch_up::Pass;
pub use watermark::{watermark_key, WATERMARK_COLLECTION};

/// Aggregates checked per round trip (one `$in` query per projection).
const CHUNK: usize = 500;

/// Change events read by one incremental run at most; the rest is left to the next run.
const MAX_CHANGES_PER_RUN: usize = 2_000_000;

/// How a run chose its aggregates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every aggregate of the events collection.
    Full,
    /// Only aggregates with events since the last run (and those it could not catch up).
    Incremental,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Incremental => "incremental",
        }
    }
}

/// What a run found and did.
#[derive(Debug, Clone)]
pub struct Report {
    /// Full pass or incremental.
    pub mode: Mode,
    /// Why a full pass ran instead of an incremental one, if it did.
    pub full_because: Option<String>,
    /// Aggregates whose read models were compared with the events collection.
    pub checked: u64,
    /// Aggregates with at least one read model behind.
    pub behind: u64,
    /// Read models caught up: written (one per aggregate and projection).
    pub caught_up: u64,
    /// Behind but blocked in `ordo_blocked`: reported, not touched.
    pub blocked: Vec<String>,
    /// Behind and not caught up, with the reason; checked again by the next run.
    pub not_caught_up: Vec<(String, String)>,
    /// How long the run took.
    pub elapsed: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "reconcile ({}{}): {} aggregates checked, {} behind, {} read models caught up, {} blocked (left alone), {} not caught up, in {:.3}s",
            self.mode.label(),
            self.full_because
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default(),
            self.checked,
            self.behind,
            self.caught_up,
            self.blocked.len(),
            self.not_caught_up.len(),
            self.elapsed.as_secs_f64()
        )?;
        for id in &self.blocked {
            writeln!(f, "  blocked: {id}")?;
        }
        for (id, why) in &self.not_caught_up {
            writeln!(f, "  not caught up: {id}: {why}")?;
        }
        Ok(())
    }
}

/// A reconciliation error that ends the run (the watermark is not moved).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The driver failed outside the store's operations (change stream, watermark).
    #[error("mongodb: {0}")]
    Mongo(#[from] mongodb::error::Error),
}

impl ReconcileError {
    /// The `reason` label of `ordo_retries_total{operation="reconcile"}`: the driver's
    /// ([`ordo_core::mongo::error_reason`]), or what is wrong with a source event.
    fn reason(&self) -> &'static str {
        match self {
            ReconcileError::Mongo(e) => ordo_core::mongo::error_reason(e),
            ReconcileError::Store(e) => e.reason(),
        }
    }
}

/// Runs reconciliation over `projections` and moves the watermark. `full` forces a full pass.
pub async fn reconcile(
    store: &Store,
    projections: &[Arc<dyn Projection>],
    full: bool,
) -> Result<Report, ReconcileError> {
    run(store, projections, full, true).await
}

/// A full pass over `projections` that leaves the watermark alone (it covers only these
/// projections): `rebuild`'s catch-up after its swap.
pub async fn full_pass(
    store: &Store,
    projections: &[Arc<dyn Projection>],
) -> Result<Report, ReconcileError> {
    run(store, projections, true, false).await
}

/// The aggregates a run checks.
enum Scope {
    /// Those with events inserted since the watermark's token, up to `next`.
    Since {
        ids: BTreeSet<String>,
        next: ResumeToken,
    },
    /// Every aggregate, and why.
    Full { because: String },
}

/// Full when asked for, before the first run, or when the watermark's token fell out of the
/// oplog; otherwise the aggregates with events since the token.
async fn scope(
    store: &Store,
    full: bool,
    token: Option<ResumeToken>,
) -> Result<Scope, ReconcileError> {
    let full_because = |because: String| Ok(Scope::Full { because });
    match (full, token) {
        (true, _) => full_because("asked for".to_string()),
        (false, None) => full_because("no watermark yet".to_string()),
        (false, Some(t)) => match store.inserted_since(t, MAX_CHANGES_PER_RUN).await {
            Ok((ids, next)) => Ok(Scope::Since { ids, next }),
            Err(e)
                if ordo_core::mongo::server_code(&e)
                    .is_some_and(|c| [286, 260, 280].contains(&c)) =>
            {
                full_because(format!("the watermark fell out of the oplog ({e})"))
            }
            Err(e) => Err(e.into()),
        },
    }
}

async fn run(
    store: &Store,
    projections: &[Arc<dyn Projection>],
    full: bool,
    persist: bool,
) -> Result<Report, ReconcileError> {
    let started = Instant::now();
    let key = watermark_key(store.events_collection_name(), projections);
    let saved = watermark::load(store, &key).await?;
    let scope = scope(store, full, saved.token).await?;
    let (mode, full_because) = match &scope {
        Scope::Since { .. } => (Mode::Incremental, None),
        Scope::Full { because } => (Mode::Full, Some(because.clone())),
    };
    let blocked_now: HashSet<String> = store.blocked_ids().await?.into_iter().collect();
    let mut pass = Pass {
        store,
        projections,
        blocked_now,
        report: Report {
            mode,
            full_because,
            checked: 0,
            behind: 0,
            caught_up: 0,
            blocked: Vec::new(),
            not_caught_up: Vec::new(),
            elapsed: Duration::ZERO,
        },
    };
    let next_token = match scope {
        Scope::Since { mut ids, next } => {
            ids.extend(saved.retry);
            let ids: Vec<String> = ids.into_iter().collect();
            for chunk in ids.chunks(CHUNK) {
                let latest = store.latest_of(chunk).await?;
                pass.check(latest).await?;
            }
            next
        }
        Scope::Full { .. } => {
            // Taken before the pass: whatever is inserted during it is in the next run.
            let next = store.current_token().await?;
            let mut chunk = Vec::with_capacity(CHUNK);
            let mut cursor = store.latest_all().await?;
            while let Some(l) = cursor.next_latest().await? {
                chunk.push(l);
                if chunk.len() == CHUNK {
                    pass.check(std::mem::take(&mut chunk)).await?;
                }
            }
            pass.check(chunk).await?;
            next
        }
    };

    let mut report = pass.report;
    report.elapsed = started.elapsed();
    metrics::counter!(m::RECONCILE_RUNS, "mode" => report.mode.label()).increment(1);
    metrics::counter!(m::RECONCILE_CHECKED).increment(report.checked);
    metrics::counter!(m::RECONCILE_CAUGHT_UP).increment(report.caught_up);
    metrics::histogram!(m::RECONCILE_DURATION).record(report.elapsed.as_secs_f64());
    if persist {
        watermark::save(store, &key, &report, &next_token).await?;
    }
    Ok(report)
}

/// Runs [`reconcile`] every `interval` until `cancel`; a failed run is logged and retried at
/// the next tick (the watermark only moves after a run that finished).
///
/// A failed run is counted in `ordo_retries_total{operation="reconcile", reason}` by hand, not
/// through [`ordo_core::retry::Retry`]: the next try comes at the next tick, not after a
/// backoff delay, and `Retry` would log a delay nothing waits.
pub async fn periodic(
    store: Store,
    projections: Vec<Arc<dyn Projection>>,
    interval: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = cancel.cancelled() => return,
        }
        let run = tokio::select! {
            r = reconcile(&store, &projections, false) => r,
            _ = cancel.cancelled() => return,
        };
        match run {
            Ok(report) => {
                let level_warn = !report.blocked.is_empty() || !report.not_caught_up.is_empty();
                // The fields keep the names `healed` and `unhealed` they were published with,
                // so log queries and alerts on them keep working.
                if level_warn {
                    tracing::warn!(
                        mode = report.mode.label(),
                        checked = report.checked,
                        behind = report.behind,
                        healed = report.caught_up,
                        blocked = report.blocked.len(),
                        unhealed = report.not_caught_up.len(),
                        elapsed_ms = report.elapsed.as_millis() as u64,
                        "reconcile run done"
                    );
                } else {
                    tracing::info!(
                        mode = report.mode.label(),
                        checked = report.checked,
                        behind = report.behind,
                        healed = report.caught_up,
                        elapsed_ms = report.elapsed.as_millis() as u64,
                        "reconcile run done"
                    );
                }
            }
            Err(e) => {
                let reason = e.reason();
                metrics::counter!(m::RETRIES, "operation" => "reconcile", "reason" => reason)
                    .increment(1);
                tracing::warn!(reason, error = %e, "reconcile run failed; the next run tries again");
            }
        }
    }
}
