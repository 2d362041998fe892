//! Broker-to-client links: receivers on queues, subscriptions and dead-letter queues.
//!
//! A session receiver first needs a session: named (refused while another receiver holds it)
//! or "next available" (held until one has messages, then granted, or refused with
//! `com.microsoft:timeout` after the server timeout, as Service Bus does). The grant is echoed in
//! the source filter and the lock expiry in the `com.microsoft:locked-until-utc` link property.
//!
//! While a link runs, every message it took is tracked: sent-but-unsettled ones are released
//! with delivery count + 1 when the connection or session lock goes away (or a plain receiver's
//! link ends), and untouched when the client closes a session receiver; one taken but not yet
//! sent (waiting for credit) goes back untouched.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use fe2o3_amqp::{
    acceptor::{LinkAcceptor, LinkEndpoint, ListenerSessionHandle},
    link::{DetachError, DispositionResponder, LinkStateError, SendError, Sender},
};
use fe2o3_amqp_types::{
    definitions::{DeliveryTag, Fields, SenderSettleMode},
    messaging::{DeliveryState, Outcome, Rejected, MESSAGE_FORMAT},
    performatives::Attach,
    primitives::{Symbol, Value},
};
use futures::{stream::FuturesUnordered, FutureExt, StreamExt};
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::{refuse, ConnCtx, LinkAuth};
use crate::{
    clock::now_ms,
    store::{
        AcquireError, Entity, Holder, LinkId, Next, Part, Release, Settle, DEAD_LETTER_DESCRIPTION,
        DEAD_LETTER_REASON,
    },
    wire,
};

/// A parked session receiver whose wait is over.
#[derive(Debug)]
pub(crate) struct Ready {
    attach: Attach,
    entity: Arc<Entity>,
    link: LinkId,
    delete: bool,
    grant: Option<(Arc<str>, i64)>,
    guard: Option<LinkAuth>,
}

impl Ready {
    /// Gives back a granted session lock that will never be used.
    pub(crate) fn abandon(self) {
        if let Some((id, _)) = &self.grant {
            self.entity.release_link(
                Part::Main,
                std::iter::empty(),
                Some(id),
                self.link,
                Release::Closed,
            );
        }
    }
}

enum SessionRequest {
    None,
    Next,
    Named(String),
}

fn session_request(attach: &Attach) -> SessionRequest {
    let filter = attach.source.as_ref().and_then(|s| s.filter.as_ref());
    match filter.and_then(|f| f.get(&Symbol::from(wire::SESSION_FILTER))) {
        None => SessionRequest::None,
        Some(Value::String(id)) => SessionRequest::Named(id.clone()),
        Some(Value::Described(d)) => match &d.value {
            Value::String(id) => SessionRequest::Named(id.clone()),
            _ => SessionRequest::Next,
        },
        Some(_) => SessionRequest::Next,
    }
}

fn requested_timeout(attach: &Attach, default: Duration) -> Duration {
    let value = attach
        .properties
        .as_ref()
        .and_then(|p| p.get(&Symbol::from(wire::LINK_TIMEOUT)));
    let ms = match value {
        Some(Value::Uint(n)) => Some(*n as u64),
        Some(Value::Ulong(n)) => Some(*n),
        Some(Value::Int(n)) if *n > 0 => Some(*n as u64),
        Some(Value::Long(n)) if *n > 0 => Some(*n as u64),
        _ => None,
    };
    ms.map(Duration::from_millis).unwrap_or(default)
}

