//! Inspection snapshots for tests and operators (also served as JSON over HTTP).
//!
//! Plain data: the store fills in the counters ([`EntityStats`], [`SessionStats`]) and `wire`
//! reads a dead-lettered message into a [`DeadLetteredMessage`], so this module depends on
//! neither and `store` never reaches `wire` through it.

use serde::Serialize;

/// A point-in-time view of the whole namespace.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NamespaceStats {
    /// One entry per queue and per subscription, sorted by path.
    pub entities: Vec<EntityStats>,
    /// Open AMQP connections.
    pub connections: usize,
}

impl NamespaceStats {
    /// Looks up an entity by path (`topic/Subscriptions/sub` or `queue`), case-insensitively.
    pub fn entity(&self, path: &str) -> Option<&EntityStats> {
        self.entities
            .iter()
            .find(|e| e.path.eq_ignore_ascii_case(path))
    }
}

/// Counters of one queue or subscription.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EntityStats {
    /// `topic/Subscriptions/sub` or `queue`.
    pub path: String,
    /// Messages waiting or in flight (Service Bus "active" count includes locked ones).
    pub active: usize,
    /// Active messages currently locked by a receiver.
    pub locked: usize,
    /// Deferred messages.
    pub deferred: usize,
    /// Messages in the dead-letter queue.
    pub dead_lettered: usize,
    /// Accept-next-session receivers waiting at the entity for a session to become available.
    pub waiting_accepts: usize,
    /// Sessions that have messages, state or a lock holder, sorted by id.
    pub sessions: Vec<SessionStats>,
}

/// One session of a session-enabled entity.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SessionStats {
    /// Session id.
    pub id: String,
    /// Active messages of the session (waiting or locked).
    pub active: usize,
    /// Messages of the session currently locked.
    pub locked: usize,
    /// Whether session state is set.
    pub has_state: bool,
    /// Who holds the session lock: `container-id/link-name`.
    pub holder: Option<String>,
    /// When the session lock expires, Unix milliseconds.
    pub locked_until_ms: Option<i64>,
}

/// A message of a dead-letter queue, as seen by [`crate::EmulatorHandle::dead_letters`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeadLetteredMessage {
    /// Sequence number assigned at enqueue.
    pub sequence_number: i64,
    /// `properties.message-id` as text.
    pub message_id: Option<String>,
    /// `properties.group-id`.
    pub session_id: Option<String>,
    /// `DeadLetterReason` application property.
    pub reason: Option<String>,
    /// `DeadLetterErrorDescription` application property.
    pub description: Option<String>,
    /// Deliveries before it was dead-lettered.
    pub delivery_count: u32,
    /// Concatenated `Data` sections of the body (empty for other body kinds). In JSON: the text
    /// when it is UTF-8, else `"base64:…"`.
    #[serde(serialize_with = "body_as_text")]
    pub body: Vec<u8>,
}

fn body_as_text<S: serde::Serializer>(body: &[u8], s: S) -> Result<S::Ok, S::Error> {
    use base64::Engine as _;
    match std::str::from_utf8(body) {
        Ok(text) => s.serialize_str(text),
        Err(_) => s.serialize_str(&format!(
            "base64:{}",
            base64::engine::general_purpose::STANDARD.encode(body)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_lettered_body_is_text_when_it_is_utf8_and_base64_otherwise() {
        let message = |body: &[u8]| DeadLetteredMessage {
            sequence_number: 1,
            message_id: None,
            session_id: None,
            reason: None,
            description: None,
            delivery_count: 0,
            body: body.to_vec(),
        };
        let json = |m| serde_json::to_value(m).unwrap()["body"].clone();
        assert_eq!(json(message(b"{\"a\":1}")), "{\"a\":1}");
        assert_eq!(json(message(&[0xff, 0x00])), "base64:/wA=");
    }
}
