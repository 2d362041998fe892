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
//!   dropped (client and sender) and a fresh one opened, rather than trusting the client to heal.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use azservicebus::{CreateMessageBatchOptions, ServiceBusMessage, ServiceBusSender};

use crate::envelope::{PropertyValue, WireMessage};
use crate::secret::Secret;

use super::Client;

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
pub fn to_service_bus_message(m: &WireMessage) -> Result<ServiceBusMessage, PublishError> {
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

/// The broker's refusal of a transfer as larger than the entity takes
/// (`amqp:link:message-size-exceeded`; on Service Bus, for example, a Standard namespace's
/// 256 KB under a `producer.max_message_bytes` set for Premium). azservicebus keeps the outcome
/// in a private type, so its debug form is read; the condition, not the description.
fn refused_as_too_large(e: &azure_core::Error) -> bool {
    format!("{e:?}").contains("MessageSizeExceeded")
}

/// The [`PublishError`] of a failed send of `sent`: a size refusal of a single message names
/// it, so it is parked and its session goes on; anything else is retried.
fn send_error(e: azure_core::Error, sent: &[WireMessage]) -> PublishError {
    match sent {
        [m] if refused_as_too_large(&e) => PublishError::Message {
            message_id: m.message_id.clone(),
            reason: format!(
                "the broker refused it as too large (amqp:link:message-size-exceeded): {e}"
            ),
        },
        _ => PublishError::Send(e.to_string()),
    }
}

/// A publisher over one azservicebus connection and one sender link.
#[derive(Debug)]
pub struct ServiceBusPublisher {
    // Kept alive for the sender: the connection belongs to the client.
    _client: Client,
    sender: ServiceBusSender,
    max_batch_bytes: Option<u64>,
    send_timeout: Duration,
}

impl Publisher for ServiceBusPublisher {
    async fn publish(&mut self, messages: &[WireMessage]) -> Result<(), PublishError> {
        let timeout = self.send_timeout;
        tokio::time::timeout(timeout, self.publish_inner(messages))
            .await
            .map_err(|_| PublishError::Timeout(timeout))?
    }
}

impl ServiceBusPublisher {
    /// Sends `messages` one per transfer, in order: for entities that refuse batches of
    /// messages with distinct ids.
    async fn publish_single(&mut self, messages: &[WireMessage]) -> Result<(), PublishError> {
        // Each message as a batch of one, which the client sends as a plain transfer: it is
        // measured against the link's max-message-size as batches are, so one the broker would
        // detach the link over is parked instead of retried forever. The timeout is per
        // message: a claim of 100 single sends over a slow link must not time out as a whole
        // and be resent whole, forever.
        for m in messages {
            self.publish(std::slice::from_ref(m)).await?;
        }
        Ok(())
    }

    async fn publish_inner(&mut self, messages: &[WireMessage]) -> Result<(), PublishError> {
        let new_batch = |sender: &ServiceBusSender| {
            sender
                .create_message_batch(CreateMessageBatchOptions {
                    max_size_in_bytes: self.max_batch_bytes,
                })
                .map_err(|e| PublishError::Send(e.to_string()))
        };
        let mut batch = new_batch(&self.sender)?;
        // Messages `first..` are in the batch being filled.
        let mut first = 0;
        for (i, m) in messages.iter().enumerate() {
            let msg = to_service_bus_message(m)?;
            match batch.try_add_message(msg) {
                Ok(()) => {}
                Err(azservicebus::amqp::error::TryAddMessageError::BatchFull(msg)) => {
                    if batch.is_empty() {
                        return Err(PublishError::Message {
                            message_id: m.message_id.clone(),
                            reason: format!(
                                "larger than the topic's max-message-size of {} bytes, as the \
                                 client measures it (amqp:link:message-size-exceeded)",
                                batch.max_size_in_bytes()
                            ),
                        });
                    }
                    let full = std::mem::replace(&mut batch, new_batch(&self.sender)?);
                    let sent = &messages[first..i];
                    first = i;
                    self.sender
                        .send_message_batch(full)
                        .await
                        .map_err(|e| send_error(e, sent))?;
                    if let Err(e) = batch.try_add_message(msg) {
                        return Err(PublishError::Message {
                            message_id: m.message_id.clone(),
                            reason: e.to_string(),
                        });
                    }
                }
                Err(e) => {
                    return Err(PublishError::Message {
                        message_id: m.message_id.clone(),
                        reason: e.to_string(),
                    })
                }
            }
        }
        if !batch.is_empty() {
            self.sender
                .send_message_batch(batch)
                .await
                .map_err(|e| send_error(e, &messages[first..]))?;
        }
        Ok(())
    }
}

/// How messages of one session travel to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendMode {
    /// Batches; after the broker refuses one as batching distinct ids on a partitioned entity
    /// with duplicate detection, single sends from then on.
    #[default]
    Auto,
    /// Batches of up to `max_batch_messages` messages of one session.
    Batch,
    /// One message per transfer (still one session's messages in order, one at a time).
    Single,
}

/// True for the broker's refusal of a batch on a partitioned entity with duplicate detection
/// (ErrorCodes.NotAllowed): "Batching brokered messages with distinct SessionId, PartitionKey,
/// or MessageId is not supported for an entity with partitioning and duplicate detection
/// enabled".
pub fn refuses_batching(error: &str) -> bool {
    error.contains("Batching brokered messages with distinct")
}

