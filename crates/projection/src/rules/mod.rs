//! Declarative projections, read from TOML and checked at start.
//!
//! ```toml
//! [[projections]]
//! name = "users"
//! collection = "users"
//! aggregate_types = ["User"]
//!
//! [[projections.on.UserRegistered]]
//! set = { email = "$payload.email", status = "active", registeredAt = "$timestamp" }
//!
//! [[projections.on.UserDeactivated]]
//! set = { status = "inactive" }
//! unset = ["email"]
//! ```
//!
//! `on.<EventType>` is a list of operation tables; a table may hold several operators, applied
//! in the order `set`, `unset`, `inc`, `push`, `pull`, `delete`. An event type with no rule
//! only advances `lastEventId`. A projection selects events by `aggregate_types` when given,
//! otherwise by the event types it has rules for. Every mistake (unknown operator, bad path,
//! wrong value type) fails at start naming the projection, the event type and the key; only
//! what depends on an event's content (a missing `$payload` field, a non-number for `inc`) is
//! left to apply time, where it is a poison event.
//!
//! Layout: this file holds the TOML types, the compiled [`DeclarativeProjection`] and its
//! [`Projection`] implementation; `compile` checks and compiles the TOML; `apply` runs one
//! compiled operation on a document.

use std::collections::{BTreeMap, BTreeSet};

use mongodb::bson::Document;
use serde::{Deserialize, Serialize};

use super::error::ApplyError;
use super::fold::{event_version, Projection};
use super::value::{FieldPath, ValueExpr};

mod apply;
mod compile;

/// The whole `projections.toml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectionsFile {
    /// Every projection this deployment maintains.
    #[serde(default)]
    pub projections: Vec<ProjectionDef>,
}

/// One projection as written in TOML.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectionDef {
    /// Unique name (`rebuild --projection NAME`, `ordo_blocked.projection`).
    pub name: String,
    /// The read-model collection; one projection owns it.
    pub collection: String,
    /// Aggregate types whose events this projection reads; empty: select by `on` event types.
    #[serde(default)]
    pub aggregate_types: Vec<String>,
    /// Event type → operations.
    #[serde(default)]
    pub on: BTreeMap<String, Vec<toml::Table>>,
}

/// The operators a rule may use, in the order they are applied within one table.
pub const OPERATORS: &[&str] = &["set", "unset", "inc", "push", "pull", "delete"];

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Set(Vec<(FieldPath, ValueExpr)>),
    Unset(Vec<FieldPath>),
    Inc(Vec<(FieldPath, ValueExpr)>),
    Push(Vec<(FieldPath, ValueExpr)>),
    Pull(Vec<(FieldPath, ValueExpr)>),
    Delete,
}

/// A compiled declarative projection.
#[derive(Debug, Clone)]
pub struct DeclarativeProjection {
    name: String,
    collection: String,
    aggregate_types: BTreeSet<String>,
    rules: BTreeMap<String, Vec<Op>>,
}

impl Projection for DeclarativeProjection {
    fn name(&self) -> &str {
        &self.name
    }

    fn collection(&self) -> &str {
        &self.collection
    }

    fn selects(&self, aggregate_type: Option<&str>, event_type: &str) -> bool {
        if self.aggregate_types.is_empty() {
            self.rules.contains_key(event_type)
        } else {
            aggregate_type.is_some_and(|t| self.aggregate_types.contains(t))
        }
    }

    fn apply(&self, doc: &mut Option<Document>, event: &Document) -> Result<(), ApplyError> {
        let event_type = event.get_str("eventType").unwrap_or_default();
        let Some(ops) = self.rules.get(event_type) else {
            return Ok(());
        };
        // Work on a copy: a rule that fails halfway must leave the model as it was.
        let mut next = doc.clone();
        for op in ops {
            self.apply_op(op, &mut next, event)
                .map_err(|message| ApplyError {
                    projection: self.name.clone(),
                    event_type: event_type.to_string(),
                    event_id: event_version(event),
                    message,
                })?;
        }
        *doc = next;
        Ok(())
    }
}
