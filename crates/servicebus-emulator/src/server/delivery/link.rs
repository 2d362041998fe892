//! A running receiver link. While it runs, every message it took is tracked: sent-but-unsettled
//! ones are released with delivery count + 1 when the connection or session lock goes away (or
//! a plain receiver's link ends), and untouched when the client closes a session receiver (its
//! link, or the whole connection with an AMQP close); one
//! taken but not yet sent (waiting for credit) goes back untouched.

use std::{
    future::Future,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use fe2o3_amqp::link::{DetachError, LinkStateError, SendError, Sender};
use fe2o3_amqp_types::{
    definitions::{DeliveryTag, Error as AmqpError},
    messaging::MESSAGE_FORMAT,
};
use tokio::sync::{futures::Notified, mpsc};
use tracing::debug;

use super::settlement::{settle_loop, DeliveryFuture, Outstanding};
use crate::{
    clock::now_ms,
    server::{ConnCtx, LinkAuth},
    store::{Delivery, Entity, LinkId, Next, Part, Release, Settle},
    wire,
};

pub(super) struct Run {
    pub(super) entity: Arc<Entity>,
    pub(super) part: Part,
    pub(super) link: LinkId,
    pub(super) delete: bool,
    pub(super) session: Option<Arc<str>>,
    pub(super) ctx: ConnCtx,
    pub(super) guard: Option<LinkAuth>,
}

/// Upper bound for applying the last outcomes of a closing link.
const SETTLE_DRAIN: Duration = Duration::from_secs(5);

/// How long a link whose connection ended waits for a detach still on its way ([`Run::gone`]).
/// A connection that dropped without one ends its sessions, and the wait with them, at once.
const DETACH_GRACE: Duration = Duration::from_millis(500);

impl Run {
    pub(super) async fn run(self, mut sender: Sender) {
        let outstanding: Outstanding = Arc::default();
        let (fut_tx, fut_rx) = mpsc::unbounded_channel();
        let mut settler = tokio::spawn(settle_loop(
            fut_rx,
            self.entity.clone(),
            self.part,
            outstanding.clone(),
        ));
        let end = match self.deliver(&mut sender, &outstanding, fut_tx).await {
            End::ConnectionGone => self.closed_or_lost().await,
            end => end,
        };
        match &end {
            End::SessionLockLost => {
                let error = wire::error(
                    wire::ERR_SESSION_LOCK_LOST,
                    "The session lock has expired on the MessageSession. Accept a new MessageSession.",
                );
                crate::server::with_deadline(sender.close_with_error(error)).await;
            }
            End::TokenExpired(error) => {
                crate::server::with_deadline(sender.close_with_error(error.clone())).await;
            }
            _ => crate::server::with_deadline(sender.close()).await,
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
        // Service Bus raises a session message's delivery count on its next delivery only when
        // the session lock expired, not when the receiver closed (Azure/azure-sdk-for-js
        // #1311, the service team's answer; #15116 observes the same), so messages a session
        // receiver had been sent but not settled when it closed come back at the same count.
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
                    let sending = self.deliver_one(
                        sender,
                        delivery,
                        notified.as_mut(),
                        lapsed.as_mut(),
                        outstanding,
                        &fut_tx,
                    );
                    if let Some(end) = sending.await {
                        return end;
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

    /// Puts one delivery on the wire once the client gives credit, and tracks it until it is
    /// settled; `Some` when the link ended meanwhile, `None` to pick the next message.
    async fn deliver_one<'a, L: Future<Output = AmqpError>>(
        &'a self,
        sender: &mut Sender,
        delivery: Delivery,
        mut notified: Pin<&mut Notified<'a>>,
        mut lapsed: Pin<&mut L>,
        outstanding: &Outstanding,
        fut_tx: &mpsc::UnboundedSender<(u128, DeliveryFuture)>,
    ) -> Option<End> {
        let notify = self.entity.notifier(self.part);
        let token = delivery.token;
        let payload = bytes::Bytes::from(wire::encode_delivered(wire::delivered_message(
            &delivery,
            !self.delete,
        )));
        // While this waits for credit, an earlier message of the session may come back
        // (abandon, lock loss): then the held one goes back and we pick again, so order is
        // never broken. Biased, so that when the credit and the news are both there by the time
        // this task runs (a busy machine), the news is looked at first; news of anything else
        // (new messages) keeps the held one. `send_batchable_encoded` is cancel-safe.
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
                    return Some(Self::gone(sender).await);
                }
                error = &mut lapsed => {
                    self.unsend(token);
                    return Some(End::TokenExpired(error));
                }
            }
        };
        let Some(sent) = sent else {
            self.entity.put_back(self.part, token);
            return None;
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
                return Some(End::of_send_error(&e));
            }
        }
        None
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

    /// How a link whose connection ended without its detach ended: closed by the client when
    /// the client closed the connection itself (an AMQP close: the links were closed, their
    /// detaches may just not have reached them), lost when the socket went away.
    async fn closed_or_lost(&self) -> End {
        // The connection's task records how it ended before it cancels its links.
        let _ = tokio::time::timeout(DETACH_GRACE, self.ctx.cancel.cancelled()).await;
        if self.ctx.closed_by_client.load(Ordering::Acquire) {
            End::ClosedByClient
        } else {
            End::ConnectionGone
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