pub(crate) async fn accept(
    attach: Attach,
    session: &mut ListenerSessionHandle,
    ctx: &ConnCtx,
    entity: Arc<Entity>,
    part: Part,
    ready: &mpsc::Sender<Ready>,
    guard: Option<LinkAuth>,
) {
    let delete = matches!(attach.snd_settle_mode, SenderSettleMode::Settled);
    let link = ctx.shared.next_id();
    let request = session_request(&attach);
    let sessionful = entity.settings.requires_session && part == Part::Main;
    match (sessionful, request) {
        (false, SessionRequest::None) => {
            start(
                attach, session, ctx, entity, part, link, delete, None, guard,
            )
            .await;
        }
        (false, _) => {
            let error = wire::error(
                "amqp:not-allowed",
                format!(
                    "The entity '{}' does not require sessions; a session receiver cannot be created.",
                    entity.path
                ),
            );
            refuse(attach, session, ctx, error).await;
        }
        (true, SessionRequest::None) => {
            let error = wire::error(
                "amqp:not-allowed",
                format!(
                    "It is not possible for an entity that requires sessions to create a non-sessionful message receiver. Entity: '{}'",
                    entity.path
                ),
            );
            refuse(attach, session, ctx, error).await;
        }
        (true, request) => {
            let holder = Holder {
                link,
                connection: ctx.id,
                link_name: Arc::from(attach.name.as_str()),
                container: ctx.container.clone(),
            };
            let wanted = match &request {
                SessionRequest::Named(id) => Some(id.as_str()),
                _ => None,
            };
            match entity.acquire_session(wanted, &holder, now_ms()) {
                Ok(grant) => {
                    let ready = Ready {
                        attach,
                        entity,
                        link,
                        delete,
                        grant: Some(grant),
                        guard,
                    };
                    complete_session_attach(ready, session, ctx).await;
                }
                Err(AcquireError::Locked) => {
                    let error = wire::error(
                        wire::ERR_SESSION_CANNOT_BE_LOCKED,
                        format!(
                            "The requested session '{}' cannot be accepted. It may be locked by another receiver.",
                            wanted.unwrap_or_default()
                        ),
                    );
                    refuse(attach, session, ctx, error).await;
                }
                Err(AcquireError::NoneAvailable) => {
                    let timeout = requested_timeout(
                        &attach,
                        ctx.shared.config.namespace.session_accept_timeout,
                    );
                    let ready = ready.clone();
                    let cancel = ctx.cancel.clone();
                    ctx.tracker.spawn(async move {
                        let wait = Wait {
                            holder,
                            delete,
                            timeout,
                            guard,
                        };
                        wait_for_session(attach, entity, wait, ready, cancel).await
                    });
                }
            }
        }
    }
}

/// A parked session receiver: who asks, for how long, and what keeps it authorized.
struct Wait {
    holder: Holder,
    delete: bool,
    timeout: Duration,
    guard: Option<LinkAuth>,
}

async fn wait_for_session(
    attach: Attach,
    entity: Arc<Entity>,
    wait: Wait,
    ready: mpsc::Sender<Ready>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let Wait {
        holder,
        delete,
        timeout,
        guard,
    } = wait;
    let deadline = tokio::time::Instant::now() + timeout;
    let grant = loop {
        let notified = entity.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Ok(grant) = entity.acquire_session(None, &holder, now_ms()) {
            break Some(grant);
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => break None,
            _ = cancel.cancelled() => return,
        }
    };
    let message = Ready {
        attach,
        entity,
        link: holder.link,
        delete,
        grant,
        guard,
    };
    if let Err(mpsc::error::SendError(message)) = ready.send(message).await {
        message.abandon();
    }
}

/// Finishes a session receiver's attach: grant (echoing the session id) or time-out refusal.
pub(crate) async fn complete_session_attach(
    ready: Ready,
    session: &mut ListenerSessionHandle,
    ctx: &ConnCtx,
) {
    let Ready {
        mut attach,
        entity,
        link,
        delete,
        grant,
        guard,
    } = ready;
    let Some((id, until)) = grant else {
        let error = wire::error(
            wire::ERR_TIMEOUT,
            "The operation did not complete within the allotted timeout: no session is available.",
        );
        refuse(attach, session, ctx, error).await;
        return;
    };
    // The granted id goes back as a plain string, as Service Bus sends it, whatever form the
    // request had: Microsoft's SDKs compare or cast the filter value to a string (the
    // JavaScript SDK refuses a session whose echo is a described value), while azservicebus,
    // which asks with a described value, reads either.
    if let Some(source) = attach.source.as_mut() {
        let filter = source.filter.get_or_insert_with(Default::default);
        filter.insert(
            Symbol::from(wire::SESSION_FILTER),
            Value::String(id.to_string()),
        );
    }
    info!(connection = ctx.id, entity = %entity.path, session = %id, link = %attach.name, "session granted");
    start(
        attach,
        session,
        ctx,
        entity,
        Part::Main,
        link,
        delete,
        Some((id, until)),
        guard,
    )
    .await;
}

