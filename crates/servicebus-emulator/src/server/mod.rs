//! The AMQP side: TCP listeners (plain and TLS), SASL, connections, sessions and link dispatch.
//!
//! Module map:
//! - `mod.rs` (this file): state shared by connections, and the decision what an incoming
//!   attach is (CBS, `$management`, a sender to a topic/queue, a receiver on a subscription/queue).
//! - `connection`: listeners, the AMQP handshake, connections and their sessions.
//! - `delivery`: broker-to-client links (receivers of the client), including session grants.
//! - `ingest`: client-to-broker links that send messages to topics and queues.
//! - `request`: request/response nodes (`$cbs`, `$management`) and the routing of replies.
//! - `management`: the `$management` operations, one function each.
//! - `latency`: the configured round trip, added to everything the broker sends.
//! - `sasl`: the SASL mechanisms we offer (ANONYMOUS, PLAIN and MSSBCBS).

mod connection;
mod delivery;
mod ingest;
mod latency;
mod management;
mod request;
mod sasl;

pub(crate) use connection::serve;

use std::sync::{
    atomic::{AtomicU64, AtomicUsize, Ordering},
    Arc,
};

use fe2o3_amqp::acceptor::ListenerSessionHandle;
use fe2o3_amqp_types::{
    definitions::{Error as AmqpError, Role},
    performatives::Attach,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info};

use crate::{
    auth::{link_path, ConnAuth, Keys, Need},
    config::EmulatorConfig,
    namespace::{Address, Namespace},
};

/// State shared by every connection of one emulator.
#[derive(Debug)]
pub(crate) struct Shared {
    pub namespace: Namespace,
    /// The namespace's keys; changed at runtime by [`crate::EmulatorHandle::put_key`] and
    /// [`crate::EmulatorHandle::remove_key`].
    keys: std::sync::RwLock<Keys>,
    /// The trusted token issuer standing in for Microsoft Entra ID, if configured.
    pub issuer: Option<crate::auth::Issuer>,
    pub config: EmulatorConfig,
    next_id: AtomicU64,
    pub connections: AtomicUsize,
    /// Links detached because the token they depended on expired.
    pub token_expiry_detaches: AtomicU64,
    /// Tokens accepted on `$cbs` put-token requests, all connections together.
    pub tokens_put: AtomicU64,
    /// AMQP sessions begun by clients, all connections together.
    pub sessions_begun: AtomicU64,
}

impl Shared {
    pub(crate) fn new(config: EmulatorConfig, issuer: Option<crate::auth::Issuer>) -> Self {
        Self {
            issuer,
            namespace: Namespace::new(&config),
            keys: std::sync::RwLock::new(Keys::new(&config.namespace.keys())),
            config,
            next_id: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            token_expiry_detaches: AtomicU64::new(0),
            tokens_put: AtomicU64::new(0),
            sessions_begun: AtomicU64::new(0),
        }
    }

