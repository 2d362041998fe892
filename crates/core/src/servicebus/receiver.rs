//! The projector side of Service Bus: sessions, behind ordo's own traits.
//!
//! The worker logic sees only [`SessionSource`] (accept the next session, with a timeout) and
//! [`SessionReceiver`] (receive, settle, renew, session state), so it is tested against a fake
//! and azservicebus can be replaced by the official crate without touching it.
//!
//! azservicebus facts that shape this module:
//! - `accept_next_session_*` has no timeout and takes the client by `&mut`: each source owns a
//!   client of its own, and [`SessionSource::accept_next`] wraps the accept in a timeout. An
//!   accept cancelled halfway through its attach can leave the client's AMQP session unusable,
//!   so a timed-out accept is reported as [`Accepted::GaveUp`] and the caller drops the source;
//! - the broker says "no session available" by refusing the link with the condition
//!   `com.microsoft:timeout`; every other refusal (`amqp:not-found` for a missing entity,
//!   `amqp:not-allowed` for one without sessions, `amqp:unauthorized-access`), a failed CBS
//!   token or a failed connection is a fault, told apart by the error's type and condition;
//! - every receiver method takes `&mut self`: lock renewal cannot run in the background, the
//!   worker interleaves it with its own steps;
//! - a failed settle or renewal usually means the session lock is gone; [`ReceiveError`] says
//!   which, so the worker never completes anything after a lock loss.

use std::future::Future;
use std::time::Duration;

use azservicebus::receiver::DeadLetterOptions;
use azservicebus::{
    ServiceBusReceivedMessage, ServiceBusSessionReceiver, ServiceBusSessionReceiverOptions,
};

use crate::envelope::property;
use crate::secret::Secret;

use super::Client;

/// The AMQP condition Service Bus refuses a next-available-session accept with when no
/// session became available within its server timeout.
pub const CONDITION_TIMEOUT: &str = "com.microsoft:timeout";

/// Why a receiver operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The session lock (or a message lock) was lost: another worker may own the session now,
    /// so nothing received under it may be settled any more.
    #[error("session lock lost: {0}")]
    LockLost(String),
    /// The broker refused the link with an AMQP condition (missing entity, no sessions,
    /// access refused, ...).
    #[error("service bus refused the link ({condition}): {description}")]
    Refused {
        /// The AMQP error condition, e.g. `amqp:not-found`.
        condition: String,
        /// The broker's description.
        description: String,
    },
    /// The claims-based authorization of the link failed (a wrong or revoked key).
    #[error("service bus authorization failed: {0}")]
    Unauthorized(String),
    /// The connection or the broker failed; the session is unusable but nothing is known lost.
    #[error("service bus: {0}")]
    Broker(String),
}

impl ReceiveError {
    /// Whether this is a lock loss (counted in `ordo_locks_lost_total`).
    pub fn is_lock_lost(&self) -> bool {
        matches!(self, ReceiveError::LockLost(_))
    }

    /// A short, bounded label for the `reason` of `ordo_retries_total`.
    pub fn reason(&self) -> String {
        match self {
            ReceiveError::LockLost(_) => "lock_lost".into(),
            ReceiveError::Refused { condition, .. } => condition.clone(),
            ReceiveError::Unauthorized(_) => "unauthorized".into(),
            ReceiveError::Broker(_) => "broker".into(),
        }
    }

    /// Classifies a failed connect or accept by the error's type and AMQP condition: what the
    /// accept gave when the broker answered, or the fault.
    fn of_accept<S>(e: azure_core::Error) -> Result<Accepted<S>, Self> {
        use fe2o3_amqp_client::link::ReceiverAttachError;
        match e.downcast_ref::<ReceiverAttachError>() {
            Some(ReceiverAttachError::RemoteClosedWithError(err)) => {
                let condition = condition_text(&err.condition);
                if condition == CONDITION_TIMEOUT {
                    return Ok(Accepted::Idle);
                }
                return Err(ReceiveError::Refused {
                    condition,
                    description: err.description.clone().unwrap_or_default(),
                });
            }
            Some(ReceiverAttachError::IncomingSourceIsNone) => return Ok(Accepted::Unclear),
            _ => {}
        }
        // The only request-response calls of a connect or accept are CBS put-token calls: a
        // status error there is the broker refusing the credentials.
        if let Some(fe2o3_amqp_management::error::Error::Status(status)) =
            e.downcast_ref::<fe2o3_amqp_management::error::Error>()
        {
            return Err(ReceiveError::Unauthorized(status.to_string()));
        }
        Err(ReceiveError::Broker(e.to_string()))
    }

