//! Broker-to-client links: receivers on queues, subscriptions and dead-letter queues.
//!
//! - this file: what an incoming receiver attach gets (a plain link, a session, or a refusal)
//!   and the start of its link.
//! - `session`: a session receiver's grant: named, next available, or parked until one is.
//! - `link`: a running receiver link, delivering until it ends and releasing what it held.
//! - `settlement`: the outcomes a receiver sends back, applied to the store.

mod link;
mod session;
mod settlement;

use std::sync::Arc;

use fe2o3_amqp::acceptor::{LinkAcceptor, LinkEndpoint, ListenerSessionHandle};
use fe2o3_amqp_types::{
    definitions::{Fields, SenderSettleMode},
    performatives::Attach,
    primitives::{Symbol, Value},
};
use tokio::sync::mpsc;
use tracing::debug;

use super::{refuse, ConnCtx, LinkAuth};
use crate::{
    store::{Entity, LinkId, Part, Release},
    wire,
};
use link::Run;
pub(crate) use session::{complete_session_attach, Ready};
use session::{session_request, SessionRequest};

/// Takes a receiver attach: starts a plain receiver, hands a session receiver to `session`,
/// or refuses a receiver that does not fit the entity's sessions.
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
    let refusal = match (sessionful, request) {
        (false, SessionRequest::None) => {
            return start(
                attach, session, ctx, entity, part, link, delete, None, guard,
            )
            .await;
        }
        (false, _) => format!(
            "The entity '{}' does not require sessions; a session receiver cannot be created.",
            entity.path
        ),
        (true, SessionRequest::None) => format!(
            "It is not possible for an entity that requires sessions to create a non-sessionful message receiver. Entity: '{}'",
            entity.path
        ),
        (true, _) => {
            return session::acquire(attach, session, ctx, entity, link, ready, guard).await;
        }
    };
    refuse(
        attach,
        session,
        ctx,
        wire::error("amqp:not-allowed", refusal),
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
    builder = builder.disposition_responder(settlement::responder(entity.clone(), part));
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
