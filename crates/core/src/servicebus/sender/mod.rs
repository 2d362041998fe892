//! The producer side of Service Bus: publishing [`crate::envelope::WireMessage`]s.
//!
//! The producer's logic sees only [`Publisher`] (send one session's messages, all or nothing) and
//! [`PublisherFactory`] (open a fresh publisher after a fault), so it can be tested against a
//! fake and azservicebus can be swapped for the official crate without touching it.
//!
//! azservicebus facts that shape this module:
//! - every sender method takes `&mut self`, so one sender sends one batch at a time; the
//!   producer runs several publishers for concurrency across sessions;
//! - a message with both a SessionId and a PartitionKey must have them equal (partitioned
//!   session entities); `set_session_id` overwrites the partition key, so it is set first and the
//!   partition key then set to the same value;
//! - a batch of two or more messages travels as one transfer; the broker accepts or refuses it as
//!   a whole, which is what lets the producer acknowledge a batch's events together;
//! - after a broker fault the connection may be dead with no notice; a failed publisher is
//!   dropped (client and sender) and a fresh one opened, rather than trusting the client to
//!   reconnect by itself.
//!
//! Layout: this file holds the traits, the message mapping and its size checks; `publisher` the
//! azservicebus [`ServiceBusPublisher`] and its factory; `modal` the [`SendMode`] wrapper that
//! falls back to single sends.

use std::future::Future;
use std::time::Duration;

use azservicebus::ServiceBusMessage;

use crate::envelope::{PropertyValue, WireMessage};

mod modal;
mod publisher;

pub use modal::{refuses_batching, ModalPublisher, ModalPublisherFactory, SendMode};
pub use publisher::{SenderConnections, ServiceBusPublisher, ServiceBusPublisherFactory};

/// Why a publish failed. Every variant is retryable from the producer's point of view: the
/// events stay unacknowledged and the checkpoint does not move.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Connecting to the namespace or opening the sender link failed.
    #[error("cannot open a sender: {0}")]
    Connect(String),
    /// The broker refused the send, or the connection broke during it.
    #[error("send failed: {0}")]
    Send(String),
    /// The broker did not answer within the send timeout.
    #[error("send timed out after {0:?}")]
    Timeout(Duration),
    /// A message could not be encoded or breaks a client-side rule (id length, partition key).
    /// The producer validates messages before sending, so this means a bug or a changed rule.
    #[error("message {message_id} rejected by the client: {reason}")]
    Message {
        /// MessageId of the offending message.
        message_id: String,
        /// What the client said.
        reason: String,
    },
}

impl PublishError {
    /// A short label for `ordo_retries_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::Connect(_) => "connect",
            PublishError::Send(_) => "send",
            PublishError::Timeout(_) => "timeout",
            PublishError::Message { .. } => "rejected",
        }
    }
}

/// Sends messages to one topic.
pub trait Publisher: Send {
    /// Sends `messages`, which all belong to one session, in order. On `Ok` the broker has
    /// acknowledged every one of them; on `Err` any of them may or may not have arrived (a retry
    /// is deduplicated by MessageId).
    fn publish(
        &mut self,
        messages: &[WireMessage],
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
}

/// Opens publishers; called again after a publisher failed.
pub trait PublisherFactory: Send + Sync + 'static {
    /// The publisher type.
    type Publisher: Publisher + 'static;
    /// Opens a fresh publisher (new connection).
    fn open(&self) -> impl Future<Output = Result<Self::Publisher, PublishError>> + Send;

    /// Checks that a publisher can be opened (the broker answers, accepts the credentials and
    /// has the topic), and lets it go.
    fn probe(&self) -> impl Future<Output = Result<(), PublishError>> + Send {
        async move { self.open().await.map(drop) }
    }
}

/// Builds the azservicebus message for a [`WireMessage`].
pub(crate) fn to_service_bus_message(m: &WireMessage) -> Result<ServiceBusMessage, PublishError> {
    let reject = |reason: String| PublishError::Message {
        message_id: m.message_id.clone(),
        reason,
    };
    let mut msg = ServiceBusMessage::new(m.body.clone());
    msg.set_session_id(m.session_id.clone())
        .map_err(|e| reject(e.to_string()))?;
    msg.set_partition_key(m.session_id.clone())
        .map_err(|e| reject(e.to_string()))?;
    msg.set_message_id(m.message_id.clone())
        .map_err(|e| reject(e.to_string()))?;
    msg.set_subject(m.subject.clone());
    msg.set_content_type(m.content_type.to_string());
    let props = msg
        .application_properties_mut()
        .get_or_insert_with(Default::default);
    for (name, value) in &m.properties {
        let v = match value {
            PropertyValue::String(s) => s.clone().into(),
            PropertyValue::Int(i) => (*i).into(),
            PropertyValue::Long(l) => (*l).into(),
        };
        props.0.insert(name.clone(), v);
    }
    Ok(msg)
}

/// Bytes a broker may add to a stored message beyond what the client measures: enqueued time,
/// sequence number, partition id, lock token and delivery annotations are under 200 bytes
/// together; the margin is five times that so a message that passes [`fits`] is never refused
/// for its size by the client or by the broker.
pub const SIZE_MARGIN_BYTES: u64 = 1024;

