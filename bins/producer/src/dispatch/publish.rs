//! The publishing workers: each takes a session's messages, sends them (retrying on a fresh
//! publisher), parks what the client refuses and acknowledges the rest; [`supervise`] restarts
//! one that panics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ordo_core::readiness::{dependency, Readiness};
use ordo_core::restart::Restarts;
use ordo_core::retry::{Backoff, Retry};
use ordo_core::servicebus::sender::{PublishError, Publisher, PublisherFactory};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::claim::Claim;
use super::Dispatcher;
use crate::acks::Acks;
use crate::park::{ParkError, ParkMessage};

/// What a worker needs besides its publisher.
#[derive(Debug, Clone)]
pub struct WorkerContext {
    /// The queues.
    pub dispatcher: Arc<Dispatcher>,
    /// Where acknowledgements go.
    pub acks: Acks,
    /// Readiness: not ready while sends fail.
    pub readiness: Arc<Readiness>,
    /// Records messages the client refuses.
    pub parking: Arc<dyn ParkMessage>,
    /// Retry delays (sends and restarts).
    pub backoff: Backoff,
    /// Fires to abandon queued and in-flight sends at once (lease lost, grace period over).
    pub abandon: CancellationToken,
    /// Workers restarted after a panic, this term.
    pub restarts: Arc<AtomicUsize>,
}

/// Why publishing stopped other than by draining.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A refused message could not be recorded in `ordo_parked` (a permanent database error):
    /// passing it would lose it, retrying cannot help.
    #[error("publishing stopped: {0}")]
    Park(#[from] ParkError),
}

/// Runs `senders` workers until the dispatcher is closed and drained or `abandon` fires; a
/// worker that panics is restarted by the shared restart rule ([`ordo_core::restart`]; its
/// messages were given back). Returns the first [`WorkerError`], which ends publishing.
///
/// Unlike the projector's tasks, a worker has a normal end (the dispatcher drained), so only a
/// panic restarts it, and an error it returns is permanent (a refused message that could not
/// be parked), so it stops publishing instead of being retried.
pub async fn supervise<F: PublisherFactory>(
    senders: usize,
    factory: Arc<F>,
    ctx: WorkerContext,
) -> Result<(), WorkerError> {
    let mut set = tokio::task::JoinSet::new();
    // When each running worker started, by task id: a restart after a healthy run starts the
    // backoff over.
    let mut started = HashMap::new();
    for _ in 0..senders {
        let id = set.spawn(worker(factory.clone(), ctx.clone())).id();
        started.insert(id, Instant::now());
    }
    let mut restarts = Restarts::new("publisher", ctx.backoff);
    while let Some(joined) = set.join_next_with_id().await {
        match joined {
            Ok((id, Ok(()))) => {
                started.remove(&id);
            }
            Ok((_, Err(e))) => {
                tracing::error!(error = %e, "publishing worker failed: stopping");
                return Err(e);
            }
            Err(e) if e.is_cancelled() => {
                started.remove(&e.id());
            }
            Err(e) => {
                let run_started = started.remove(&e.id()).unwrap_or_else(Instant::now);
                let delay = restarts.next_delay(run_started);
                ctx.restarts.fetch_add(1, Ordering::SeqCst);
                tracing::error!(error = %crate::task::panic_text(e), delay_ms = delay.as_millis() as u64, "publishing worker panicked: its messages are queued again, restarting it");
                let (factory, ctx) = (factory.clone(), ctx.clone());
                let id = set
                    .spawn(async move {
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => worker(factory, ctx).await,
                            _ = ctx.abandon.cancelled() => Ok(()),
                        }
                    })
                    .id();
                started.insert(id, Instant::now() + delay);
            }
        }
    }
    Ok(())
}