    /// A failed connect or attach outside an accept: every answer but success is a fault.
    fn of_fault(e: azure_core::Error) -> Self {
        match Self::of_accept::<()>(e) {
            Err(e) => e,
            Ok(_) => ReceiveError::Broker("the broker refused the link without a reason".into()),
        }
    }

    fn classify(e: azure_core::Error) -> Self {
        let text = format!("{e} {e:?}");
        let lower = text.to_ascii_lowercase();
        if lower.contains("lock") || lower.contains("410") || lower.contains("gone") {
            ReceiveError::LockLost(e.to_string())
        } else {
            ReceiveError::Broker(e.to_string())
        }
    }
}

/// A received message, as the worker sees it.
pub trait Delivery: Send + Sync {
    /// The body bytes, or why there are none (a non-`Data` body is poison).
    fn body(&self) -> Result<&[u8], String>;
    /// MessageId.
    fn message_id(&self) -> Option<String>;
    /// The `ordo-envelope` application property, if present and an integer.
    fn envelope_version(&self) -> Option<i64>;
    /// Deliveries so far, this one included.
    fn delivery_count(&self) -> u32;
    /// The `aggregateId` application property: the real aggregate id even when the session
    /// id is its digest and the body cannot be read.
    fn aggregate_id(&self) -> Option<String>;
}

/// The condition symbol as the broker sent it (`amqp:not-found`, `com.microsoft:timeout`).
fn condition_text(c: &fe2o3_amqp_types::definitions::ErrorCondition) -> String {
    use fe2o3_amqp_types::definitions::ErrorCondition;
    use fe2o3_amqp_types::primitives::Symbol;
    let symbol = match c {
        ErrorCondition::AmqpError(e) => Symbol::from(e),
        ErrorCondition::ConnectionError(e) => Symbol::from(e),
        ErrorCondition::SessionError(e) => Symbol::from(e),
        ErrorCondition::LinkError(e) => Symbol::from(e),
        ErrorCondition::Custom(s) => s.clone(),
        // Transaction conditions, when the client crate is built with transactions.
        #[allow(unreachable_patterns)]
        other => return format!("{other:?}"),
    };
    symbol.as_str().to_string()
}

/// What an accept gave.
#[derive(Debug)]
pub enum Accepted<S> {
    /// A session, locked for this worker.
    Session(S),
    /// The broker answered that no session is available.
    Idle,
    /// The accept was cancelled by its timeout before the broker answered: the client may be
    /// halfway through an attach, so the source must be dropped, not used again.
    GaveUp,
    /// The broker refused the link, but its reason was lost: the client detaches a link
    /// attached without a source at once, and when that detach crosses the broker's own
    /// (which carries the condition), the client keeps only "source field is none". It may
    /// be "no session available" or a fault; the next accept tells.
    Unclear,
}

/// The sessions of one subscription.
pub trait SessionSource: Send {
    /// A held session.
    type Session: SessionReceiver;

    /// Accepts the next available session, waiting at most `timeout`.
    fn accept_next(
        &mut self,
        timeout: Duration,
    ) -> impl Future<Output = Result<Accepted<Self::Session>, ReceiveError>> + Send;
}

/// One held session (one aggregate).
pub trait SessionReceiver: Send {
    /// Messages this receiver hands out.
    type Message: Delivery;

    /// The session id (the aggregate id, or its digest when longer than 128 characters).
    fn session_id(&self) -> &str;