#[allow(clippy::too_many_arguments)]
async fn start(
    attach: Attach,
    session: &mut ListenerSessionHandle,
    ctx: &ConnCtx,
    entity: Arc<Entity>,
    part: Part,
    link: LinkId,
    delete: bool,
    grant: Option<(Arc<str>, i64)>,
    guard: Option<LinkAuth>,
) {
    let mut builder = LinkAcceptor::builder();
    if let Some((_, until)) = &grant {
        let mut properties = Fields::default();
        // Service Bus sends the session lock expiry as .NET ticks (a long), which is what
        // Microsoft's SDKs read; azservicebus only reads a timestamp here and otherwise learns
        // the expiry from renew-session-lock.
        properties.insert(
            Symbol::from(wire::LOCKED_UNTIL_UTC),
            Value::Long(wire::dotnet_ticks(*until)),
        );
        builder = builder.properties(properties);
    }
    let session_id = grant.map(|(id, _)| id);
    builder = builder.disposition_responder(settlement_responder(entity.clone(), part));
    match builder
        .build()
        .accept_incoming_attach(attach, session)
        .await
    {
        Ok(LinkEndpoint::Sender(sender)) => {
            let run = Run {
                entity,
                part,
                link,
                delete,
                session: session_id,
                ctx: ctx.clone(),
                guard,
            };
            ctx.tracker.spawn(run.run(sender));
        }
        Ok(LinkEndpoint::Receiver(_)) => {}
        Err(e) => {
            debug!(connection = ctx.id, error = %e, "receiver attach failed");
            if session_id.is_some() {
                let session = session_id.as_ref();
                entity.release_link(
                    Part::Main,
                    std::iter::empty(),
                    session,
                    link,
                    Release::Closed,
                );
            }
        }
    }
}

struct Run {
    entity: Arc<Entity>,
    part: Part,
    link: LinkId,
    delete: bool,
    session: Option<Arc<str>>,
    ctx: ConnCtx,
    guard: Option<LinkAuth>,
}

type Outstanding = Arc<Mutex<HashSet<u128>>>;

/// Upper bound for applying the last outcomes of a closing link.
const SETTLE_DRAIN: Duration = Duration::from_secs(5);

/// How long a link whose connection ended waits for a detach still on its way ([`Run::gone`]).
/// A connection that dropped without one ends its sessions, and the wait with them, at once.
const DETACH_GRACE: Duration = Duration::from_millis(500);

/// Settles a delivery the moment its receiver disposes of it without settling (what Microsoft's
/// SDKs do: rcv-settle-mode second) and tells fe2o3-amqp what to settle the delivery with, as
/// Service Bus answers: `rejected` without an error for a dead-letter, `rejected` with
/// `com.microsoft:message-lock-lost` (or `session-lock-lost`) when the lock is gone, otherwise
/// the receiver's own outcome. The link's outcome future then finds the message settled.
fn settlement_responder(entity: Arc<Entity>, part: Part) -> DispositionResponder {
    DispositionResponder(Arc::new(move |tag, state| {
        let token = wire::token_from_tag(tag)?;
        let outcome = match state? {
            DeliveryState::Accepted(a) => Outcome::Accepted(a.clone()),
            DeliveryState::Rejected(r) => Outcome::Rejected(r.clone()),
            DeliveryState::Released(r) => Outcome::Released(r.clone()),
            DeliveryState::Modified(m) => Outcome::Modified(m.clone()),
            _ => return None,
        };
        let dead_letter = matches!(outcome, Outcome::Rejected(_));
        match entity.settle_if_locked(part, token, settle_of(outcome), now_ms()) {
            Ok(()) if dead_letter => Some(DeliveryState::Rejected(Rejected { error: None })),
            Ok(()) => None,
            Err(e) => Some(DeliveryState::Rejected(Rejected {
                error: Some(wire::lock_lost(e)),
            })),
        }
    }))
}

fn settle_of(outcome: Outcome) -> Settle {
    match outcome {
        Outcome::Accepted(_) => Settle::Complete,
        Outcome::Modified(m) if m.undeliverable_here == Some(true) => {
            Settle::Defer(m.message_annotations.map(|a| {
                fe2o3_amqp_types::messaging::MessageAnnotations(
                    a.into_iter().map(|(k, v)| (k.into(), v)).collect(),
                )
            }))
        }
        Outcome::Modified(m) => Settle::Abandon(m.message_annotations.map(|a| {
            fe2o3_amqp_types::messaging::MessageAnnotations(
                a.into_iter().map(|(k, v)| (k.into(), v)).collect(),
            )
        })),
        Outcome::Rejected(r) => {
            let info = r.error.as_ref().and_then(|e| e.info.as_ref());
            let text = |name: &str| match info.and_then(|i| i.get(&Symbol::from(name))) {
                Some(Value::String(s)) => Some(s.clone()),
                _ => None,
            };
            Settle::DeadLetter {
                reason: text(DEAD_LETTER_REASON),
                description: text(DEAD_LETTER_DESCRIPTION),
                properties: None,
            }
        }
        Outcome::Released(_) => Settle::Unsent,
        #[allow(unreachable_patterns)]
        _ => Settle::Lost,
    }
}

