//! Sessions through azservicebus: [`AzureSessionSource`] accepts, [`AzureSession`] receives,
//! settles and renews, [`AzureMessage`] is what it hands out.

use std::sync::Arc;
use std::time::Duration;

use azservicebus::core::BasicRetryPolicy;
use azservicebus::receiver::DeadLetterOptions;
use azservicebus::{
    ServiceBusReceivedMessage, ServiceBusSessionAcceptor, ServiceBusSessionReceiver,
    ServiceBusSessionReceiverOptions,
};

use crate::envelope::property;
use crate::secret::Secret;
use crate::servicebus::{Client, MAX_RECEIVE_WAIT};

use super::{Accepted, Delivery, ReceiveError, SessionReceiver, SessionSource};

/// How long a receive takes more messages after the first: a batch is what arrives in this
/// window, up to its size. Microsoft's SDKs use the same 20 ms (azure-sdk-for-net#44004,
/// `AmqpReceiver`; azure-sdk-for-python#12217), so a batch starts as soon as a message is there,
/// and messages are not held locked in the client while it waits.
pub const BATCH_WINDOW: Duration = Duration::from_millis(20);

/// Within [`BATCH_WINDOW`], how long a receive waits for the next message before the batch is
/// complete. A receive gives the broker credit for the whole batch at once, so what the session
/// holds arrives in one burst, back to back; the batch ends when the burst does, rather than
/// after the whole window, which every batch smaller than `batch_size` used to wait out (most of
/// a session's time when aggregates have a few events each). A message later than this starts
/// the next batch; nothing is lost (the credit left is drained, and what was already on its way
/// is kept for the next receive).
pub const BATCH_GAP: Duration = Duration::from_millis(2);

/// How much longer than the broker's own accept timeout the client waits before it gives up
/// on an accept: the broker answers "no session available" at its timeout, so only a broker
/// that does not answer at all (a hung connection) reaches this.
pub const ACCEPT_GRACE: Duration = Duration::from_secs(2);

/// The Service Bus connections one process's session workers share: at most `connections`
/// AMQP connections whatever the number of workers (a namespace's connections are a quota, and
/// each costs a TLS handshake and a token), worker `i` accepting on connection `i % n`.
///
/// The accepts of the workers on one connection run side by side: each session receiver is
/// attached on an AMQP session no other link uses (the vendored azservicebus's
/// `ServiceBusSessionAcceptor`, as Microsoft's SDKs open a session per link): one a closed
/// receiver or a refused accept left on the connection, or a new one, and only beginning a new
/// one takes the connection. The accept tells the broker its timeout
/// (`com.microsoft:timeout`), so on an idle subscription the broker answers "no session
/// available" and the connection stays usable. An accept the broker left unanswered, or one
/// that failed with a fault, retires its connection: the next accept on it opens a new one, and
/// the old one closes when its last held session is released. An accept cancelled halfway
/// ends only its own AMQP session, which is never used again.
#[derive(Debug)]
pub struct SessionConnections {
    conn: Secret,
    topic: String,
    subscription: String,
    identifier: String,
    prefetch: u32,
    slots: Vec<tokio::sync::Mutex<Option<Arc<Open>>>>,
}

/// One open connection of a [`SessionConnections`]: the client that opened it and the handle
/// that accepts on it.
#[derive(Debug)]
struct Open {
    _client: Client,
    acceptor: ServiceBusSessionAcceptor<BasicRetryPolicy>,
}

