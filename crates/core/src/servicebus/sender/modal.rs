//! [`SendMode`]: batches, single sends, or batches until the topic refuses them (a partitioned
//! topic with duplicate detection), shared by every publisher of one factory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::envelope::WireMessage;

use super::{
    PublishError, Publisher, PublisherFactory, ServiceBusPublisher, ServiceBusPublisherFactory,
};

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
