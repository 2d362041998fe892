//! What the projector library's entry points return when they fail: [`ProjectorError`], one
//! variant per thing that failed, so a caller (the command line, a binary of your own) can
//! tell a bad projections file from a database outage without reading the message.

use std::net::SocketAddr;
use std::path::PathBuf;

use ordo_projection::{ApplyError, HistoryError, RuleError};

use crate::reconcile::ReconcileError;
use crate::store::StoreError;

/// Why a projector entry point failed: the daemon ([`crate::run`]), a subcommand
/// ([`crate::repair`], [`crate::rebuild`], [`crate::status`]) or loading the projections.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    /// `projector.projections_file` cannot be read.
    #[error("projector.projections_file: cannot read {}: {source}", path.display())]
    ProjectionsFileUnreadable {
        /// The file.
        path: PathBuf,
        /// Why it cannot be read.
        #[source]
        source: std::io::Error,
    },
    /// The projections file has a mistake in a rule.
    #[error("projections file {}: {source}", path.display())]
    ProjectionsFileInvalid {
        /// The file.
        path: PathBuf,
        /// The mistake, naming the projection, event type and key.
        #[source]
        source: RuleError,
    },
    /// The projections file defines none, and no projection written in Rust was given.
    #[error("projections file {}: defines no projection", path.display())]
    NoProjections {
        /// The file.
        path: PathBuf,
    },
    /// The projections (of the file and written in Rust) do not make a valid set.
    #[error("projections file {}: {source}", path.display())]
    ProjectionConflict {
        /// The file.
        path: PathBuf,
        /// Which projections clash, and how.
        #[source]
        source: ProjectionConflict,
    },
    /// The health and metrics server cannot bind `telemetry.listen`.
    #[error("telemetry.listen: cannot bind {listen}: {source}")]
    Telemetry {
        /// The address.
        listen: SocketAddr,
        /// Why it cannot be bound.
        #[source]
        source: std::io::Error,
    },
    /// The MongoDB client cannot be created (bad URI options, SRV lookup).
    #[error("connecting to mongodb: {0}")]
    Connect(#[source] mongodb::error::Error),
    /// `status` cannot read the deployment from MongoDB.
    #[error("reading status from mongodb: {0}")]
    Status(#[source] mongodb::error::Error),
    /// `status --json` cannot render its report.
    #[error("status report as JSON: {0}")]
    StatusJson(#[from] serde_json::Error),
    /// A read or write of read models, the events collection or `ordo_blocked` failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reconciliation failed (also the catch-up after a rebuild's swap).
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
    /// `--projection` names no projection.
    #[error("--projection: no projection named {name:?} (known: {known})")]
    UnknownProjection {
        /// The name given.
        name: String,
        /// The known names, comma-separated.
        known: String,
    },
    /// `repair --aggregate`: the events collection has no event of the aggregate.
    #[error("--aggregate: {aggregate_id:?} has no events in the events collection")]
    NoEvents {
        /// The aggregate.
        aggregate_id: String,
    },
    /// `repair`: the aggregate's history has a hole or a version twice.
    #[error("aggregate {aggregate_id}: {source}; cannot re-project")]
    Unfoldable {
        /// The aggregate.
        aggregate_id: String,
        /// The hole or the duplicate version.
        #[source]
        source: HistoryError,
    },
    /// `repair`: a projection still cannot apply one of the aggregate's events.
    #[error("aggregate {aggregate_id} still fails; fix the projection or the event, then repair again: {source}")]
    StillFails {
        /// The aggregate.
        aggregate_id: String,
        /// The projection error.
        #[source]
        source: ApplyError,
    },
    /// `repair`: a running projector blocked the aggregate again while it was repaired.
    #[error("aggregate {aggregate_id} was blocked again at v{at} while it was repaired: a running projector still cannot apply it (see ordo_blocked)")]
    BlockedAgain {
        /// The aggregate.
        aggregate_id: String,
        /// Where it is blocked now.
        at: i64,
    },
    /// `repair --all-blocked`: this many aggregates could not be repaired.
    #[error("{0} aggregates are still blocked")]
    StillBlocked(usize),
    /// `rebuild`: the projection's collection is one no rebuild may replace.
    #[error("refusing to rebuild into {collection:?}: it {why}")]
    RebuildTarget {
        /// The collection.
        collection: String,
        /// Why not.
        why: String,
    },
    /// `rebuild` without `--allow-blocked`: some aggregates could not be folded, so nothing
    /// was swapped in.
    #[error(
        "{} aggregates could not be folded, so the live collection {collection} is left as it \
         is (nothing swapped in, nothing blocked). Fix the projection's rules or the events, or \
         run again with --allow-blocked to swap in the rest and block these for \
         `repair --all-blocked`.{}",
        stopped.len(),
        first_stopped(stopped)
    )]
    RebuildStopped {
        /// The live collection.
        collection: String,
        /// (aggregate, first version not folded, reason).
        stopped: Vec<(String, i64, String)>,
    },
    /// `rebuild`: a step on the shadow collection failed.
    #[error("{step}: {source}")]
    Shadow {
        /// The step (creating the shadow, copying indexes, the swap).
        step: String,
        /// The driver's error.
        #[source]
        source: mongodb::error::Error,
    },
    /// `rebuild` failed; its shadow was dropped and the live collection is untouched.
    #[error("rebuild of {projection} failed; shadow {shadow} dropped: {source}")]
    RebuildFailed {
        /// The projection.
        projection: String,
        /// The shadow collection.
        shadow: String,
        /// What failed.
        #[source]
        source: Box<ProjectorError>,
    },
    /// The driver failed outside the store's operations (listing or dropping collections,
    /// writing into a rebuild's shadow).
    #[error("mongodb: {0}")]
    Mongo(#[from] mongodb::error::Error),
}

/// Why a set of projections cannot run together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProjectionConflict {
    /// Two projections have the same name.
    #[error("two projections are named {name:?}; names must be unique")]
    SameName {
        /// The name.
        name: String,
    },
    /// Two projections own the same collection.
    #[error("projection {projection:?}: collection {collection:?} belongs to another projection; a projection must own a collection of its own")]
    SameCollection {
        /// The second projection.
        projection: String,
        /// The collection.
        collection: String,
    },
    /// A projection's collection is one no projection may own.
    #[error("projection {projection:?}: collection {collection:?} {why}; a projection must own a collection of its own")]
    ForbiddenCollection {
        /// The projection.
        projection: String,
        /// The collection.
        collection: String,
        /// Why not.
        why: String,
    },
}

/// The first ten aggregates a rebuild could not fold, one per line.
fn first_stopped(stopped: &[(String, i64, String)]) -> String {
    stopped
        .iter()
        .take(10)
        .map(|(id, v, why)| format!("\n  {id} at v{v}: {why}"))
        .collect()
}
