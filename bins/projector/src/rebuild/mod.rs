//! `ordo-projector rebuild --projection NAME`: replay the events collection into a shadow
//! collection and swap it in, while projectors keep running.
//!
//! - The shadow is created with the read model's collection options (validator, collation) and
//!   its indexes before any document goes in, so the swap keeps what the application relies on.
//! - Every rebuilt document carries a new rebuild epoch (`_epoch`). Writers guard on
//!   `{_id, lastEventId, _epoch}`, so a worker holding a model cached before the swap fails its
//!   guard even when the rebuilt document has the same version, reloads, and continues from the
//!   rebuilt document.
//! - An event that cannot be folded (invalid in the events collection, a duplicate version, a
//!   hole, a projection error) does not end the replay: its aggregate is rebuilt up to the
//!   event before. When any aggregate stopped, nothing is swapped in (new rules that fail on
//!   old events would otherwise replace the live read models with fewer or none): the run
//!   fails naming them, and the live collection and `ordo_blocked` are untouched. With
//!   `--allow-blocked` the shadow is swapped in anyway and those aggregates are blocked there,
//!   reason `RebuildStopped`, for `repair`; blocks of an earlier rebuild of the projection are
//!   replaced by this run's.
//! - Writes workers made to the old collection during the replay go away with it; a full
//!   reconciliation pass over this projection after the swap catches up every aggregate whose
//!   events collection holds a newer version than its rebuilt document.
//! - A shadow left by a failed rebuild is dropped when the failure is seen, and any leftover
//!   `<collection>_rebuild_*` is dropped when the next rebuild of the projection starts. One
//!   rebuild per projection at a time.
//!
//! Files: this one (the run: checks, build, swap, blocks, catch-up), `shadow.rs` (the shadow
//! collection and the swap), `replay.rs` (folding the events collection into the shadow).

mod replay;
mod shadow;

use std::fmt;
use std::sync::Arc;

use mongodb::bson::Document;
use mongodb::Database;

use ordo_projection::Projection;

use crate::projections::forbidden_target;
use crate::reconcile;
use crate::repair::pick;
use crate::store::{BlockRecord, REBUILD_STOPPED};
use crate::{ProjectorError, Store};

/// Marks a shadow collection: `<collection>_rebuild_<epoch>`.
pub(crate) const SHADOW_MARK: &str = "_rebuild_";

/// What a rebuild did.
#[derive(Debug, Clone)]
pub struct Rebuilt {
    /// The read-model collection swapped in.
    pub collection: String,
    /// The epoch every rebuilt document carries.
    pub epoch: i64,
    /// Documents written into the shadow.
    pub documents: u64,
    /// Secondary indexes copied to the shadow.
    pub indexes: usize,
    /// Aggregates blocked because an event could not be folded: (aggregate, version, reason).
    pub blocked: Vec<(String, i64, String)>,
    /// Read models the catch-up after the swap wrote.
    pub caught_up: u64,
    /// Stale shadows dropped at start.
    pub stale_dropped: Vec<String>,
}

impl fmt::Display for Rebuilt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "rebuilt {} (epoch {}): {} documents, {} indexes kept, {} caught up after the swap, {} blocked",
            self.collection,
            self.epoch,
            self.documents,
            self.indexes,
            self.caught_up,
            self.blocked.len()
        )?;
        for s in &self.stale_dropped {
            writeln!(f, "  dropped stale shadow {s}")?;
        }
        for (id, v, why) in &self.blocked {
            writeln!(f, "  blocked: {id} at v{v}: {why}")?;
        }
        Ok(())
    }
}

