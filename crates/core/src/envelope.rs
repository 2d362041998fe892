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

use mongodb::bson::{self, Bson, Document};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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

fn shown(value: &Bson) -> String {
    let mut s = value.clone().into_relaxed_extjson().to_string();
    if s.len() > 200 {
        let mut cut = 200;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

fn invalid(field: &str, value: &Bson, expected: &'static str) -> InvalidEvent {
    InvalidEvent::Invalid {
        field: field.to_string(),
        value: shown(value),
        expected,
    }
}

/// Reads the aggregate version from a BSON value: Int32 or Int64 >= 1, or a double that is an
/// exact integer (some drivers write numbers as doubles).
pub fn event_id_of(field: &str, value: &Bson) -> Result<i64, InvalidEvent> {
    let v = match value {
        Bson::Int32(v) => i64::from(*v),
        Bson::Int64(v) => *v,
        Bson::Double(d) if d.fract() == 0.0 && d.abs() < 9.0e15 => *d as i64,
        other => return Err(invalid(field, other, "an integer aggregate version >= 1")),
    };
    if v < 1 {
        return Err(invalid(field, value, "an integer aggregate version >= 1"));
    }
    Ok(v)
}

impl Envelope {
    /// Builds the envelope of a source event document.
    pub fn from_event(
        doc: &Document,
        fields: &EventFields,
        db: &str,
        collection: &str,
    ) -> Result<Self, InvalidEvent> {
        let required_string = |field: &str| -> Result<String, InvalidEvent> {
            match doc.get(field) {
                None | Some(Bson::Null) => Err(InvalidEvent::Missing {
                    field: field.to_string(),
                }),
                Some(Bson::String(s)) if !s.is_empty() => Ok(s.clone()),
                Some(other) => Err(invalid(field, other, "a non-empty string")),
            }
        };
        let aggregate_id = required_string(&fields.aggregate_id)?;
        let event_type = required_string(&fields.event_type)?;
        let event_id = match doc.get(&fields.event_id) {
            None | Some(Bson::Null) => {
                return Err(InvalidEvent::Missing {
                    field: fields.event_id.clone(),
                })
            }
            Some(v) => event_id_of(&fields.event_id, v)?,
        };
        let aggregate_type = match doc.get(&fields.aggregate_type) {
            None | Some(Bson::Null) => None,
            Some(Bson::String(s)) => Some(s.clone()),
            Some(other) => return Err(invalid(&fields.aggregate_type, other, "a string")),
        };
        let payload = match doc.get(&fields.payload) {
            None | Some(Bson::Null) => serde_json::Value::Object(Default::default()),
            Some(p @ Bson::Document(_)) => p.clone().into_relaxed_extjson(),
            Some(other) => return Err(invalid(&fields.payload, other, "a document")),
        };
        let timestamp = match doc.get(&fields.timestamp) {
            Some(Bson::DateTime(t)) => Some(format_time(*t)),
            Some(Bson::String(s)) => {
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .ok()
                    .and_then(|t| {
                        i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
                            .ok()
                            .map(|ms| format_time(bson::DateTime::from_millis(ms)))
                    })
            }
            _ => None,
        };
        let id = doc
            .get("_id")
            .cloned()
            .unwrap_or(Bson::Null)
            .into_relaxed_extjson();
        Ok(Envelope {
            aggregate_id,
            aggregate_type,
            event_id,
            event_type,
            payload,
            timestamp,
            source: SourceRef {
                db: db.to_string(),
                collection: collection.to_string(),
                id,
            },
        })
    }

    /// The body bytes.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serializes")
    }

    /// Decodes and checks a message body.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let env: Envelope = serde_json::from_slice(body)?;
        if env.aggregate_id.is_empty() {
            return Err(InvalidEvent::Invalid {
                field: "aggregateId".into(),
                value: "\"\"".into(),
                expected: "a non-empty string",
            }
            .into());
        }
        if env.event_id < 1 {
            return Err(InvalidEvent::Invalid {
                field: "eventId".into(),
                value: env.event_id.to_string(),
                expected: "an integer aggregate version >= 1",
            }
            .into());
        }
        if !env.payload.is_object() {
            return Err(InvalidEvent::Invalid {
                field: "payload".into(),
                value: env.payload.to_string(),
                expected: "an object",
            }
            .into());
        }
        Ok(env)
    }

    /// Checks the `ordo-envelope` property of a received message.
    pub fn check_version(version: Option<i64>) -> Result<(), DecodeError> {
        match version {
            None => Ok(()),
            Some(v) if v == i64::from(ENVELOPE_VERSION) => Ok(()),
            Some(v) => Err(DecodeError::Version(v)),
        }
    }

    /// The payload as a BSON document (Extended JSON mapped back to BSON types).
    pub fn payload_document(&self) -> Result<Document, DecodeError> {
        match Bson::try_from(self.payload.clone()) {
            Ok(Bson::Document(d)) => Ok(d),
            Ok(other) => Err(DecodeError::Payload(format!(
                "expected an object, got {}",
                shown(&other)
            ))),
            Err(e) => Err(DecodeError::Payload(e.to_string())),
        }
    }

    /// The event time, if any.
    pub fn timestamp_millis(&self) -> Option<i64> {
        let t = self.timestamp.as_deref()?;
        let parsed =
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()?;
        Some((parsed.unix_timestamp_nanos() / 1_000_000) as i64)
    }

    /// The event as a BSON document shaped like the source event, for projections that use
    /// `$`-paths (`$payload.email`, `$eventId`, `$timestamp` …).
    pub fn to_event_document(&self) -> Result<Document, DecodeError> {
        let mut doc = Document::new();
        doc.insert("aggregateId", self.aggregate_id.clone());
        if let Some(t) = &self.aggregate_type {
            doc.insert("aggregateType", t.clone());
        }
        doc.insert("eventId", self.event_id);
        doc.insert("eventType", self.event_type.clone());
        doc.insert("payload", self.payload_document()?);
        if let Some(ms) = self.timestamp_millis() {
            doc.insert("timestamp", bson::DateTime::from_millis(ms));
        }
        Ok(doc)
    }

    /// The Service Bus message for this envelope.
    pub fn to_message(&self) -> WireMessage {
        let mut properties = vec![
            (
                property::ENVELOPE.to_string(),
                PropertyValue::Int(ENVELOPE_VERSION),
            ),
            (
                property::AGGREGATE_ID.to_string(),
                PropertyValue::String(self.aggregate_id.clone()),
            ),
        ];
        if let Some(t) = &self.aggregate_type {
            properties.push((
                property::AGGREGATE_TYPE.to_string(),
                PropertyValue::String(t.clone()),
            ));
        }
        properties.push((
            property::EVENT_TYPE.to_string(),
            PropertyValue::String(self.event_type.clone()),
        ));
        properties.push((
            property::EVENT_ID.to_string(),
            PropertyValue::Long(self.event_id),
        ));
        WireMessage {
            session_id: session_id(&self.aggregate_id),
            message_id: message_id(&self.aggregate_id, self.event_id),
            subject: self.event_type.clone(),
            content_type: CONTENT_TYPE,
            body: self.to_body(),
            properties,
        }
    }
}

