//! Projections: how an aggregate's events become one read-model document.
//!
//! The public surface is what a projection written in Rust needs, and what the projector
//! folds with:
//! - [`Projection`], the trait both kinds implement
//!   (`bins/projector/examples/custom_projection.rs` registers one written as code next to
//!   the TOML ones), and [`ReadModel`], the in-memory document a worker folds a whole batch
//!   into before one guarded write;
//! - [`fold_events`] (the version rule over a batch, stopping at a [`Gap`]) and
//!   [`fold_history`] / [`HistoryFold`] (a complete history, for `repair` and `rebuild`, or
//!   the [`HistoryError`] that keeps it from folding);
//! - [`version_of`], the one reading of a stored version, and [`event_version`] of an event;
//!   [`VERSION_FIELD`] and [`UPDATED_AT_FIELD`], where a read model stores its version and
//!   its last write; [`selects`], whether a projection reads an event;
//! - [`DeclarativeProjection`], [`ProjectionsFile`] and [`ProjectionDef`]: the declarative
//!   projections from TOML (`set`, `unset`, `inc`, `push`, `pull`, `delete`, values as
//!   literals or `$`-paths into the event), checked at start;
//! - [`RuleError`] (configuration, fails at start) and [`ApplyError`] (an event a rule cannot
//!   apply: poison).
//!
//! Modules: `fold` (the trait, the version rule, the model, the folds), `rules` (the TOML
//! projections), `value` (`$`-paths into the event and dotted field paths into the document),
//! `error`.

mod error;
mod fold;
mod rules;
mod value;

pub use error::{ApplyError, RuleError};
pub use fold::{
    event_version, fold_events, fold_history, selects, version_of, Gap, HistoryError, HistoryFold,
    Projection, ReadModel, UPDATED_AT_FIELD, VERSION_FIELD,
};
pub use rules::{DeclarativeProjection, ProjectionDef, ProjectionsFile};

#[cfg(test)]
mod tests;
