//! The subscription probe that keeps readiness honest while no session arrives.

use crate::secret::Secret;
use crate::servicebus::Client;

use super::ReceiveError;

/// A standing check that Service Bus answers for a subscription, apart from the session
/// workers: an accept can outlast an outage unseen (an idle broker holds it for a minute, and
/// azservicebus 0.25 does not notice a connection that drops during the accept's own
/// handshake: measured against the emulator, such an accept waits out its whole timeout), so
/// readiness cannot rest on the accepts alone.
///
/// It keeps one connection with a receiver on the subscription's dead-letter queue (never
/// session-enabled, so the attach is answered at once) and peeks one message per check: a
/// round trip that proves the connection, the credentials and the subscription. A failed
/// check leaves the probe unusable; the caller drops it and opens a new one.
#[derive(Debug)]
pub struct SubscriptionProbe {
    client: Client,
    receiver: azservicebus::ServiceBusReceiver,
}

impl SubscriptionProbe {
    /// Connects, authenticates and attaches to the subscription's dead-letter queue.
    pub async fn open(
        conn: &Secret,
        topic: &str,
        subscription: &str,
        identifier: &str,
    ) -> Result<Self, ReceiveError> {
        let (client, receiver) =
            crate::servicebus::dead_letter_receiver(conn, topic, subscription, identifier)
                .await
                .map_err(ReceiveError::of_fault)?;
        Ok(Self { client, receiver })
    }

    /// One round trip to the broker (a peek of at most one dead-lettered message).
    pub async fn check(&mut self) -> Result<(), ReceiveError> {
        self.receiver
            .peek_messages(1, None)
            .await
            .map(drop)
            .map_err(|e| ReceiveError::Broker(e.to_string()))
    }

    /// Detaches and closes the connection.
    pub async fn close(self) {
        let _ = self.receiver.dispose().await;
        let _ = self.client.dispose().await;
    }
}