/// Publishes queued sessions until the dispatcher is closed and drained, or `abandon` fires.
pub async fn worker<F: PublisherFactory>(
    factory: Arc<F>,
    ctx: WorkerContext,
) -> Result<(), WorkerError> {
    let mut publisher: Option<F::Publisher> = None;
    loop {
        let work = tokio::select! {
            w = ctx.dispatcher.next_work() => w,
            _ = ctx.abandon.cancelled() => return Ok(()),
        };
        let Some((session, items)) = work else {
            return Ok(());
        };
        metrics::histogram!(ordo_core::metrics::PUBLISH_BATCH_MESSAGES).record(items.len() as f64);
        let mut claim = Claim::new(ctx.dispatcher.clone(), session, items);
        let mut retry = Retry::new("publish", ctx.backoff);
        let mut fault = None;
        let mut stale_link_retried = false;
        while !claim.messages.is_empty() {
            let reused = publisher.is_some();
            let attempt = async {
                if publisher.is_none() {
                    publisher = Some(factory.open().await?);
                }
                publisher
                    .as_mut()
                    .expect("opened above")
                    .publish(&claim.messages)
                    .await
            };
            let result = tokio::select! {
                r = attempt => r,
                _ = ctx.abandon.cancelled() => return Ok(()),
            };
            match result {
                Ok(()) => {
                    if fault.take().is_some() {
                        tracing::info!(session = %claim.session(), "publishing recovered");
                    }
                    break;
                }
                Err(PublishError::Message { message_id, reason }) => {
                    if !park_refused(&ctx, &mut claim, &message_id, &reason).await? {
                        return Ok(());
                    }
                }
                Err(e)
                    if reused && !stale_link_retried && !matches!(e, PublishError::Timeout(_)) =>
                {
                    // A link kept from an earlier claim may have died with its connection
                    // while idle (the connection cut or the broker restarted): the first send
                    // on it fails at once though the broker is back. Once per claim, such a
                    // failure is sent again at once on a new link, and readiness is left
                    // alone; a failure on a link just opened, or no answer in
                    // `send_timeout`, is the broker's.
                    publisher = None;
                    stale_link_retried = true;
                    let span = tracing::info_span!("publish", session = %claim.session(), messages = claim.messages.len());
                    span.in_scope(|| retry.at_once("stale_link", &e));
                }
                Err(e) => {
                    publisher = None;
                    ctx.readiness.hold(&mut fault, dependency::SERVICEBUS);
                    // The retry's log line carries the session and batch size in its span.
                    let span = tracing::warn_span!("publish", session = %claim.session(), messages = claim.messages.len());
                    let go_on = retry
                        .pause(e.reason(), &e, &ctx.abandon)
                        .instrument(span)
                        .await;
                    if !go_on {
                        return Ok(());
                    }
                }
            }
        }
        acknowledge(&ctx, claim);
    }
}

/// Parks the message of `claim` the client refused and acknowledges it as parked; false when
/// the worker is to stop (abandoned, or the message was not recorded).
async fn park_refused(
    ctx: &WorkerContext,
    claim: &mut Claim,
    message_id: &str,
    reason: &str,
) -> Result<bool, WorkerError> {
    // The sender names a message of this batch; the messages before it may have
    // been sent already, and sending them again is deduplicated by MessageId.
    let i = claim
        .messages
        .iter()
        .position(|m| m.message_id == message_id)
        .unwrap_or(0);
    let error = format!("message {message_id} was refused: {reason}");
    let parked = tokio::select! {
        r = ctx.parking.park_message(&claim.messages[i], "rejected", error) => r?,
        _ = ctx.abandon.cancelled() => return Ok(false),
    };
    if !parked {
        return Ok(false);
    }
    let item = claim.remove(i);
    ctx.acks.lock().expect("ack lock").ack_parked(item.seq);
    Ok(true)
}

/// Everything left in `claim` was sent: acknowledges it and records how long each waited.
fn acknowledge(ctx: &WorkerContext, claim: Claim) {
    let published = claim.messages.len();
    let items = claim.done();
    let now = Instant::now();
    {
        let mut acks = ctx.acks.lock().expect("ack lock");
        for item in &items {
            acks.ack(item.seq);
        }
    }
    metrics::counter!(ordo_core::metrics::EVENTS_PUBLISHED).increment(published as u64);
    let latency = metrics::histogram!(ordo_core::metrics::PUBLISH_LATENCY);
    for item in &items {
        latency.record(now.duration_since(item.read_at).as_secs_f64());
    }
}