/// Formats a BSON date as RFC 3339 UTC with milliseconds.
pub fn format_time(t: bson::DateTime) -> String {
    let odt = time::OffsetDateTime::from_unix_timestamp_nanos(
        i128::from(t.timestamp_millis()) * 1_000_000,
    )
    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    odt.format(&fmt).expect("rfc3339 formatting cannot fail")
}

/// A typed application property value (AMQP types matter to subscription filters).
#[derive(Debug, Clone, PartialEq)]
pub enum PropertyValue {
    /// AMQP string.
    String(String),
    /// AMQP int.
    Int(i32),
    /// AMQP long.
    Long(i64),
}

/// Everything the producer sets on a Service Bus message, independent of the client crate.
#[derive(Debug, Clone, PartialEq)]
pub struct WireMessage {
    /// SessionId and PartitionKey (equal, as partitioned session entities require).
    pub session_id: String,
    /// MessageId, the duplicate-detection key.
    pub message_id: String,
    /// Subject (label) = eventType.
    pub subject: String,
    /// Always [`CONTENT_TYPE`].
    pub content_type: &'static str,
    /// The JSON envelope.
    pub body: Vec<u8>,
    /// Application properties, in a stable order.
    pub properties: Vec<(String, PropertyValue)>,
}

impl WireMessage {
    /// Approximate encoded size (body plus ids and properties), a cheap upper-side estimate;
    /// the producer weighs in-flight bytes by it.
    pub fn approx_size(&self) -> usize {
        let props: usize = self
            .properties
            .iter()
            .map(|(k, v)| {
                k.len()
                    + match v {
                        PropertyValue::String(s) => s.len() + 5,
                        PropertyValue::Int(_) => 5,
                        PropertyValue::Long(_) => 9,
                    }
            })
            .sum();
        self.body.len()
            + 2 * self.session_id.len()
            + self.message_id.len()
            + self.subject.len()
            + self.content_type.len()
            + props
            + 64
    }
}

