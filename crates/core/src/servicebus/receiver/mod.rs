//! The projector side of Service Bus: sessions, behind ordo's own traits.
//!
//! The worker logic sees only [`SessionSource`] (accept the next session, with a timeout) and
//! [`SessionReceiver`] (receive, settle, renew, session state), so it is tested against a fake
//! and azservicebus can be replaced by the official crate without touching it.
//!
//! azservicebus facts that shape this module:
//! - the workers of a process share a few connections ([`SessionConnections`]) and accept on
//!   them side by side: the vendored azservicebus's `ServiceBusSessionAcceptor` accepts
//!   through `&self`, each receiver on an AMQP session no other link uses (one a closed
//!   receiver left, or a new one; the client's own
//!   `accept_next_session_*` takes it by `&mut`, one accept at a time per connection). The
//!   accept tells the broker how long it may wait (`com.microsoft:timeout`, also added by the
//!   vendored azservicebus) and is wrapped in a slightly longer timeout of the client's own; an
//!   accept the broker left unanswered is reported as [`Accepted::GaveUp`] and retires its
//!   connection;
//! - the broker says "no session available" by refusing the link with the condition
//!   `com.microsoft:timeout`; every other refusal (`amqp:not-found` for a missing entity,
//!   `amqp:not-allowed` for one without sessions, `amqp:unauthorized-access`), a failed CBS
//!   token or a failed connection is a fault, told apart by the error's type and condition;
//! - every receiver method takes `&mut self`: lock renewal cannot run in the background, the
//!   worker interleaves it with its own steps;
//! - a failed settle or renewal usually means the session lock is gone; [`ReceiveError`] says
//!   which, so the worker never completes anything after a lock loss.
//!
//! Layout: this file holds the traits; `error` the [`ReceiveError`] classification of the
//! client's errors; `session` the azservicebus implementation; `probe` the standing
//! [`SubscriptionProbe`].

use std::future::Future;
use std::time::Duration;

mod error;
mod probe;
mod session;

pub use error::{ReceiveError, CONDITION_TIMEOUT};
pub use probe::SubscriptionProbe;
pub use session::{
    AzureMessage, AzureSession, AzureSessionSource, SessionConnections, ACCEPT_GRACE, BATCH_GAP,
    BATCH_WINDOW,
};

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

/// What an accept gave.
#[derive(Debug)]
pub enum Accepted<S> {
    /// A session, locked for this worker.
    Session(S),
    /// The broker answered that no session is available.
    Idle,
    /// The accept was cancelled by its timeout before the broker answered: the client may be
    /// halfway through an attach, so its connection is not used again.
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

    /// Up to `max` messages: waits at most `wait` for the first, then returns what arrives
    /// right behind it ([`BATCH_GAP`], at most [`BATCH_WINDOW`]), not waiting for `max`.
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

    /// How long the session lock the broker granted has left now (its expiry less this
    /// machine's clock); `None` when the broker did not say. The entity's lock duration, less
    /// the time since the accept or the last renewal.
    fn lock_left(&self) -> Option<Duration> {
        None
    }

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
