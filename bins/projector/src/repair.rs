//! `ordo-projector repair --aggregate ID`: re-project one aggregate from the events collection
//! and lift its block, while projectors keep running; `repair --all-blocked` does it for every
//! aggregate in `ordo_blocked` (after a projection fix that unblocks many at once).
//!
//! The order closes the race with live traffic: the block is lifted first, and only then is the
//! history read. A message that a worker dead-letters as `AggregateBlocked` before the unblock
//! was published from the events collection, so the history read after the unblock holds it;
//! a message that arrives after the unblock is applied by the worker. The write is guarded and
//! never goes below what is stored, so the repair and a worker racing on the same document
//! settle on the newer version.

use std::sync::Arc;

use mongodb::bson::Document;

use ordo_projection::{fold_history, HistoryError, Projection, ReadModel};

use crate::{ProjectorError, Store};

/// The projections `name` selects (all when `None`), or an error listing the known names.
pub fn pick<'a>(
    projections: &'a [Arc<dyn Projection>],
    name: Option<&str>,
) -> Result<Vec<&'a Arc<dyn Projection>>, ProjectorError> {
    let chosen: Vec<_> = projections
        .iter()
        .filter(|p| name.is_none_or(|n| p.name() == n))
        .collect();
    if chosen.is_empty() {
        return Err(ProjectorError::UnknownProjection {
            name: name.unwrap_or_default().to_string(),
            known: projections
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(chosen)
}

fn folded(p: &dyn Projection, id: &str, history: &[Document]) -> Result<ReadModel, ProjectorError> {
    let aggregate_id = id.to_string();
    fold_history(p, id, history).map_err(|e| match e {
        HistoryError::Apply(source) => ProjectorError::StillFails {
            aggregate_id,
            source,
        },
        source => ProjectorError::Unfoldable {
            aggregate_id,
            source,
        },
    })
}

/// Folds every chosen projection over the current history; fails on a hole or a projection
/// error without writing anything.
async fn fold_all(
    store: &Store,
    chosen: &[&Arc<dyn Projection>],
    aggregate_id: &str,
) -> Result<Vec<(Arc<dyn Projection>, ReadModel)>, ProjectorError> {
    let history = store.history(aggregate_id).await?;
    if history.is_empty() {
        return Err(ProjectorError::NoEvents {
            aggregate_id: aggregate_id.to_string(),
        });
    }
    chosen
        .iter()
        .map(|p| Ok(((*p).clone(), folded(p.as_ref(), aggregate_id, &history)?)))
        .collect()
}

/// Re-projects one aggregate (every projection, or the one named), writes it guarded (never
/// over a newer document) and lifts its block. Fails without touching anything when the
/// history still cannot be folded (a hole, an invalid event, a projection error).
pub async fn repair(
    store: &Store,
    projections: &[Arc<dyn Projection>],
    aggregate_id: &str,
    projection: Option<&str>,
) -> Result<(), ProjectorError> {
    repair_chosen(store, &pick(projections, projection)?, aggregate_id).await
}

/// [`repair`] with the projections already picked.
async fn repair_chosen(
    store: &Store,
    chosen: &[&Arc<dyn Projection>],
    aggregate_id: &str,
) -> Result<(), ProjectorError> {
    // A dry fold first: a repair that cannot succeed must leave the block in place.
    fold_all(store, chosen, aggregate_id).await?;
    let was_blocked = store.unblock(aggregate_id).await?;
    // Read again after the unblock: this history holds every event a worker dead-lettered
    // while the aggregate was blocked.
    let models = fold_all(store, chosen, aggregate_id).await?;
    for (p, model) in models {
        if model.version == 0 {
            continue;
        }
        store.write_folded(p.collection(), &model).await?;
        tracing::info!(
            aggregate = aggregate_id,
            projection = p.name(),
            version = model.version,
            "re-projected"
        );
    }
    if let Some(at) = store.blocked_at(aggregate_id).await? {
        return Err(ProjectorError::BlockedAgain {
            aggregate_id: aggregate_id.to_string(),
            at,
        });
    }
    tracing::info!(aggregate = aggregate_id, was_blocked, "repair done");
    Ok(())
}

/// What `repair --all-blocked` did: the aggregates it repaired, and each one it could not, with
/// why.
#[derive(Debug, Default)]
pub struct BlockedRepair {
    pub repaired: Vec<String>,
    pub failed: Vec<(String, String)>,
}

/// Aggregates named in full in the report; the rest are counted.
const NAMED: usize = 10;

impl std::fmt::Display for BlockedRepair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "repaired {} of {} blocked aggregates",
            self.repaired.len(),
            self.repaired.len() + self.failed.len()
        )?;
        for (id, why) in self.failed.iter().take(NAMED) {
            writeln!(f, "still blocked: {id}: {why}")?;
        }
        if self.failed.len() > NAMED {
            writeln!(f, "still blocked: {} more", self.failed.len() - NAMED)?;
        }
        Ok(())
    }
}

/// Repairs every aggregate recorded in `ordo_blocked`, one at a time, as `repair --aggregate`
/// does for one; an aggregate that still cannot be repaired keeps its block and is reported,
/// and the others are repaired all the same.
pub async fn repair_blocked(
    store: &Store,
    projections: &[Arc<dyn Projection>],
    projection: Option<&str>,
) -> Result<BlockedRepair, ProjectorError> {
    let chosen = pick(projections, projection)?;
    let mut report = BlockedRepair::default();
    for id in store.blocked_ids().await? {
        match repair_chosen(store, &chosen, &id).await {
            Ok(()) => report.repaired.push(id),
            Err(e) => {
                let why = e.to_string();
                tracing::warn!(aggregate = %id, error = %why, "still blocked");
                report.failed.push((id, why));
            }
        }
    }
    Ok(report)
}