impl SessionConnections {
    /// `connections` (at least one) lazily opened connections to `topic`/`subscription`;
    /// `identifier` names them (`{identifier}-c{n}`) and their receivers (`{identifier}-{worker}`)
    /// in the broker's diagnostics.
    pub fn new(
        conn: &Secret,
        topic: &str,
        subscription: &str,
        identifier: &str,
        prefetch: u32,
        connections: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            conn: conn.clone(),
            topic: topic.to_string(),
            subscription: subscription.to_string(),
            identifier: identifier.to_string(),
            prefetch,
            slots: (0..connections.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
        })
    }

    /// The source for worker `worker`; opens its connection if none is open, so a failure to
    /// connect (a wrong key, an unreachable namespace) is reported here.
    pub async fn source(
        self: &Arc<Self>,
        worker: usize,
    ) -> Result<AzureSessionSource, ReceiveError> {
        let slot = worker % self.slots.len();
        self.open(slot).await?;
        Ok(AzureSessionSource {
            connections: self.clone(),
            slot,
            identifier: format!("{}-{worker}", self.identifier),
        })
    }

    /// Connection `slot`, opened if it is not open.
    async fn open(&self, slot: usize) -> Result<Arc<Open>, ReceiveError> {
        let mut held = self.slots[slot].lock().await;
        if let Some(open) = held.as_ref() {
            return Ok(open.clone());
        }
        let identifier = format!("{}-c{slot}", self.identifier);
        let client = crate::servicebus::connect(&self.conn, &identifier)
            .await
            .map_err(|e| {
                ReceiveError::of_accept::<()>(e)
                    .err()
                    .unwrap_or_else(|| ReceiveError::Broker("connect".into()))
            })?;
        let open = Arc::new(Open {
            acceptor: client.session_acceptor(),
            _client: client,
        });
        *held = Some(open.clone());
        Ok(open)
    }

    /// Retires connection `slot` if it is still `open` (another worker's accept may have
    /// retired it and opened a new one already).
    async fn retire(&self, slot: usize, open: &Arc<Open>) {
        let mut held = self.slots[slot].lock().await;
        if held.as_ref().is_some_and(|o| Arc::ptr_eq(o, open)) {
            *held = None;
        }
    }
}

/// One worker's way to accept sessions, on a connection it shares ([`SessionConnections`]).
#[derive(Debug)]
pub struct AzureSessionSource {
    connections: Arc<SessionConnections>,
    slot: usize,
    identifier: String,
}

impl AzureSessionSource {
    /// A source on a connection of its own (tests and tools; the projector shares connections
    /// through [`SessionConnections`]).
    pub async fn connect(
        conn: &Secret,
        topic: &str,
        subscription: &str,
        identifier: &str,
        prefetch: u32,
    ) -> Result<Self, ReceiveError> {
        SessionConnections::new(conn, topic, subscription, identifier, prefetch, 1)
            .source(0)
            .await
    }

    /// How this worker's session receivers are opened: its connection's prefetch, its name in
    /// the broker's diagnostics, and the broker asked to answer an accept within `timeout`.
    fn receiver_options(&self, timeout: Duration) -> ServiceBusSessionReceiverOptions {
        ServiceBusSessionReceiverOptions {
            prefetch_count: self.connections.prefetch,
            identifier: Some(self.identifier.clone()),
            accept_timeout: Some(timeout),
            ..Default::default()
        }
    }

    /// Locks the session `session_id` for this receiver, whether or not it has messages (a
    /// tool's access to one aggregate's session, such as `repair` clearing its state). Refused
    /// at once ([`ReceiveError::Refused`]) while another receiver holds it.
    pub async fn accept_session(
        &mut self,
        session_id: &str,
        timeout: Duration,
    ) -> Result<AzureSession, ReceiveError> {
        let c = &self.connections;
        let open = c.open(self.slot).await?;
        let options = self.receiver_options(timeout);
        let accept = open.acceptor.accept_session_for_subscription(
            &c.topic,
            &c.subscription,
            session_id,
            options,
        );
        match tokio::time::timeout(timeout + ACCEPT_GRACE, accept).await {
            Err(_) => Err(ReceiveError::Broker(format!(
                "accepting session {session_id} was not answered within {timeout:?}"
            ))),
            Ok(Ok(receiver)) => Ok(AzureSession {
                session_id: receiver.session_id().to_string(),
                receiver,
            }),
            Ok(Err(e)) => Err(ReceiveError::of_fault(e)),
        }
    }
}

impl SessionSource for AzureSessionSource {
    type Session = AzureSession;

