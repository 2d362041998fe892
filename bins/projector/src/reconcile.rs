//! Reconciliation: the backstop behind the broker. Finds every aggregate whose read model (per
//! projection) is behind the highest `eventId` of that aggregate in the events collection and
//! heals it from there, whatever lost the events on the way: history lost by the producer,
//! messages the broker dead-lettered by itself (MaxDeliveryCountExceeded, TTL), a restart
//! before the first checkpoint, events inserted while no producer ran.
//!
//! What a run relies on:
//! - The events collection is the truth: an aggregate's read model is current when its
//!   `lastEventId` equals the highest `eventId` of the aggregate, for every projection that
//!   selects one of its (aggregateType, eventType) pairs.
//! - Healing uses the worker's guarded write (`{_id, lastEventId, _epoch}`): a guard that fails
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
//! - An aggregate that could not be healed (a hole in its history, an invalid event, a
//!   projection error, a conflict storm, a transient fault) is kept in the watermark document
//!   and checked again by the next run.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};
use mongodb::change_stream::event::ResumeToken;

use ordo_core::metrics as m;
use ordo_projection::{fold_events, Projection, ReadModel};

use crate::store::{AggregateLatest as Latest, StoreError, Written};
use crate::Store;

/// Collection holding the reconciliation watermark, one document per events collection and
/// set of projections ([`watermark_key`]).
pub const WATERMARK_COLLECTION: &str = "ordo_reconcile";

/// The watermark's `_id`: the events collection and every projection with its collection.
/// Two sets of projections over one events collection (two pipelines side by side, or a
/// projection added) each have their own, so one set's run never makes the other's next run
/// skip aggregates it has not checked.
pub fn watermark_key(events_collection: &str, projections: &[Arc<dyn Projection>]) -> String {
    let mut set: Vec<String> = projections
        .iter()
        .map(|p| format!("{}={}", p.name(), p.collection()))
        .collect();
    set.sort();
    format!("{events_collection}:{}", set.join(","))
}

/// Aggregates checked per round trip (one `$in` query per projection).
const CHUNK: usize = 500;

/// Guard conflicts on one read model before the run leaves it to the worker.
const CONFLICTS_BEFORE_GIVING_UP: u32 = 3;

/// Aggregates kept for the next run at most; past it the next run is a full pass.
const MAX_RETRY_KEPT: usize = 10_000;

/// Change events read by one incremental run at most; the rest is left to the next run.
const MAX_CHANGES_PER_RUN: usize = 2_000_000;

