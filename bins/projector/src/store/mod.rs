//! MongoDB as the projector sees it, one file per behaviour:
//! - this file: the [`Store`] handle and how its errors are classified;
//! - `models`: read models, loaded from the primary and written under a version guard;
//! - `events`: an aggregate's events for gap filling (waiting for the missing ones to
//!   appear), repair and rebuild (primary, majority,
//!   duplicate versions refused);
//! - `blocked`: `ordo_blocked`, the aggregates waiting for repair;
//! - `latest`: what reconciliation reads over the whole events collection.

use mongodb::bson::Document;
use mongodb::{Collection, Database};

use ordo_core::envelope::EventFields;
use ordo_core::mongo::{is_transient, server_code};

mod blocked;
mod events;
mod latest;
mod models;

pub use blocked::{BlockRecord, REBUILD_STOPPED};
pub use latest::{AggregateLatest, LatestCursor};
pub use models::Written;

/// A database failure, classified once for the retry loop and the dead-letter decision.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The driver or the server failed.
    #[error("mongodb: {0}")]
    Mongo(#[from] mongodb::error::Error),
    /// A source event in the events collection breaks the contract.
    #[error("source event {source_id} of {aggregate_id} is invalid: {reason}")]
    BadEvent {
        /// The aggregate.
        aggregate_id: String,
        /// The source document's `_id`, as relaxed Extended JSON.
        source_id: String,
        /// What is wrong.
        reason: String,
    },
    /// Two source documents hold the same (aggregateId, eventId): which one is the event is
    /// not ordo's to guess.
    #[error("events {first} and {second} of {aggregate_id} both have eventId {version}")]
    DuplicateVersion {
        /// The aggregate.
        aggregate_id: String,
        /// The version both claim.
        version: i64,
        /// `_id` of the first document, as relaxed Extended JSON.
        first: String,
        /// `_id` of the second.
        second: String,
    },
}

/// Server codes that refuse a write for what the document holds: the same write fails the
/// same way however often it is retried. DocumentValidationFailure, BSONObjectTooLarge,
/// document-too-large variants, and field names the server does not store.
const REFUSAL_CODES: &[i32] = &[121, 10334, 17419, 17420, 52, 56, 57];

impl StoreError {
    /// The `reason` label of `ordo_retries_total`: the driver's class of error
    /// ([`ordo_core::mongo::error_reason`]), or what is wrong with a source event.
    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::Mongo(e) => ordo_core::mongo::error_reason(e),
            StoreError::BadEvent { .. } => "invalid_source_event",
            StoreError::DuplicateVersion { .. } => "duplicate_version",
        }
    }

    /// Whether a read-model write was refused for its content (a validator, the 16 MB limit):
    /// a fault of the events folded into it, not of the database. The driver checks an
    /// insert's size itself and answers `InvalidArgument`; the server answers a replace.
    pub fn is_refusal(&self) -> bool {
        match self {
            StoreError::Mongo(e) => {
                matches!(
                    e.kind.as_ref(),
                    mongodb::error::ErrorKind::InvalidArgument { .. }
                ) || (!is_transient(e)
                    && server_code(e).is_some_and(|c| REFUSAL_CODES.contains(&c)))
            }
            _ => false,
        }
    }
}

fn id_text(d: &Document) -> String {
    d.get("_id")
        .map(|id| id.clone().into_relaxed_extjson().to_string())
        .unwrap_or_else(|| "(no _id)".into())
}

/// The projector's view of the database.
#[derive(Debug, Clone)]
pub struct Store {
    db: Database,
    events: Collection<Document>,
    blocked: Collection<Document>,
    fields: EventFields,
    events_collection: String,
}

impl Store {
    /// A store over `db`.
    pub fn new(db: Database, events_collection: &str, blocked: &str, fields: EventFields) -> Self {
        Self {
            events: db.collection(events_collection),
            blocked: db.collection(blocked),
            db,
            fields,
            events_collection: events_collection.to_string(),
        }
    }

    /// The database.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// The name of the events collection.
    pub fn events_collection_name(&self) -> &str {
        &self.events_collection
    }

    /// The source event field names.
    pub fn fields(&self) -> &EventFields {
        &self.fields
    }
}