    /// Accepts on this worker's connection (opening it if it is not open), asking the broker
    /// to answer within `timeout`.
    async fn accept_next(
        &mut self,
        timeout: Duration,
    ) -> Result<Accepted<AzureSession>, ReceiveError> {
        let c = &self.connections;
        let open = c.open(self.slot).await?;
        let options = self.receiver_options(timeout);
        let accept =
            open.acceptor
                .accept_next_session_for_subscription(&c.topic, &c.subscription, options);
        let answer = match tokio::time::timeout(timeout + ACCEPT_GRACE, accept).await {
            Err(_) => {
                c.retire(self.slot, &open).await;
                return Ok(Accepted::GaveUp);
            }
            Ok(Ok(receiver)) => Ok(Accepted::Session(AzureSession {
                session_id: receiver.session_id().to_string(),
                receiver,
            })),
            Ok(Err(e)) => ReceiveError::of_accept(e),
        };
        // A fault (a dropped connection, a refused token) retires the connection too.
        if answer.is_err() {
            c.retire(self.slot, &open).await;
        }
        answer
    }
}

/// A session held through azservicebus.
#[derive(Debug)]
pub struct AzureSession {
    session_id: String,
    receiver: ServiceBusSessionReceiver,
}

impl AzureSession {
    /// Up to `max` messages: waits up to `wait` for the first, then takes the rest while each
    /// arrives within `gap` of the one before, at most `window` after the first. The broker is
    /// given credit for all `max` at once, so what the session holds comes in one round trip.
    /// [`SessionReceiver::receive`] is this with [`BATCH_GAP`] and [`BATCH_WINDOW`]. `window`
    /// and then `wait` are cut so that together they stay within [`MAX_RECEIVE_WAIT`].
    pub async fn receive_burst(
        &mut self,
        max: u32,
        wait: Duration,
        gap: Duration,
        window: Duration,
    ) -> Result<Vec<AzureMessage>, ReceiveError> {
        let window = window.min(MAX_RECEIVE_WAIT);
        let wait = wait.min(MAX_RECEIVE_WAIT - window);
        // Boxed: the client's receive future is large (its retry loop holds every step).
        let batch = Box::pin(self.receiver.receive_batch(max, wait, gap, window))
            .await
            .map_err(ReceiveError::classify)?;
        Ok(batch.into_iter().map(AzureMessage).collect())
    }
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

    /// Waits up to `wait` for the first message, then takes the rest of the batch while they
    /// keep arriving ([`BATCH_GAP`], [`BATCH_WINDOW`]), as Microsoft's SDKs batch. azservicebus
    /// alone waits for all `max` messages or the whole `wait`, so a session holding two
    /// messages would sit out `wait` before either was applied.
    async fn receive(
        &mut self,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<AzureMessage>, ReceiveError> {
        self.receive_burst(max, wait, BATCH_GAP, BATCH_WINDOW).await
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
        // Boxed, as the receive: the first `$management` request attaches its link too.
        Box::pin(self.receiver.renew_session_lock())
            .await
            .map_err(ReceiveError::classify)
    }

    fn lock_left(&self) -> Option<Duration> {
        // `com.microsoft:locked-until-utc` of the attach (azservicebus answers the Unix epoch's
        // minimum when it is missing, and a renewal updates it).
        let left = self.receiver.session_locked_until() - time::OffsetDateTime::now_utc();
        Duration::try_from(left).ok().filter(|d| !d.is_zero())
    }

    async fn state(&mut self) -> Result<Vec<u8>, ReceiveError> {
        Box::pin(self.receiver.session_state())
            .await
            .map_err(ReceiveError::classify)
    }

    async fn set_state(&mut self, state: Vec<u8>) -> Result<(), ReceiveError> {
        Box::pin(self.receiver.set_session_state(state))
            .await
            .map_err(ReceiveError::classify)
    }

    async fn close(self) {
        if let Err(e) = self.receiver.dispose().await {
            tracing::debug!(session = %self.session_id, error = %e, "closing the session receiver failed");
        }
    }
}
