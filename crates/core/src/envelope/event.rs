//! Reading a source event document into an [`Envelope`]: the configured fields, checked, and
//! the event time, kept only when it is a date or an RFC 3339 string.

use mongodb::bson::{self, Bson, Document};

use super::{Envelope, EventFields, InvalidEvent, SourceRef};

/// The value as relaxed Extended JSON, cut to 200 bytes on a character boundary.
pub(super) fn shown(value: &Bson) -> String {
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