/// The size azservicebus 0.25 checks against the link's maximum message size when `m` is the
/// first message of a batch (`AmqpMessageBatch::try_add_message`): the AMQP encoding of a batch
/// envelope holding the encoded message as one `Data` section, with the message's properties
/// and annotations copied onto the envelope. Every later message of a batch adds less than
/// this (no second envelope), so a message that fits alone is never refused for its size; a
/// batch that would overflow is split by [`ServiceBusPublisher`].
pub fn encoded_size(m: &WireMessage) -> Result<u64, PublishError> {
    use fe2o3_amqp_types::messaging::{message::__private::Serializable, Batch, Data, Message};
    let msg = to_service_bus_message(m)?;
    let raw = msg.raw_amqp_message();
    let reject = |e: serde_amqp::Error| PublishError::Message {
        message_id: m.message_id.clone(),
        reason: format!("cannot be encoded: {e}"),
    };
    let inner = serde_amqp::to_vec(&Serializable(raw)).map_err(reject)?;
    let envelope = Message::builder()
        .body(Batch::from(vec![Data::from(inner)]))
        .properties(raw.properties.clone())
        .message_annotations(raw.message_annotations.clone())
        .build();
    serde_amqp::serialized_size(&Serializable(&envelope))
        .map(|n| n as u64)
        .map_err(reject)
}

/// Checks that `m` fits a topic whose largest message is `max_bytes`, [`SIZE_MARGIN_BYTES`]
/// included; the error says how large it is. Messages far below the limit are not encoded: the
/// envelope holds the message once plus a copy of its properties, so it is below twice
/// [`WireMessage::approx_size`] plus the margin.
pub fn fits(m: &WireMessage, max_bytes: u64) -> Result<(), String> {
    if 2 * m.approx_size() as u64 + SIZE_MARGIN_BYTES <= max_bytes {
        return Ok(());
    }
    match encoded_size(m) {
        Ok(n) if n + SIZE_MARGIN_BYTES <= max_bytes => Ok(()),
        Ok(n) => Err(format!(
            "encoded message is {n} bytes (body {} bytes); producer.max_message_bytes = {max_bytes}, which \
             leaves {} bytes after a {SIZE_MARGIN_BYTES}-byte margin for broker annotations",
            m.body.len(),
            max_bytes.saturating_sub(SIZE_MARGIN_BYTES)
        )),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Envelope, EventFields};
    use mongodb::bson::doc;

    #[test]
    fn message_carries_the_contract() {
        let ev = doc! {"_id": 1, "aggregateId": "a-1", "eventId": 3, "eventType": "Opened", "payload": {"x": 1}};
        let wire = Envelope::from_event(&ev, &EventFields::default(), "db", "events")
            .unwrap()
            .to_message();
        let msg = to_service_bus_message(&wire).unwrap();
        assert_eq!(msg.session_id(), Some("a-1"));
        assert_eq!(msg.partition_key(), Some("a-1"));
        assert_eq!(msg.message_id().as_deref(), Some("a-1:3"));
        assert_eq!(msg.body(), wire.body.as_slice());
        let props = msg.application_properties().unwrap();
        assert_eq!(props.0.len(), wire.properties.len());
        assert!(props.0.get("eventId").is_some());
    }

    fn wire(body_bytes: usize) -> WireMessage {
        let ev = doc! {"_id": 1, "aggregateId": "a-1", "eventId": 3, "eventType": "Opened", "payload": {"x": "y".repeat(body_bytes)}};
        Envelope::from_event(&ev, &EventFields::default(), "db", "events")
            .unwrap()
            .to_message()
    }

    /// The measure covers more than the body (ids, properties, the batch envelope), stays
    /// below the cheap bound [`fits`] relies on, and grows with the body.
    #[test]
    fn encoded_size_covers_the_envelope_and_stays_under_the_cheap_bound() {
        for body in [0, 200, 10_000, 300_000] {
            let m = wire(body);
            let n = encoded_size(&m).unwrap();
            assert!(
                n > m.body.len() as u64 + 200,
                "{n} vs body {}",
                m.body.len()
            );
            assert!(n < 2 * m.approx_size() as u64 + SIZE_MARGIN_BYTES, "{n}");
        }
        assert!(encoded_size(&wire(1001)).unwrap() > encoded_size(&wire(1000)).unwrap());
    }

    #[test]
    fn the_partitioned_dedup_refusal_is_recognised_and_nothing_else() {
        let refusal = "Batching brokered messages with distinct SessionId, PartitionKey, or MessageId is not supported for an entity with partitioning and duplicate detection enabled. TrackingId:1, SystemTracker:ns:Topic:t, Timestamp:2026-11-30T00:00:00 (NotAllowed)";
        assert!(refuses_batching(refusal));
        assert!(!refuses_batching("The operation timed out"));
        assert!(!refuses_batching("NotAllowed: the entity is disabled"));
    }

    #[test]
    fn a_body_just_under_the_limit_does_not_fit() {
        let max = 262_144_u64;
        let m = wire(262_144 - 400);
        assert!((m.body.len() as u64) < max);
        let e = fits(&m, max).unwrap_err();
        assert!(
            e.contains("encoded message is") && e.contains("262144"),
            "{e}"
        );
        fits(&wire(100_000), max).unwrap();
    }
}