/// Rebuilds projection `name` (see the module doc).
pub async fn rebuild(
    store: &Store,
    projections: &[Arc<dyn Projection>],
    name: &str,
    blocked_collection: &str,
    allow_blocked: bool,
) -> Result<Rebuilt, ProjectorError> {
    let p = pick(projections, Some(name))?[0].clone();
    let target = p.collection().to_string();
    if let Some(why) = forbidden_target(&target, store.events_collection_name(), blocked_collection)
    {
        return Err(ProjectorError::RebuildTarget {
            collection: target,
            why,
        });
    }
    let db = store.database().clone();
    let stale_dropped = shadow::drop_shadows(&db, &target).await?;
    let epoch = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000;
    let shadow = format!("{target}{SHADOW_MARK}{epoch}");
    let shadow = Shadow {
        db: &db,
        name: &shadow,
        target: &target,
        epoch,
    };
    let Built {
        indexes,
        documents,
        blocked,
    } = match build_and_swap(store, p.as_ref(), &shadow, allow_blocked).await {
        Ok(b) => b,
        Err(e) => {
            let shadow = shadow.name;
            if let Err(drop) = db.collection::<Document>(shadow).drop().await {
                tracing::warn!(shadow = %shadow, error = %drop, "could not drop the failed rebuild's shadow; the next rebuild drops it");
            }
            return Err(ProjectorError::RebuildFailed {
                projection: name.to_string(),
                shadow: shadow.to_string(),
                source: Box::new(e),
            });
        }
    };
    tracing::info!(
        projection = name,
        documents,
        indexes,
        epoch,
        "rebuilt collection swapped in"
    );
    block_stopped(store, p.as_ref(), &blocked).await?;
    let catch_up = reconcile::full_pass(store, std::slice::from_ref(&p)).await?;
    tracing::info!(
        projection = name,
        caught_up = catch_up.caught_up,
        "catch-up after the swap done"
    );
    Ok(Rebuilt {
        collection: target,
        epoch,
        documents,
        indexes,
        blocked,
        caught_up: catch_up.caught_up,
        stale_dropped,
    })
}

/// Where one rebuild writes: the shadow `name` of `target`, whose documents carry `epoch`.
struct Shadow<'a> {
    db: &'a Database,
    name: &'a str,
    target: &'a str,
    epoch: i64,
}

/// What the shadow held when it was swapped in.
struct Built {
    /// Secondary indexes copied to the shadow.
    indexes: usize,
    /// Documents written into the shadow.
    documents: u64,
    /// Aggregates that stopped short: (aggregate, first version not folded, reason).
    blocked: Vec<(String, i64, String)>,
}

/// Prepares the shadow, replays into it and swaps it in, unless an aggregate stopped short and
/// `allow_blocked` is off.
async fn build_and_swap(
    store: &Store,
    p: &dyn Projection,
    shadow: &Shadow<'_>,
    allow_blocked: bool,
) -> Result<Built, ProjectorError> {
    let Shadow {
        db,
        name,
        target,
        epoch,
    } = *shadow;
    let indexes = shadow::prepare_shadow(db, target, name).await?;
    let (documents, blocked) = replay::replay(store, p, db, name, epoch).await?;
    if !blocked.is_empty() && !allow_blocked {
        return Err(ProjectorError::RebuildStopped {
            collection: target.to_string(),
            stopped: blocked,
        });
    }
    shadow::swap_in(db, name, target).await?;
    Ok(Built {
        indexes,
        documents,
        blocked,
    })
}

/// Lifts the blocks of an earlier rebuild of `p` and blocks the aggregates this one stopped
/// short, reason `RebuildStopped`, for `repair`.
async fn block_stopped(
    store: &Store,
    p: &dyn Projection,
    blocked: &[(String, i64, String)],
) -> Result<(), ProjectorError> {
    let name = p.name();
    let lifted = store.lift_rebuild_blocks(name).await?;
    if lifted > 0 {
        tracing::info!(
            projection = name,
            lifted,
            "blocks of an earlier rebuild lifted"
        );
    }
    for (id, v, reason) in blocked {
        store
            .block(&BlockRecord {
                aggregate_id: id.clone(),
                projection: name.to_string(),
                blocked_at_event_id: *v,
                reason: REBUILD_STOPPED.into(),
                description: reason.clone(),
                message_id: String::new(),
            })
            .await?;
        tracing::error!(aggregate = %id, blocked_at = v, reason = %reason, "rebuild blocked an aggregate");
    }
    Ok(())
}