impl Run {
    async fn run(self, mut sender: Sender) {
        let outstanding: Outstanding = Arc::default();
        let (fut_tx, fut_rx) = mpsc::unbounded_channel();
        let mut settler = tokio::spawn(settle_loop(
            fut_rx,
            self.entity.clone(),
            self.part,
            outstanding.clone(),
        ));
        let end = self.deliver(&mut sender, &outstanding, fut_tx).await;
        match &end {
            End::SessionLockLost => {
                let error = wire::error(
                    wire::ERR_SESSION_LOCK_LOST,
                    "The session lock has expired on the MessageSession. Accept a new MessageSession.",
                );
                super::with_deadline(sender.close_with_error(error)).await;
            }
            End::TokenExpired(error) => {
                super::with_deadline(sender.close_with_error(error.clone())).await;
            }
            _ => super::with_deadline(sender.close()).await,
        }
        // Outcomes that reached the link before it went away still count (the client saw its
        // settlement succeed); the settle loop ends once the link's pending futures resolve.
        if tokio::time::timeout(SETTLE_DRAIN, &mut settler)
            .await
            .is_err()
        {
            settler.abort();
        }
        let tokens: Vec<u128> = outstanding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        // Only a session receiver's own close gives its messages back untouched; a plain
        // receiver's locks would outlive its link on Service Bus and expire (count + 1).
        let release = match end {
            End::ClosedByClient if self.session.is_some() => Release::Closed,
            _ => Release::Lost,
        };
        self.entity
            .release_link(self.part, tokens, self.session.as_ref(), self.link, release);
        debug!(connection = self.ctx.id, entity = %self.entity.path, ?end, "receiver link ended");
    }

    /// Delivers until the link ends, and says why it ended.
    async fn deliver(
        &self,
        sender: &mut Sender,
        outstanding: &Outstanding,
        fut_tx: mpsc::UnboundedSender<(u128, DeliveryFuture)>,
    ) -> End {
        let notify = self.entity.notifier(self.part);
        let name = sender.name().to_owned();
        let lapsed = LinkAuth::lapsed(&self.guard, &name);
        tokio::pin!(lapsed);
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = now_ms();
            match self.entity.next_delivery(
                self.part,
                self.session.as_ref(),
                self.link,
                self.delete,
                now,
            ) {
                Next::Deliver(delivery) => {
                    let token = delivery.token;
                    let payload = bytes::Bytes::from(wire::encode_delivered(
                        wire::delivered_message(&delivery, !self.delete),
                    ));
                    // While this waits for credit, an earlier message of the session may come
                    // back (abandon, lock loss): then the held one goes back and we pick again,
                    // so order is never broken. Biased, so that when the credit and the news
                    // are both there by the time this task runs (a busy machine), the news is
                    // looked at first; news of anything else (new messages) keeps the held one.
                    // `send_batchable_encoded` is cancel-safe.
                    let sent = loop {
                        tokio::select! {
                            biased;
                            _ = &mut notified => {
                                // Armed again before looking, so no return is missed.
                                notified.set(notify.notified());
                                notified.as_mut().enable();
                                if self.entity.returned_before(
                                    self.part,
                                    self.session.as_ref(),
                                    delivery.seq,
                                ) {
                                    break None;
                                }
                            }
                            r = sender.send_batchable_encoded(
                                payload.clone(),
                                MESSAGE_FORMAT,
                                Some(self.delete),
                                Some(DeliveryTag::from(wire::delivery_tag(token))),
                            ) => break Some(r),
                            _ = self.ctx.cancel.cancelled() => {
                                self.unsend(token);
                                return Self::gone(sender).await;
                            }
                            error = &mut lapsed => {
                                self.unsend(token);
                                return End::TokenExpired(error);
                            }
                        }
                    };
                    let Some(sent) = sent else {
                        self.entity.put_back(self.part, token);
                        continue;
                    };
                    match sent {
                        Ok(fut) if !self.delete => {
                            outstanding
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(token);
                            let _ = fut_tx.send((token, Box::pin(fut)));
                        }
                        Ok(_) => {}
                        Err(e) => {
                            debug!(error = %e, "send failed");
                            self.unsend(token);
                            return End::of_send_error(&e);
                        }
                    }
                }
                Next::Empty => {
                    let expiry = self.session_lock_deadline();
                    tokio::select! {
                        _ = &mut notified => {}
                        e = sender.on_detach() => {
                            debug!(connection = self.ctx.id, error = %e, "receiver detached");
                            return End::of_detach(&e);
                        }
                        _ = self.ctx.cancel.cancelled() => return Self::gone(sender).await,
                        error = &mut lapsed => return End::TokenExpired(error),
                        _ = tokio::time::sleep(expiry) => {}
                    }
                }
                Next::SessionLockLost => return End::SessionLockLost,
            }
        }
    }

    /// Why the link ended once its connection is gone. A client that detaches and closes its
    /// connection in one breath (the Python SDK does) can have its detach still on the way
    /// through the session when the connection's end is seen; that link was closed, not lost,
    /// and its session's messages must come back without a higher delivery count.
    async fn gone(sender: &mut Sender) -> End {
        match tokio::time::timeout(DETACH_GRACE, sender.on_detach()).await {
            Ok(e) => End::of_detach(&e),
            Err(_) => End::ConnectionGone,
        }
    }

    /// Wake-up interval while idle, so an expired session lock is noticed without traffic.
    fn session_lock_deadline(&self) -> Duration {
        Duration::from_millis(if self.session.is_some() { 250 } else { 5_000 })
    }

    /// A message taken for delivery but never put on the wire goes back as it was.
    fn unsend(&self, token: u128) {
        if !self.delete {
            self.entity
                .settle(self.part, token, Settle::Unsent, now_ms());
        }
    }
}