/// How a run chose its aggregates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every aggregate of the events collection.
    Full,
    /// Only aggregates with events since the last run (and those left unhealed by it).
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
    /// Read models written (one per aggregate and projection).
    pub healed: u64,
    /// Behind but blocked in `ordo_blocked`: reported, not touched.
    pub blocked: Vec<String>,
    /// Behind and not healed, with the reason; checked again by the next run.
    pub unhealed: Vec<(String, String)>,
    /// How long the run took.
    pub elapsed: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "reconcile ({}{}): {} aggregates checked, {} behind, {} read models healed, {} blocked (left alone), {} not healed, in {:.3}s",
            self.mode.label(),
            self.full_because
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default(),
            self.checked,
            self.behind,
            self.healed,
            self.blocked.len(),
            self.unhealed.len(),
            self.elapsed.as_secs_f64()
        )?;
        for id in &self.blocked {
            writeln!(f, "  blocked: {id}")?;
        }
        for (id, why) in &self.unhealed {
            writeln!(f, "  not healed: {id}: {why}")?;
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

async fn run(
    store: &Store,
    projections: &[Arc<dyn Projection>],
    full: bool,
    persist: bool,
) -> Result<Report, ReconcileError> {
    let started = Instant::now();
    let watermarks = store
        .database()
        .collection::<Document>(WATERMARK_COLLECTION);
    let key = watermark_key(store.events_collection_name(), projections);
    let saved = watermarks.find_one(doc! { "_id": &key }).await?;
    let token: Option<ResumeToken> = saved
        .as_ref()
        .and_then(|d| d.get_document("token").ok())
        .and_then(|t| mongodb::bson::from_document(t.clone()).ok());
    let retry: Vec<String> = saved
        .as_ref()
        .and_then(|d| d.get_array("retry").ok())
        .map(|a| {
            a.iter()
                .filter_map(|b| b.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();

    let mut full_because = None;
    let incremental = match (full, token) {
        (true, _) => {
            full_because = Some("asked for".to_string());
            None
        }
        (false, None) => {
            full_because = Some("no watermark yet".to_string());
            None
        }
        (false, Some(t)) => match store.inserted_since(t, MAX_CHANGES_PER_RUN).await {
            Ok(found) => Some(found),
            Err(e)
                if ordo_core::mongo::server_code(&e)
                    .is_some_and(|c| [286, 260, 280].contains(&c)) =>
            {
                full_because = Some(format!("the watermark fell out of the oplog ({e})"));
                None
            }
            Err(e) => return Err(e.into()),
        },
    };

    let blocked_now: HashSet<String> = store.blocked_ids().await?.into_iter().collect();
    let mut pass = Pass {
        store,
        projections,
        blocked_now,
        report: Report {
            mode: if incremental.is_some() {
                Mode::Incremental
            } else {
                Mode::Full
            },
            full_because,
            checked: 0,
            behind: 0,
            healed: 0,
            blocked: Vec::new(),
            unhealed: Vec::new(),
            elapsed: Duration::ZERO,
        },
    };
    let next_token = match incremental {
        Some((ids, next)) => {
            let mut ids: BTreeSet<String> = ids;
            ids.extend(retry);
            let ids: Vec<String> = ids.into_iter().collect();
            for chunk in ids.chunks(CHUNK) {
                let latest = store.latest_of(chunk).await?;
                pass.check(latest).await?;
            }
            next
        }
        None => {
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
    metrics::counter!(m::RECONCILE_HEALED).increment(report.healed);
    metrics::histogram!(m::RECONCILE_DURATION).record(report.elapsed.as_secs_f64());
    if !persist {
        return Ok(report);
    }
    let keep: Vec<&String> = report.unhealed.iter().map(|(id, _)| id).collect();
    let mut set = doc! { "updatedAt": mongodb::bson::DateTime::now() };
    if keep.len() > MAX_RETRY_KEPT {
        // Too many to carry: the next run starts over with a full pass.
        set.insert("token", mongodb::bson::Bson::Null);
        set.insert("retry", Vec::<String>::new());
    } else {
        set.insert(
            "token",
            mongodb::bson::to_document(&next_token).map_err(|e| {
                mongodb::error::Error::custom(format!("resume token not storable: {e}"))
            })?,
        );
        set.insert("retry", keep.into_iter().cloned().collect::<Vec<_>>());
    }
    watermarks
        .update_one(doc! { "_id": &key }, doc! { "$set": set })
        .upsert(true)
        .await?;
    Ok(report)
}

struct Pass<'a> {
    store: &'a Store,
    projections: &'a [Arc<dyn Projection>],
    blocked_now: HashSet<String>,
    report: Report,
}

impl Pass<'_> {
    /// Compares one chunk of aggregates with every projection's stored versions and heals the
    /// ones behind.
    async fn check(&mut self, chunk: Vec<Latest>) -> Result<(), ReconcileError> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.report.checked += chunk.len() as u64;
        let ids: Vec<String> = chunk.iter().map(|l| l.id.clone()).collect();
        // Per aggregate: the projections that select it and are behind.
        let mut behind: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (pi, p) in self.projections.iter().enumerate() {
            let stored = self.store.stored_versions(p.collection(), &ids).await?;
            for l in &chunk {
                let selected = l.kinds.iter().any(|(t, e)| p.selects(t.as_deref(), e));
                if selected && stored.get(&l.id).copied().unwrap_or(0) < l.version {
                    behind.entry(l.id.clone()).or_default().push(pi);
                }
            }
        }
        for l in chunk {
            let Some(pis) = behind.remove(&l.id) else {
                continue;
            };
            self.report.behind += 1;
            if self.blocked_now.contains(&l.id) {
                self.report.blocked.push(l.id);
                continue;
            }
            if let Err(why) = self.heal(&l, &pis).await {
                tracing::warn!(aggregate = %l.id, reason = %why, "reconcile could not heal the aggregate; the next run checks it again");
                self.report.unhealed.push((l.id, why));
            }
        }
        Ok(())
    }

    /// Brings the read models `pis` of one aggregate up to the events collection.
    async fn heal(&mut self, l: &Latest, pis: &[usize]) -> Result<(), String> {
        let err = |e: StoreError| e.to_string();
        // Blocked since the run started: leave it to repair.
        if self.store.blocked_at(&l.id).await.map_err(err)?.is_some() {
            self.report.blocked.push(l.id.clone());
            return Ok(());
        }
        let mut models: Vec<(usize, ReadModel)> = Vec::new();
        for &pi in pis {
            let model = self
                .store
                .load(self.projections[pi].as_ref(), &l.id)
                .await
                .map_err(err)?;
            models.push((pi, model));
        }
        let from = models.iter().map(|(_, m)| m.version).min().unwrap_or(0) + 1;
        let mut events = self
            .store
            .events_between(&l.id, from, i64::MAX)
            .await
            .map_err(err)?;
        let mut problems = Vec::new();
        for (pi, mut stored) in models {
            let p = self.projections[pi].as_ref();
            let mut conflicts = 0;
            loop {
                let loaded = stored.version;
                let mut model = stored.clone();
                let stop = match fold_events(p, &mut model, events.iter()) {
                    Ok(None) => None,
                    Ok(Some(gap)) => Some(format!("{}: {gap}", p.name())),
                    Err(e) => {
                        problems.push(format!("{}: {e}", p.name()));
                        break;
                    }
                };
                if model.needs_write(loaded) {
                    match self.store.write(p, &model, loaded).await.map_err(err)? {
                        Written::Ok => {
                            self.report.healed += 1;
                            tracing::info!(aggregate = %l.id, projection = p.name(), from = loaded, to = model.version, "reconcile healed a read model");
                        }
                        Written::Conflict => {
                            metrics::counter!(m::GUARD_CONFLICTS).increment(1);
                            conflicts += 1;
                            if conflicts >= CONFLICTS_BEFORE_GIVING_UP {
                                problems.push(format!(
                                    "{}: the document kept moving ({conflicts} guard conflicts); left to the worker",
                                    p.name()
                                ));
                                break;
                            }
                            stored = self.store.load(p, &l.id).await.map_err(err)?;
                            if stored.version < from - 1 {
                                // Moved backwards (a rebuild swap): read what is missing.
                                events = self
                                    .store
                                    .events_between(&l.id, stored.version + 1, i64::MAX)
                                    .await
                                    .map_err(err)?;
                            }
                            continue;
                        }
                    }
                }
                if let Some(s) = stop {
                    problems.push(s);
                }
                break;
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// Runs [`reconcile`] every `interval` until `cancel`; a failed run is logged and retried at
/// the next tick (the watermark only moves after a run that finished).
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
                let level_warn = !report.blocked.is_empty() || !report.unhealed.is_empty();
                if level_warn {
                    tracing::warn!(
                        mode = report.mode.label(),
                        checked = report.checked,
                        behind = report.behind,
                        healed = report.healed,
                        blocked = report.blocked.len(),
                        unhealed = report.unhealed.len(),
                        elapsed_ms = report.elapsed.as_millis() as u64,
                        "reconcile run done"
                    );
                } else {
                    tracing::info!(
                        mode = report.mode.label(),
                        checked = report.checked,
                        behind = report.behind,
                        healed = report.healed,
                        elapsed_ms = report.elapsed.as_millis() as u64,
                        "reconcile run done"
                    );
                }
            }
            Err(e) => {
                metrics::counter!(m::RETRIES, "operation" => "reconcile").increment(1);
                tracing::warn!(error = %e, "reconcile run failed; the next run tries again");
            }
        }
    }
}
