//! A session receiver's grant. It first needs a session: named (refused while another receiver
//! holds it) or "next available" (held until one has messages, then granted, or refused with
//! `com.microsoft:timeout` after the server timeout, as Service Bus does). The grant is echoed in
//! the source filter and the lock expiry in the `com.microsoft:locked-until-utc` link property.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use fe2o3_amqp::acceptor::ListenerSessionHandle;
use fe2o3_amqp_types::{
    definitions::SenderSettleMode,
    performatives::Attach,
    primitives::{Symbol, Value},
};
use tokio::sync::mpsc;
use tracing::info;

use super::start;
use crate::{
    clock::now_ms,
    server::{refuse, ConnCtx, LinkAuth},
    store::{AcquireError, Entity, Holder, LinkId, Part, Release},
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

/// What a receiver's source filter asks for: no session, the next available, or a named one.
pub(super) enum SessionRequest {
    None,
    Next,
    Named(String),
}

/// Reads the session filter of a receiver's attach.
pub(super) fn session_request(attach: &Attach) -> SessionRequest {
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

/// How long the client asked an accept-next-session to wait (`com.microsoft:timeout`).
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

/// Grants a session receiver its session, refuses it, or parks it until a session is free.
pub(super) async fn acquire(
    attach: Attach,
    session: &mut ListenerSessionHandle,
    ctx: &ConnCtx,
    entity: Arc<Entity>,
    link: LinkId,
    ready: &mpsc::Sender<Ready>,
    guard: Option<LinkAuth>,
) {
    let delete = matches!(attach.snd_settle_mode, SenderSettleMode::Settled);
    let request = session_request(&attach);
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
            let namespace = &ctx.shared.config.namespace;
            let timeout = if namespace.ignore_client_accept_timeout {
                namespace.session_accept_timeout
            } else {
                requested_timeout(&attach, namespace.session_accept_timeout)
            };
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
    let parked = Parked::new(&entity);
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
    drop(parked);
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

/// Counts a parked accept in [`Entity::waiting_accepts`] while it lives.
struct Parked<'a>(&'a Entity);

impl<'a> Parked<'a> {
    fn new(entity: &'a Entity) -> Self {
        entity.waiting_accepts.fetch_add(1, Ordering::Relaxed);
        Self(entity)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.waiting_accepts.fetch_sub(1, Ordering::Relaxed);
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