/// A [`ServiceBusPublisherFactory`] with a [`SendMode`]; its publishers share the fallback of
/// `auto`, so one refusal switches every publisher to single sends.
#[derive(Debug, Clone)]
pub struct ModalPublisherFactory {
    /// Opens the connections.
    pub inner: ServiceBusPublisherFactory,
    /// The configured mode.
    pub mode: SendMode,
    /// Set once the topic refused a batch (`auto` then sends single messages).
    pub single: Arc<AtomicBool>,
}

/// A publisher that sends as its factory's [`SendMode`] says.
#[derive(Debug)]
pub struct ModalPublisher {
    inner: ServiceBusPublisher,
    mode: SendMode,
    single: Arc<AtomicBool>,
}

impl Publisher for ModalPublisher {
    async fn publish(&mut self, messages: &[WireMessage]) -> Result<(), PublishError> {
        let single = match self.mode {
            SendMode::Single => true,
            SendMode::Batch => false,
            SendMode::Auto => self.single.load(Ordering::SeqCst),
        };
        if single {
            return self.inner.publish_single(messages).await;
        }
        if messages.len() == 1 {
            return self.inner.publish(messages).await;
        }
        match self.inner.publish(messages).await {
            Err(PublishError::Send(e)) if self.mode == SendMode::Auto && refuses_batching(&e) => {
                if !self.single.swap(true, Ordering::SeqCst) {
                    metrics::gauge!(crate::metrics::PUBLISH_SINGLE_SENDS).set(1.0);
                    tracing::warn!(error = %e, "the topic refuses batches (partitioning with duplicate detection): sending one message at a time from now on (producer.send_mode = \"auto\"). For batches, publish to a topic without duplicate detection; to skip this first refusal, set send_mode = \"single\" (docs/prerequisites.md, Send mode)");
                }
                self.inner.publish_single(messages).await
            }
            Err(PublishError::Send(e)) if refuses_batching(&e) => {
                // `batch` does not fall back: every batch is refused and retried as a fault.
                if !self.single.swap(true, Ordering::SeqCst) {
                    tracing::error!(error = %e, "the topic refuses batches (partitioning with duplicate detection) and producer.send_mode = \"batch\": nothing can be published; set send_mode = \"auto\" or \"single\"");
                }
                Err(PublishError::Send(e))
            }
            other => other,
        }
    }
}

impl ModalPublisherFactory {
    /// A factory sending as `mode` says, through `inner`; sets `ordo_publish_single_sends`.
    pub fn new(inner: ServiceBusPublisherFactory, mode: SendMode) -> Self {
        let single = mode == SendMode::Single;
        metrics::gauge!(crate::metrics::PUBLISH_SINGLE_SENDS).set(if single { 1.0 } else { 0.0 });
        Self {
            inner,
            mode,
            single: Arc::default(),
        }
    }
}

impl PublisherFactory for ModalPublisherFactory {
    type Publisher = ModalPublisher;

    async fn probe(&self) -> Result<(), PublishError> {
        self.inner.probe().await
    }

    async fn open(&self) -> Result<ModalPublisher, PublishError> {
        Ok(ModalPublisher {
            inner: self.inner.open().await?,
            mode: self.mode,
            single: self.single.clone(),
        })
    }
}

/// Opens [`ServiceBusPublisher`]s, each on its own connection, so a broken connection takes
/// down one publisher only and sends on different publishers do not queue behind each other.
#[derive(Debug, Clone)]
pub struct ServiceBusPublisherFactory {
    /// Connection string of the namespace.
    pub connection_string: Secret,
    /// Topic to publish to.
    pub topic: String,
    /// Name of the client in the broker's diagnostics.
    pub identifier: String,
    /// Largest batch in bytes; `None` lets the link's negotiated maximum decide.
    pub max_batch_bytes: Option<u64>,
    /// Bound on one publish (connect excluded); a broker that stops answering is a fault.
    pub send_timeout: Duration,
    /// Bound on opening a connection and a sender link.
    pub connect_timeout: Duration,
}

impl PublisherFactory for ServiceBusPublisherFactory {
    type Publisher = ServiceBusPublisher;

    /// Opens a publisher and closes its link and connection at once, so probing every few
    /// seconds leaves no connection behind on the broker.
    async fn probe(&self) -> Result<(), PublishError> {
        let publisher = self.open().await?;
        let _ = publisher.sender.dispose().await;
        let _ = publisher._client.dispose().await;
        Ok(())
    }

    async fn open(&self) -> Result<ServiceBusPublisher, PublishError> {
        let open = async {
            let mut client = super::connect(&self.connection_string, &self.identifier)
                .await
                .map_err(|e| PublishError::Connect(e.to_string()))?;
            let sender = client
                .create_sender(&self.topic, Default::default())
                .await
                .map_err(|e| PublishError::Connect(e.to_string()))?;
            Ok(ServiceBusPublisher {
                _client: client,
                sender,
                max_batch_bytes: self.max_batch_bytes,
                send_timeout: self.send_timeout,
            })
        };
        tokio::time::timeout(self.connect_timeout, open)
            .await
            .map_err(|_| {
                PublishError::Connect(format!("timed out after {:?}", self.connect_timeout))
            })?
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
