//! One pass over aggregates: compare each with every projection's stored version, and catch
//! up the read models behind with the worker's guarded write, leaving blocked aggregates to
//! `repair` and an aggregate whose document keeps moving to the worker.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use ordo_core::metrics as m;
use ordo_projection::{fold_events, Projection, ReadModel};

use super::{ReconcileError, Report};
use crate::store::{AggregateLatest as Latest, StoreError, Written};
use crate::Store;

/// Guard conflicts on one read model before the run leaves it to the worker.
const CONFLICTS_BEFORE_GIVING_UP: u32 = 3;

/// A run in progress: what it checks against, and what it found so far.
pub(super) struct Pass<'a> {
    pub(super) store: &'a Store,
    pub(super) projections: &'a [Arc<dyn Projection>],
    /// Blocked when the run started; one blocked since is seen by [`Pass::catch_up`].
    pub(super) blocked_now: HashSet<String>,
    pub(super) report: Report,
}

impl Pass<'_> {
    /// Compares one chunk of aggregates with every projection's stored versions and catches
    /// up the ones behind.
    pub(super) async fn check(&mut self, chunk: Vec<Latest>) -> Result<(), ReconcileError> {
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
            if let Err(why) = self.catch_up(&l, &pis).await {
                tracing::warn!(aggregate = %l.id, reason = %why, "reconcile could not catch the aggregate up; the next run checks it again");
                self.report.not_caught_up.push((l.id, why));
            }
        }
        Ok(())
    }

    /// Brings the read models `pis` of one aggregate up to the events collection.
    async fn catch_up(&mut self, l: &Latest, pis: &[usize]) -> Result<(), String> {
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
                            self.report.caught_up += 1;
                            tracing::info!(aggregate = %l.id, projection = p.name(), from = loaded, to = model.version, "reconcile caught a read model up");
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
