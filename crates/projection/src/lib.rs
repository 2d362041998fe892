//! Projections: how an aggregate's events become one read-model document.
//!
//! - [`rules`]: declarative projections from TOML (`set`, `unset`, `inc`, `push`, `pull`,
//!   `delete`, values as literals or `$`-paths into the event), checked at start.
//! - [`value`]: `$`-paths into the event and dotted field paths into the document.
//! - [`fold`]: the [`Projection`] trait both kinds implement, the version rule, the one reading
//!   of a stored version ([`stored_version`]), the in-memory [`ReadModel`] a worker folds a
//!   whole batch into before one guarded write, and the fold of a complete history
//!   ([`fold_history`], [`HistoryFold`]) that `repair` and `rebuild` share.
//! - [`error`]: configuration errors (fail at start) and apply errors (poison).

pub mod error;
pub mod fold;
pub mod rules;
pub mod value;

pub use error::{ApplyError, RuleError};
pub use fold::{
    classify, event_version, fold_events, fold_history, selects, stored_version, version_of, Gap,
    HistoryError, HistoryFold, Projection, ReadModel, Step, DELETED_FIELD,
};
pub use rules::{DeclarativeProjection, ProjectionDef, ProjectionsFile};

#[cfg(test)]
mod tests;