fn digest(text: &str) -> String {
    let hash = Sha256::digest(text.as_bytes());
    format!("{HASHED_ID_PREFIX}{}", hex::encode(hash))
}

fn bounded(id: String) -> String {
    // The prefix without case: Service Bus is reported to compare session ids so.
    let looks_hashed = id
        .get(..HASHED_ID_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(HASHED_ID_PREFIX));
    if id.len() > MAX_ID_LEN || looks_hashed {
        digest(&id)
    } else {
        id
    }
}

/// SessionId (and PartitionKey) of an aggregate: the id itself, or its digest when longer than
/// 128 bytes or when it starts with [`HASHED_ID_PREFIX`].
pub fn session_id(aggregate_id: &str) -> String {
    bounded(aggregate_id.to_string())
}

/// MessageId of an event: `"{aggregateId}:{eventId}"`, or its digest when longer than 128
/// bytes or when it starts with [`HASHED_ID_PREFIX`].
pub fn message_id(aggregate_id: &str, event_id: i64) -> String {
    bounded(format!("{aggregate_id}:{event_id}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{doc, oid::ObjectId};
    use proptest::prelude::*;

    fn sample() -> Document {
        doc! {
            "_id": ObjectId::parse_str("6560f0a1b2c3d4e5f6a7b8c9").unwrap(),
            "aggregateId": "user-42",
            "aggregateType": "User",
            "eventId": 3_i64,
            "eventType": "UserEmailUpdated",
            "payload": { "email": "a@example.com", "age": 41_i32, "score": 1.5, "at": bson::DateTime::from_millis(1_700_000_000_000) },
            "timestamp": bson::DateTime::from_millis(1_700_000_000_123),
        }
    }

    #[test]
    fn body_wire_form_is_stable() {
        let env =
            Envelope::from_event(&sample(), &EventFields::default(), "app", "events").unwrap();
        let body = String::from_utf8(env.to_body()).unwrap();
        assert_eq!(
            body,
            r#"{"aggregateId":"user-42","aggregateType":"User","eventId":3,"eventType":"UserEmailUpdated","payload":{"email":"a@example.com","age":41,"score":1.5,"at":{"$date":"2023-11-14T22:13:20Z"}},"timestamp":"2023-11-14T22:13:20.123Z","source":{"db":"app","collection":"events","id":{"$oid":"6560f0a1b2c3d4e5f6a7b8c9"}}}"#
        );
    }

    #[test]
    fn message_wire_form_is_stable() {
        let env =
            Envelope::from_event(&sample(), &EventFields::default(), "app", "events").unwrap();
        let m = env.to_message();
        assert_eq!(m.session_id, "user-42");
        assert_eq!(m.message_id, "user-42:3");
        assert_eq!(m.subject, "UserEmailUpdated");
        assert_eq!(m.content_type, "application/json");
        assert_eq!(
            m.properties,
            vec![
                ("ordo-envelope".into(), PropertyValue::Int(1)),
                (
                    "aggregateId".into(),
                    PropertyValue::String("user-42".into())
                ),
                ("aggregateType".into(), PropertyValue::String("User".into())),
                (
                    "eventType".into(),
                    PropertyValue::String("UserEmailUpdated".into())
                ),
                ("eventId".into(), PropertyValue::Long(3)),
            ]
        );
    }

    #[test]
    fn bson_types_survive_the_round_trip() {
        let env =
            Envelope::from_event(&sample(), &EventFields::default(), "app", "events").unwrap();
        let back = Envelope::decode(&env.to_body()).unwrap();
        assert_eq!(back, env);
        let payload = back.payload_document().unwrap();
        assert_eq!(payload.get("age"), Some(&Bson::Int32(41)));
        assert_eq!(
            payload.get("at"),
            Some(&Bson::DateTime(bson::DateTime::from_millis(
                1_700_000_000_000
            )))
        );
        assert_eq!(back.timestamp_millis(), Some(1_700_000_000_123));
    }

    #[test]
    fn long_ids_are_hashed_stably_and_kept_in_the_body() {
        let long = "x".repeat(129);
        let sid = session_id(&long);
        assert!(sid.starts_with(HASHED_ID_PREFIX));
        assert!(sid.len() <= MAX_ID_LEN);
        assert_eq!(sid, session_id(&long));
        assert_eq!(session_id(&"y".repeat(128)), "y".repeat(128));
        let mut d = sample();
        d.insert("aggregateId", long.clone());
        let m = Envelope::from_event(&d, &EventFields::default(), "app", "events")
            .unwrap()
            .to_message();
        assert_eq!(m.session_id, sid);
        assert!(m.message_id.starts_with(HASHED_ID_PREFIX));
        assert!(m
            .properties
            .contains(&("aggregateId".into(), PropertyValue::String(long.clone()))));
        assert_eq!(Envelope::decode(&m.body).unwrap().aggregate_id, long);
    }

    /// An aggregate whose id is another aggregate's digest gets a session (and message ids)
    /// of its own: before, it shared the long id's session, and the projector applied one's
    /// events to the other's read model.
    #[test]
    fn an_id_that_looks_like_a_digest_never_shares_a_session() {
        let long = format!("s7-{}", "k".repeat(200));
        let lookalike = session_id(&long);
        assert!(lookalike.starts_with(HASHED_ID_PREFIX) && lookalike.len() <= MAX_ID_LEN);
        assert_ne!(session_id(&lookalike), lookalike);
        assert_ne!(session_id(&lookalike), session_id(&long));
        assert_ne!(message_id(&lookalike, 1), message_id(&long, 1));
        assert!(session_id(&lookalike).starts_with(HASHED_ID_PREFIX));
        // A short id with the prefix is hashed too; one without it is kept.
        assert_ne!(session_id("sha256:x"), "sha256:x");
        assert_ne!(session_id("SHA256:x"), "SHA256:x");
        assert_eq!(session_id("sha256x"), "sha256x");
    }

    proptest! {
        /// Distinct aggregate ids never share a session id: kept ids never start with the
        /// digest prefix, and digests of distinct ids differ.
        #[test]
        fn distinct_ids_have_distinct_sessions(a in ".{0,80}", b in ".{0,80}", long in any::<bool>()) {
            let widen = |s: &str| if long { format!("{s}{}", "w".repeat(130)) } else { s.to_string() };
            let (a, b) = (widen(&a), widen(&b));
            prop_assume!(a != b);
            prop_assert_ne!(session_id(&a), session_id(&b));
            // An id equal to the other's session id (a digest) is no exception.
            let sb = session_id(&b);
            if sb != b {
                prop_assert_ne!(session_id(&sb), sb);
            }
        }
    }

    #[test]
    fn ids_are_measured_in_bytes_not_characters() {
        // 106 CJK characters: 318 bytes, under 128 characters but over 128 bytes.
        let wide = "账".repeat(106);
        assert!(wide.chars().count() < MAX_ID_LEN && wide.len() > MAX_ID_LEN);
        let sid = session_id(&wide);
        assert!(
            sid.starts_with(HASHED_ID_PREFIX) && sid.len() <= MAX_ID_LEN,
            "{sid}"
        );
        // 42 three-byte characters are 126 bytes: kept; plus ":1" it is 128: kept; ":10" is 129.
        let edge = "账".repeat(42);
        assert_eq!(session_id(&edge), edge);
        assert_eq!(message_id(&edge, 1), format!("{edge}:1"));
        assert!(message_id(&edge, 10).starts_with(HASHED_ID_PREFIX));
    }

    #[test]
    fn a_timestamp_of_another_type_is_treated_as_absent() {
        let mut d = sample();
        d.insert("timestamp", 1_700_000_000_i64);
        let env = Envelope::from_event(&d, &EventFields::default(), "app", "events").unwrap();
        assert_eq!(env.timestamp, None);
        d.insert("timestamp", "2023-11-14T22:13:20.123+00:00");
        let env = Envelope::from_event(&d, &EventFields::default(), "app", "events").unwrap();
        assert_eq!(env.timestamp_millis(), Some(1_700_000_000_123));
        d.insert("timestamp", "yesterday");
        let env = Envelope::from_event(&d, &EventFields::default(), "app", "events").unwrap();
        assert_eq!(env.timestamp, None);
    }

    #[test]
    fn invalid_events_name_the_field_and_value() {
        let mut d = sample();
        d.remove("aggregateId");
        let e = Envelope::from_event(&d, &EventFields::default(), "app", "events").unwrap_err();
        assert_eq!(e.to_string(), "field `aggregateId` is missing");

        let mut d = sample();
        d.insert("eventId", "three");
        let e = Envelope::from_event(&d, &EventFields::default(), "app", "events").unwrap_err();
        assert_eq!(
            e.to_string(),
            "field `eventId` has invalid value \"three\": an integer aggregate version >= 1"
        );

        let mut d = sample();
        d.insert("eventId", 0_i32);
        assert!(Envelope::from_event(&d, &EventFields::default(), "app", "events").is_err());

        let mut d = sample();
        d.insert("eventId", 2.5);
        assert!(Envelope::from_event(&d, &EventFields::default(), "app", "events").is_err());
        d.insert("eventId", 2.0);
        assert_eq!(
            Envelope::from_event(&d, &EventFields::default(), "app", "events")
                .unwrap()
                .event_id,
            2
        );
    }

    #[test]
    fn custom_field_names_are_honoured() {
        let fields = EventFields {
            aggregate_id: "streamId".into(),
            event_id: "version".into(),
            event_type: "type".into(),
            payload: "data".into(),
            ..EventFields::default()
        };
        let d = doc! { "_id": 1, "streamId": "s", "version": 1, "type": "T", "data": { "a": 1 } };
        let env = Envelope::from_event(&d, &fields, "db", "c").unwrap();
        assert_eq!((env.aggregate_id.as_str(), env.event_id), ("s", 1));
    }

    #[test]
    fn decode_rejects_garbage_and_newer_versions() {
        assert!(matches!(
            Envelope::decode(b"not json"),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            Envelope::check_version(Some(2)),
            Err(DecodeError::Version(2))
        ));
        Envelope::check_version(Some(1)).unwrap();
    }

    proptest! {
        #[test]
        fn message_id_is_unique_per_event_and_stable(
            a in "[a-zA-Z0-9:_-]{1,140}", b in "[a-zA-Z0-9:_-]{1,140}",
            x in 1i64..1_000_000, y in 1i64..1_000_000,
        ) {
            let ma = message_id(&a, x);
            prop_assert_eq!(&ma, &message_id(&a, x));
            prop_assert!(ma.len() <= MAX_ID_LEN);
            prop_assert!(session_id(&a).len() <= MAX_ID_LEN);
            prop_assert_ne!(&ma, &message_id(&a, x + 1));
            prop_assert_ne!(&ma, &message_id(&format!("{a}:{x}"), y));
            if (a.as_str(), x) != (b.as_str(), y) {
                // The eventId is last and has no colon, so the text splits back into the pair
                // at its last colon: distinct events never share a MessageId.
                prop_assert_ne!(ma, message_id(&b, y));
            }
        }
    }
}
