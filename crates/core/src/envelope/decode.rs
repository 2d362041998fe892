//! Reading a received message body back into an [`Envelope`], and the event document
//! projections read (`$payload.…`, `$eventId`, `$timestamp`).

use mongodb::bson::{self, Bson, Document};

use super::event::shown;
use super::{DecodeError, Envelope, InvalidEvent, ENVELOPE_VERSION};

impl Envelope {
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
}
