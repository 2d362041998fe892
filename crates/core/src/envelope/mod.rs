//! The message contract between `ordo-producer` and `ordo-projector`.
//!
//! One source event becomes one Service Bus message:
//! - body: the JSON [`Envelope`], payload as relaxed Extended JSON so BSON types survive;
//! - `SessionId = PartitionKey =` [`session_id`]`(aggregateId)`, so one aggregate is one session;
//! - `MessageId =` [`message_id`]`(aggregateId, eventId)`: never the eventId alone, because every
//!   aggregate has an event 1 and duplicate detection would drop all but one of them;
//! - `Subject = eventType`, and the application properties in [`WireMessage::properties`].
//!
//! Service Bus (and azservicebus, which checks `str::len`) refuses session, partition-key and
//! message ids longer than 128 *bytes*, so longer ids (in UTF-8 bytes, not characters: 50 CJK
//! characters are 150 bytes) are replaced by a stable SHA-256 digest; the real aggregate id stays
//! in the body and in the `aggregateId` property. An id that itself starts with the digest's
//! prefix (`sha256:`, in any case) is replaced by its digest too, however short: otherwise an aggregate whose
//! id *is* another one's digest would share its session, and the projector fold one's events
//! into the other's read model. With it, no id kept as it is can equal a digest. The contract is versioned by the
//! `ordo-envelope` property.
//!
//! Layout:
//! - this file: the contract's types, constants and errors;
//! - `event`: a source event document → [`Envelope`] (field checks, the event time);
//! - `decode`: a received body → [`Envelope`], and the event document projections read;
//! - `wire`: [`Envelope`] → [`WireMessage`] (body, subject, typed properties);
//! - `ids`: [`session_id`] and [`message_id`], bounded to 128 bytes.

use serde::{Deserialize, Serialize};

mod decode;
mod event;
mod ids;
#[cfg(test)]
mod tests;
mod wire;

pub use event::{event_id_of, format_time};
pub use ids::{message_id, session_id};
pub use wire::{PropertyValue, WireMessage};

/// Version of the envelope written in the `ordo-envelope` application property.
pub const ENVELOPE_VERSION: i32 = 1;

/// `content_type` of every message body.
pub const CONTENT_TYPE: &str = "application/json";

/// Longest id, in UTF-8 bytes, Service Bus accepts for SessionId, PartitionKey and MessageId.
pub const MAX_ID_LEN: usize = 128;

/// Prefix of an id that was too long and was replaced by its digest.
pub const HASHED_ID_PREFIX: &str = "sha256:";

/// Application property names of the contract.
pub mod property {
    /// Envelope version (int).
    pub const ENVELOPE: &str = "ordo-envelope";
    /// The real aggregate id, even when the session id is hashed (string).
    pub const AGGREGATE_ID: &str = "aggregateId";
    /// Aggregate type, when the event has one (string).
    pub const AGGREGATE_TYPE: &str = "aggregateType";
    /// Event type, also the message subject (string).
    pub const EVENT_TYPE: &str = "eventType";
    /// The aggregate version this event creates (long).
    pub const EVENT_ID: &str = "eventId";
}

/// Where the event came from, so an operator can find the source document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRef {
    /// Database of the events collection.
    pub db: String,
    /// The events collection.
    pub collection: String,
    /// The source document's `_id` as relaxed Extended JSON.
    pub id: serde_json::Value,
}

/// The message body: one event of one aggregate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// The aggregate (stream) the event belongs to; never hashed here.
    pub aggregate_id: String,
    /// The aggregate's type, when the source event carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate_type: Option<String>,
    /// The aggregate version this event produces: 1-based, contiguous per aggregate.
    pub event_id: i64,
    /// The event's type, which selects the projection rule.
    pub event_type: String,
    /// The event payload as relaxed Extended JSON.
    pub payload: serde_json::Value,
    /// When the event happened (RFC 3339, UTC, milliseconds), if the source has a timestamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// The source document.
    pub source: SourceRef,
}

/// Names of the source event's fields; configurable because not every team calls them the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventFields {
    /// Field holding the aggregate id (a non-empty string).
    pub aggregate_id: String,
    /// Field holding the aggregate type (optional string).
    pub aggregate_type: String,
    /// Field holding the aggregate version (integer >= 1).
    pub event_id: String,
    /// Field holding the event type (non-empty string).
    pub event_type: String,
    /// Field holding the payload (document; absent means empty).
    pub payload: String,
    /// Field holding the event time (optional): a date, or an RFC 3339 string; any other
    /// type is treated as absent rather than making the event invalid, because the time is
    /// informational (lag metric, `$timestamp` in rules) and a schema that stores epoch numbers
    /// would otherwise park every event. An empty name disables it.
    pub timestamp: String,
}

impl Default for EventFields {
    fn default() -> Self {
        Self {
            aggregate_id: "aggregateId".into(),
            aggregate_type: "aggregateType".into(),
            event_id: "eventId".into(),
            event_type: "eventType".into(),
            payload: "payload".into(),
            timestamp: "timestamp".into(),
        }
    }
}

/// Why a source event cannot become a message. Each names the field and shows the value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidEvent {
    /// The required field is absent.
    #[error("field `{field}` is missing")]
    Missing {
        /// The configured field name.
        field: String,
    },
    /// The field has a type or value the contract does not allow.
    #[error("field `{field}` has invalid value {value}: {expected}")]
    Invalid {
        /// The configured field name.
        field: String,
        /// The offending value, as relaxed Extended JSON, cut to 200 characters.
        value: String,
        /// What the contract expects.
        expected: &'static str,
    },
}

impl InvalidEvent {
    /// Short machine-readable reason for `ordo_parked` and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            InvalidEvent::Missing { .. } => "missing_field",
            InvalidEvent::Invalid { .. } => "invalid_field",
        }
    }
}

/// Why a message body cannot be decoded into an envelope (a poison message).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The body is not the JSON envelope.
    #[error("body is not an ordo envelope: {0}")]
    Json(#[from] serde_json::Error),
    /// The payload's Extended JSON does not map to BSON.
    #[error("payload is not valid extended json: {0}")]
    Payload(String),
    /// The envelope was written by a newer, unknown contract version.
    #[error("unsupported envelope version {0} (this build reads version {ENVELOPE_VERSION})")]
    Version(i64),
    /// The envelope's content breaks the contract.
    #[error("invalid envelope: {0}")]
    Invalid(#[from] InvalidEvent),
}
