//! [`ServiceBusPublisher`]: one azservicebus connection and sender link, batching one
//! session's messages and splitting a batch the link's size limit would refuse.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use azservicebus::{CreateMessageBatchOptions, ServiceBusSender};

use crate::envelope::WireMessage;
use crate::secret::Secret;
use crate::servicebus::Client;

use super::{to_service_bus_message, PublishError, Publisher, PublisherFactory};

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

/// A publisher: one sender link, on a connection of its own or a shared one.
#[derive(Debug)]
pub struct ServiceBusPublisher {
    // A connection of its own, closed with the publisher (`None` on a shared connection; the
    // sender keeps that one open while it lives).
    client: Option<Client>,
    // The shared connection it is on, retired when a send on it gets no answer.
    shared: Option<(SenderConnections, usize, u64)>,
    sender: ServiceBusSender,
    max_batch_bytes: Option<u64>,
    send_timeout: Duration,
}

impl Publisher for ServiceBusPublisher {
    async fn publish(&mut self, messages: &[WireMessage]) -> Result<(), PublishError> {
        let timeout = self.send_timeout;
        let result = tokio::time::timeout(timeout, self.publish_inner(messages))
            .await
            .map_err(|_| PublishError::Timeout(timeout))
            .and_then(|r| r);
        if let (Err(PublishError::Timeout(_)), Some((connections, slot, generation))) =
            (&result, &self.shared)
        {
            // No answer: the connection may be what failed. Publishers opened from now on get a
            // new one, and those still on it keep it until they fail or close. (A refusal is
            // an answer; a connection that died with an error fails the next sender link
            // opened on it, which retires it then.)
            connections.retire(*slot, *generation).await;
        }
        result
    }
}

/// Connections the publishers of a process share: each new publisher opens its sender link on
/// the next of them, round robin, connecting it first if it is not open. A send left without an
/// answer, or a sender link that cannot be opened, retires the connection, so the next
/// publisher on that slot connects afresh. The default
/// has no slot: every publisher opens a connection of its own.
#[derive(Debug, Clone, Default)]
pub struct SenderConnections(Arc<SenderSlots>);

#[derive(Debug, Default)]
struct SenderSlots {
    next: AtomicUsize,
    slots: Vec<tokio::sync::Mutex<Option<(Client, u64)>>>,
    generations: AtomicU64,
}

impl SenderConnections {
    /// `n` shared connections (at least one).
    pub fn shared(n: usize) -> Self {
        Self(Arc::new(SenderSlots {
            slots: (0..n.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            ..SenderSlots::default()
        }))
    }

    async fn retire(&self, slot: usize, generation: u64) {
        let mut held = self.0.slots[slot].lock().await;
        if held.as_ref().is_some_and(|(_, g)| *g == generation) {
            *held = None;
        }
    }
}

impl ServiceBusPublisher {
    /// Sends `messages` one per transfer, in order: for entities that refuse batches of
    /// messages with distinct ids.
    pub(super) async fn publish_single(
        &mut self,
        messages: &[WireMessage],
    ) -> Result<(), PublishError> {
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

/// Opens [`ServiceBusPublisher`]s on shared connections ([`SenderConnections::shared`]), or
/// each on its own ([`SenderConnections::default`]).
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
    /// The connections publishers share; the default gives each its own.
    pub connections: SenderConnections,
}

impl PublisherFactory for ServiceBusPublisherFactory {
    type Publisher = ServiceBusPublisher;

    /// Opens a publisher and closes its link and connection at once, so probing every few
    /// seconds leaves no connection behind on the broker.
    async fn probe(&self) -> Result<(), PublishError> {
        // The open runs to its own bound (`connect_timeout`) even when the caller gives the
        // probe less (the producer's `probe_interval`, 5 s, is shorter than its 10 s send
        // timeout): an open that times out retires its connection, and one cut short midway
        // would leave a connection that no longer answers in its slot, for every later probe
        // and publisher to wait on.
        let this = self.clone();
        let publisher = tokio::spawn(async move { this.open().await })
            .await
            .map_err(|e| PublishError::Connect(format!("opening a sender failed: {e}")))??;
        let _ = publisher.sender.dispose().await;
        if let Some(client) = publisher.client {
            let _ = client.dispose().await;
        }
        Ok(())
    }

    async fn open(&self) -> Result<ServiceBusPublisher, PublishError> {
        let shared = &self.connections.0;
        if shared.slots.is_empty() {
            return self.open_own().await;
        }
        let slot = shared.next.fetch_add(1, Ordering::Relaxed) % shared.slots.len();
        let mut held = shared.slots[slot].lock().await;
        let open = async {
            loop {
                let fresh = held.is_none();
                if fresh {
                    let client = self.connect(slot).await?;
                    *held = Some((client, shared.generations.fetch_add(1, Ordering::Relaxed)));
                }
                let Some((client, generation)) = held.as_mut() else {
                    return Err(PublishError::Connect("no connection".into()));
                };
                match client.create_sender(&self.topic, Default::default()).await {
                    Ok(sender) => return Ok((sender, *generation)),
                    // A connection opened earlier may have ended meanwhile (its AMQP session
                    // gone): once more on a new one.
                    Err(_) if !fresh => *held = None,
                    Err(e) => return Err(PublishError::Connect(e.to_string())),
                }
            }
        };
        match tokio::time::timeout(self.connect_timeout, open).await {
            Ok(Ok((sender, generation))) => Ok(ServiceBusPublisher {
                client: None,
                shared: Some((self.connections.clone(), slot, generation)),
                sender,
                max_batch_bytes: self.max_batch_bytes,
                send_timeout: self.send_timeout,
            }),
            failed => {
                // A connection that cannot open a sender link is not used again.
                *held = None;
                Err(match failed {
                    Ok(Err(e)) => e,
                    _ => self.timed_out(),
                })
            }
        }
    }
}

impl ServiceBusPublisherFactory {
    /// A publisher on a connection of its own.
    async fn open_own(&self) -> Result<ServiceBusPublisher, PublishError> {
        let open = async {
            let mut client = self.connect(0).await?;
            let sender = client
                .create_sender(&self.topic, Default::default())
                .await
                .map_err(|e| PublishError::Connect(e.to_string()))?;
            Ok(ServiceBusPublisher {
                client: Some(client),
                shared: None,
                sender,
                max_batch_bytes: self.max_batch_bytes,
                send_timeout: self.send_timeout,
            })
        };
        tokio::time::timeout(self.connect_timeout, open)
            .await
            .map_err(|_| self.timed_out())?
    }

    async fn connect(&self, slot: usize) -> Result<Client, PublishError> {
        let identifier = format!("{}-c{slot}", self.identifier);
        crate::servicebus::connect(&self.connection_string, &identifier)
            .await
            .map_err(|e| PublishError::Connect(e.to_string()))
    }

    fn timed_out(&self) -> PublishError {
        PublishError::Connect(format!("timed out after {:?}", self.connect_timeout))
    }
}