    /// The keys as they are now.
    pub(crate) fn keys(&self) -> Keys {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes the keys; tokens already put stay valid until they expire.
    pub(crate) fn edit_keys<T>(&self, edit: impl FnOnce(&mut Keys) -> T) -> T {
        edit(&mut self.keys.write().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Per-connection context handed to link tasks.
#[derive(Debug, Clone)]
pub(crate) struct ConnCtx {
    pub shared: Arc<Shared>,
    pub id: u64,
    pub container: Arc<str>,
    /// Tokens put on this connection's `$cbs` (or its SASL PLAIN login).
    pub auth: Arc<ConnAuth>,
    /// Cancelled when the connection ends (or the broker suspends): link tasks stop and release
    /// their locks.
    pub cancel: CancellationToken,
    /// Set before `cancel` fires when the client closed the connection itself (an AMQP close,
    /// not a lost socket): its links were closed by the client even where their detach had not
    /// reached them yet.
    pub closed_by_client: Arc<std::sync::atomic::AtomicBool>,
    pub tracker: TaskTracker,
}

/// What keeps one link authorized: a token on its connection for its path and right. `None`
/// where nothing is checked (authorization off, `$cbs`, reply links).
#[derive(Debug, Clone)]
pub(crate) struct LinkAuth {
    auth: Arc<ConnAuth>,
    shared: Arc<Shared>,
    connection: u64,
    path: String,
    need: Need,
}

impl LinkAuth {
    /// Resolves with the error to detach `link` with once its token expired unrenewed; never
    /// for `None`.
    pub(crate) async fn lapsed(this: &Option<LinkAuth>, link: &str) -> AmqpError {
        let Some(this) = this else {
            return std::future::pending().await;
        };
        let why = this.auth.lapsed(&this.path, this.need).await;
        this.shared
            .token_expiry_detaches
            .fetch_add(1, Ordering::Relaxed);
        info!(connection = this.connection, link, path = %this.path, "token expired, detaching link");
        let (condition, description) = crate::auth::renew_token_error(link, &why);
        crate::wire::error(condition, description)
    }
}

fn address_of(attach: &Attach) -> Option<String> {
    let address = match attach.role {
        // The client sends: the address is its target.
        Role::Sender => target_address(attach),
        Role::Receiver => attach
            .source
            .as_ref()
            .and_then(|s| s.address.as_ref())
            .map(|a| a.to_string()),
    };
    address
}

/// The address of an attach's target, when it is a plain target (not a coordinator).
pub(crate) fn target_address(attach: &Attach) -> Option<String> {
    #[allow(irrefutable_let_patterns)]
    match attach.target.as_deref() {
        Some(fe2o3_amqp_types::messaging::TargetArchetype::Target(t)) => {
            t.address.as_ref().map(|a| a.to_string())
        }
        _ => None,
    }
}

async fn on_attach(
    attach: Attach,
    session: &mut ListenerSessionHandle,
    ctx: &ConnCtx,
    routes: &Arc<request::Routes>,
    ready: &tokio::sync::mpsc::Sender<delivery::Ready>,
) {
    let address = address_of(&attach).unwrap_or_default();
    debug!(connection = ctx.id, link = %attach.name, role = ?attach.role, %address, "attach");
    let resolved = ctx.shared.namespace.resolve(&address);
    let mut guard = None;
    if let Some(need) = needed_right(&attach.role, &resolved) {
        let now = crate::clock::now_ms();
        let path = link_path(&address);
        if ctx.shared.config.namespace.require_authorization {
            if let Err(denied) = ctx.auth.authorized_until(&path, need, now) {
                let error = crate::wire::error(crate::wire::ERR_UNAUTHORIZED, denied.0);
                return refuse(attach, session, ctx, error).await;
            }
            guard = Some(LinkAuth {
                auth: ctx.auth.clone(),
                shared: ctx.shared.clone(),
                connection: ctx.id,
                path,
                need,
            });
        }
    }
    match (attach.role.clone(), resolved) {
        (Role::Sender, Address::Cbs) => {
            request::accept_request_link(attach, session, ctx, routes, request::Node::Cbs).await
        }
        (Role::Sender, Address::Management(entity, part)) => {
            let node = request::Node::Management {
                entity,
                part,
                path: address,
            };
            request::accept_request_link(attach, session, ctx, routes, node).await
        }
        (Role::Receiver, Address::Cbs | Address::Management(..)) => {
            request::accept_reply_link(attach, session, ctx, routes).await
        }
        (Role::Sender, _) => match ctx.shared.namespace.ingress_for(&address) {
            Some(ingress) => ingest::accept(attach, session, ctx, ingress, guard).await,
            None => refuse(attach, session, ctx, not_found(&address)).await,
        },
        (Role::Receiver, Address::Store(entity, part)) => {
            delivery::accept(attach, session, ctx, entity, part, ready, guard).await
        }
        (Role::Receiver, _) => refuse(attach, session, ctx, not_found(&address)).await,
    }
}

/// The right a link needs on its entity (none for `$cbs`, where tokens are put, and for
/// addresses that do not exist, which are refused as not found).
fn needed_right(role: &Role, address: &Address) -> Option<Need> {
    match (role, address) {
        (_, Address::Cbs | Address::Unknown) => None,
        // A topic's `$management` serves its senders; a queue's or subscription's its receivers.
        (_, Address::Management(None, _)) => Some(Need::Send),
        (_, Address::Management(Some(_), _)) => Some(Need::Listen),
        (Role::Sender, _) => Some(Need::Send),
        (Role::Receiver, Address::Store(..)) => Some(Need::Listen),
        (Role::Receiver, Address::Ingress) => None,
    }
}

fn not_found(address: &str) -> fe2o3_amqp_types::definitions::Error {
    crate::wire::error(
        crate::wire::ERR_NOT_FOUND,
        format!("The messaging entity '{address}' could not be found."),
    )
}

/// Refuses a link the Service Bus way: complete the attach with a null terminus, then detach
/// it with the error. Both frames leave in one step of the session, as Service Bus writes
/// them, so a client that detaches on seeing the null terminus (fe2o3-amqp does) still reads
/// the error instead of an answer to its own detach.
pub(crate) async fn refuse(
    attach: Attach,
    session: &mut ListenerSessionHandle,
    ctx: &ConnCtx,
    error: fe2o3_amqp_types::definitions::Error,
) {
    info!(connection = ctx.id, link = %attach.name, condition = ?error.condition, "refusing link");
    let (role, source, target, initial_delivery_count) = match attach.role {
        // The peer receives, so the broker's end is the sender and its source is refused.
        Role::Receiver => (Role::Sender, None, attach.target, Some(0)),
        Role::Sender => (Role::Receiver, attach.source, None, None),
    };
    let reply = Attach {
        name: attach.name,
        handle: attach.handle,
        role,
        snd_settle_mode: attach.snd_settle_mode,
        rcv_settle_mode: attach.rcv_settle_mode,
        source,
        target,
        unsettled: None,
        incomplete_unsettled: false,
        initial_delivery_count,
        max_message_size: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    if let Err(e) = session.refuse_incoming_attach(reply, error).await {
        debug!(connection = ctx.id, error = %e, "refused attach failed");
    }
}

/// Bounds a detach handshake: a peer that never answers must not keep a task alive.
pub(crate) async fn with_deadline<F: std::future::Future>(f: F) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), f).await;
}