/// Why a delivering link ended.
#[derive(Debug, Clone)]
enum End {
    /// The client detached or closed the link.
    ClosedByClient,
    /// The connection or session went away (or the broker is suspending).
    ConnectionGone,
    /// The session lock expired or was taken over; the link is detached with an error.
    SessionLockLost,
    /// The token the link depended on expired unrenewed; the link is detached with this error.
    TokenExpired(fe2o3_amqp_types::definitions::Error),
}

impl End {
    fn of_detach(error: &DetachError) -> Self {
        #[allow(deprecated)] // `DetachedByRemote` is still what fe2o3 reports for a plain detach
        match error {
            DetachError::ClosedByRemote
            | DetachError::DetachedByRemote
            | DetachError::RemoteDetachedWithError(_) => End::ClosedByClient,
            _ => End::ConnectionGone,
        }
    }

    fn of_send_error(error: &SendError) -> Self {
        match error {
            SendError::Detached(e) => End::of_detach(e),
            SendError::LinkStateError(
                LinkStateError::RemoteDetached
                | LinkStateError::RemoteClosed
                | LinkStateError::RemoteDetachedWithError(_)
                | LinkStateError::RemoteClosedWithError(_),
            ) => End::ClosedByClient,
            _ => End::ConnectionGone,
        }
    }
}

type DeliveryFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Outcome, fe2o3_amqp::link::SendError>> + Send>,
>;

async fn settle_loop(
    mut rx: mpsc::UnboundedReceiver<(u128, DeliveryFuture)>,
    entity: Arc<Entity>,
    part: Part,
    outstanding: Outstanding,
) {
    let mut pending = FuturesUnordered::new();
    let apply = |token: u128, result: Result<Outcome, fe2o3_amqp::link::SendError>| {
        if let Ok(outcome) = result {
            outstanding
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&token);
            // Without effect when the responder already settled it (or its lock is gone).
            let _ = entity.settle_if_locked(part, token, settle_of(outcome), now_ms());
        }
    };
    loop {
        tokio::select! {
            next = rx.recv() => match next {
                Some((token, fut)) => pending.push(async move { (token, fut.await) }),
                None => break,
            },
            Some((token, result)) = pending.next(), if !pending.is_empty() => apply(token, result),
        }
    }
    // The link is gone: apply the outcomes that already arrived; the rest are released.
    while let Some(Some((token, result))) = pending.next().now_or_never() {
        apply(token, result);
    }
}
