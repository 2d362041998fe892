//! Sessions through azservicebus: [`AzureSessionSource`] accepts, [`AzureSession`] receives,
//! settles and renews, [`AzureMessage`] is what it hands out.

use std::time::Duration;

use azservicebus::receiver::DeadLetterOptions;
use azservicebus::{
    ServiceBusReceivedMessage, ServiceBusSessionReceiver, ServiceBusSessionReceiverOptions,
};

use crate::envelope::property;
use crate::secret::Secret;
use crate::servicebus::Client;

use super::{Accepted, Delivery, ReceiveError, SessionReceiver, SessionSource};

/// How long a receive waits for more messages once the first has arrived: a batch is what
/// arrives in this window, up to its size. Microsoft's SDKs use the same 20 ms
/// (azure-sdk-for-net#44004, `AmqpReceiver`; azure-sdk-for-python#12217), so a batch starts as
/// soon as a message is there, and messages are not held locked in the client while it waits.
pub const BATCH_WINDOW: Duration = Duration::from_millis(20);

/// Sessions of a subscription through azservicebus. Owns its client: accepting takes the
/// client by `&mut`, so one source per worker lets workers accept concurrently.
#[derive(Debug)]
pub struct AzureSessionSource {
    client: Client,
    topic: String,
    subscription: String,
    identifier: String,
    prefetch: u32,
}

impl AzureSessionSource {
    /// Connects a client for one worker.
    pub async fn connect(
        conn: &Secret,
        topic: &str,
        subscription: &str,
        identifier: &str,
        prefetch: u32,
    ) -> Result<Self, ReceiveError> {
        let client = crate::servicebus::connect(conn, identifier)
            .await
            .map_err(|e| {
                ReceiveError::of_accept::<()>(e)
                    .err()
                    .unwrap_or_else(|| ReceiveError::Broker("connect".into()))
            })?;
        Ok(Self {
            client,
            topic: topic.to_string(),
            subscription: subscription.to_string(),
            identifier: identifier.to_string(),
            prefetch,
        })
    }
}

impl SessionSource for AzureSessionSource {
    type Session = AzureSession;

    async fn accept_next(
        &mut self,
        timeout: Duration,
    ) -> Result<Accepted<AzureSession>, ReceiveError> {
        let options = ServiceBusSessionReceiverOptions {
            prefetch_count: self.prefetch,
            identifier: Some(self.identifier.clone()),
            ..Default::default()
        };
        let accept = self.client.accept_next_session_for_subscription(
            &self.topic,
            &self.subscription,
            options,
        );
        match tokio::time::timeout(timeout, accept).await {
            Err(_) => Ok(Accepted::GaveUp),
            Ok(Ok(receiver)) => Ok(Accepted::Session(AzureSession {
                session_id: receiver.session_id().to_string(),
                receiver,
            })),
            Ok(Err(e)) => ReceiveError::of_accept(e),
        }
    }
}

/// A session held through azservicebus.
#[derive(Debug)]
pub struct AzureSession {
    session_id: String,
    receiver: ServiceBusSessionReceiver,
}

/// A message received through azservicebus.
#[derive(Debug)]
pub struct AzureMessage(ServiceBusReceivedMessage);

impl Delivery for AzureMessage {
    fn body(&self) -> Result<&[u8], String> {
        self.0.body().map_err(|e| e.to_string())
    }

    fn message_id(&self) -> Option<String> {
        self.0.message_id().map(|c| c.into_owned())
    }

    fn envelope_version(&self) -> Option<i64> {
        let v = self.0.application_properties()?.0.get(property::ENVELOPE)?;
        i64::try_from(v.clone())
            .ok()
            .or_else(|| i32::try_from(v.clone()).ok().map(i64::from))
            .or_else(|| u32::try_from(v.clone()).ok().map(i64::from))
    }

    fn delivery_count(&self) -> u32 {
        self.0.delivery_count().unwrap_or(1)
    }

    fn aggregate_id(&self) -> Option<String> {
        let v = self
            .0
            .application_properties()?
            .0
            .get(property::AGGREGATE_ID)?;
        String::try_from(v.clone()).ok()
    }
}

impl SessionReceiver for AzureSession {
    type Message = AzureMessage;

    fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Waits up to `wait` for the first message, then up to [`BATCH_WINDOW`] for the rest of the
    /// batch, as Microsoft's SDKs do. azservicebus alone waits for all `max` messages or the
    /// whole `wait`, so a session holding two messages would sit out `wait` before either was
    /// applied.
    async fn receive(
        &mut self,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<AzureMessage>, ReceiveError> {
        let mut batch = self
            .receiver
            .receive_messages_with_max_wait_time(1, wait)
            .await
            .map_err(ReceiveError::classify)?;
        if batch.is_empty() || max <= 1 {
            return Ok(batch.into_iter().map(AzureMessage).collect());
        }
        match self
            .receiver
            .receive_messages_with_max_wait_time(max - 1, BATCH_WINDOW)
            .await
        {
            Ok(rest) => batch.extend(rest),
            // The first message is in hand: hand it out, and let the next receive meet the
            // error again (a lost lock, a dropped link) where the caller handles it.
            Err(e) => {
                tracing::debug!(session = %self.session_id, error = %e, "receiving the rest of a batch failed")
            }
        }
        Ok(batch.into_iter().map(AzureMessage).collect())
    }

    async fn complete(&mut self, m: &AzureMessage) -> Result<(), ReceiveError> {
        self.receiver
            .complete_message(&m.0)
            .await
            .map_err(ReceiveError::classify)
    }

    async fn abandon(&mut self, m: &AzureMessage) -> Result<(), ReceiveError> {
        self.receiver
            .abandon_message(&m.0, None)
            .await
            .map_err(ReceiveError::classify)
    }

    async fn dead_letter(
        &mut self,
        m: &AzureMessage,
        reason: &str,
        description: &str,
    ) -> Result<(), ReceiveError> {
        // Service Bus limits both to 4096 characters.
        let cut = |s: &str| s.chars().take(4000).collect::<String>();
        self.receiver
            .dead_letter_message(
                &m.0,
                DeadLetterOptions {
                    dead_letter_reason: Some(cut(reason)),
                    dead_letter_error_description: Some(cut(description)),
                    properties_to_modify: None,
                },
            )
            .await
            .map_err(ReceiveError::classify)
    }

    async fn renew_lock(&mut self) -> Result<(), ReceiveError> {
        self.receiver
            .renew_session_lock()
            .await
            .map_err(ReceiveError::classify)
    }

    async fn state(&mut self) -> Result<Vec<u8>, ReceiveError> {
        self.receiver
            .session_state()
            .await
            .map_err(ReceiveError::classify)
    }

    async fn set_state(&mut self, state: Vec<u8>) -> Result<(), ReceiveError> {
        self.receiver
            .set_session_state(state)
            .await
            .map_err(ReceiveError::classify)
    }

    async fn close(self) {
        if let Err(e) = self.receiver.dispose().await {
            tracing::debug!(session = %self.session_id, error = %e, "closing the session receiver failed");
        }
    }
}