    /// Up to `max` messages, waiting at most `wait` for the first.
    fn receive(
        &mut self,
        max: u32,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<Self::Message>, ReceiveError>> + Send;

    /// Removes the message (only after its effect is durable).
    fn complete(
        &mut self,
        m: &Self::Message,
    ) -> impl Future<Output = Result<(), ReceiveError>> + Send;

    /// Releases the message for redelivery.
    fn abandon(
        &mut self,
        m: &Self::Message,
    ) -> impl Future<Output = Result<(), ReceiveError>> + Send;

    /// Moves the message to the dead-letter queue with a reason and a description.
    fn dead_letter(
        &mut self,
        m: &Self::Message,
        reason: &str,
        description: &str,
    ) -> impl Future<Output = Result<(), ReceiveError>> + Send;

    /// Extends the session lock.
    fn renew_lock(&mut self) -> impl Future<Output = Result<(), ReceiveError>> + Send;

    /// The session state (empty when none).
    fn state(&mut self) -> impl Future<Output = Result<Vec<u8>, ReceiveError>> + Send;

    /// Replaces the session state.
    fn set_state(
        &mut self,
        state: Vec<u8>,
    ) -> impl Future<Output = Result<(), ReceiveError>> + Send;

    /// Releases the session (unsettled messages return to the broker).
    fn close(self) -> impl Future<Output = ()> + Send;
}

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
        let client = super::connect(conn, identifier).await.map_err(|e| {
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
        let (client, receiver) = super::dead_letter_receiver(conn, topic, subscription, identifier)
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

    async fn receive(
        &mut self,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<AzureMessage>, ReceiveError> {
        self.receiver
            .receive_messages_with_max_wait_time(max, wait)
            .await
            .map(|v| v.into_iter().map(AzureMessage).collect())
            .map_err(ReceiveError::classify)
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

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::error::ErrorKind;
    use fe2o3_amqp_client::link::ReceiverAttachError;
    use fe2o3_amqp_types::definitions::{AmqpError, Error as AmqpErr, ErrorCondition};
    use fe2o3_amqp_types::primitives::Symbol;

    /// What azservicebus hands back when the broker refuses a session receiver's attach.
    fn refused(condition: ErrorCondition) -> azure_core::Error {
        let e = ReceiverAttachError::RemoteClosedWithError(AmqpErr::new(
            condition,
            Some("refused".to_string()),
            None,
        ));
        azure_core::Error::new(ErrorKind::Io, e)
    }

    fn classify(e: azure_core::Error) -> Result<Accepted<()>, ReceiveError> {
        ReceiveError::of_accept(e)
    }

    #[test]
    fn no_session_available_is_told_by_its_condition_not_its_text() {
        let idle = refused(ErrorCondition::Custom(Symbol::from(CONDITION_TIMEOUT)));
        assert!(matches!(classify(idle), Ok(Accepted::Idle)));
        // A connection that timed out says "timed out" but is a fault.
        let io = azure_core::Error::new(
            ErrorKind::Io,
            std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        );
        assert!(matches!(classify(io), Err(ReceiveError::Broker(_))));
    }

    #[test]
    fn refusals_carry_their_condition() {
        let missing = refused(ErrorCondition::AmqpError(AmqpError::NotFound));
        assert!(matches!(
            classify(missing),
            Err(ReceiveError::Refused { condition, .. }) if condition == "amqp:not-found"
        ));
        let sessionless = refused(ErrorCondition::AmqpError(AmqpError::NotAllowed));
        assert!(matches!(
            classify(sessionless).unwrap_err().reason().as_str(),
            "amqp:not-allowed"
        ));
        let unclear =
            azure_core::Error::new(ErrorKind::Io, ReceiverAttachError::IncomingSourceIsNone);
        assert!(matches!(classify(unclear), Ok(Accepted::Unclear)));
    }

    #[test]
    fn a_refused_token_is_unauthorized() {
        let status = fe2o3_amqp_management::error::Error::Status(
            fe2o3_amqp_management::error::StatusError {
                code: fe2o3_amqp_management::status::StatusCode(
                    std::num::NonZeroU16::new(401).unwrap(),
                ),
                description: Some("InvalidSignature".into()),
            },
        );
        let e = azure_core::Error::new(ErrorKind::Other, status);
        assert!(matches!(classify(e), Err(ReceiveError::Unauthorized(_))));
    }
}
