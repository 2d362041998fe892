//! Links on which clients send to a topic or queue.
//!
//! Each transfer (a single message or a 0x80013700 batch) is accepted only after its messages
//! are in every subscription's store, so an `Accepted` outcome means "durably enqueued" as far
//! as the emulator's lifetime goes (suspend/resume keeps it). The outcome goes out the moment
//! the messages are stored, as Service Bus sends it: a client must be ready for it before its
//! transfer is written. fe2o3-amqp 0.14 as published was not (an outcome that came first was
//! dropped and the send waited for its timeout); the vendored copy is (vendor/README.md). Test:
//! `crates/core/tests/connection.rs::an_outcome_that_arrives_at_once_is_never_lost`.

use std::sync::Arc;

use fe2o3_amqp::{
    acceptor::{LinkAcceptor, LinkEndpoint, ListenerSessionHandle},
    link::{Receiver, RecvError},
};
use fe2o3_amqp_types::{messaging::Body, primitives::Value};
use tracing::{debug, warn};

use super::{ConnCtx, LinkAuth};
use crate::{namespace::Ingress, wire};

pub(crate) async fn accept(
    attach: fe2o3_amqp_types::performatives::Attach,
    session: &mut ListenerSessionHandle,
    ctx: &ConnCtx,
    ingress: Arc<Ingress>,
    guard: Option<LinkAuth>,
) {
    // The advertised max-message-size is how Service Bus announces its limit; clients size
    // batches from it, and fe2o3 detaches an oversized transfer with
    // amqp:link:message-size-exceeded (the receiver keeps the default auto credit of 200).
    // Service Bus settles a client's transfer with its outcome at once (receiver settle mode
    // first) whatever the sender asks for; Microsoft's Python SDK asks for `second` and then
    // waits for a settled outcome that mode would never send.
    let acceptor = LinkAcceptor::builder()
        .max_message_size(ingress.max_message_size)
        .supported_receiver_settle_modes(fe2o3_amqp::acceptor::SupportedReceiverSettleModes::First)
        .fallback_receiver_settle_mode(fe2o3_amqp::types::definitions::ReceiverSettleMode::First)
        .build();
    match acceptor.accept_incoming_attach(attach, session).await {
        Ok(LinkEndpoint::Receiver(receiver)) => {
            ctx.tracker
                .spawn(run(receiver, ctx.clone(), ingress, guard));
        }
        Ok(LinkEndpoint::Sender(_)) => {}
        Err(e) => debug!(connection = ctx.id, error = %e, "sender attach failed"),
    }
}

async fn run(mut receiver: Receiver, ctx: ConnCtx, ingress: Arc<Ingress>, guard: Option<LinkAuth>) {
    let name = receiver.name().to_owned();
    let lapsed = LinkAuth::lapsed(&guard, &name);
    tokio::pin!(lapsed);
    loop {
        let delivery = tokio::select! {
            d = receiver.recv::<Body<Value>>() => d,
            error = &mut lapsed => {
                super::with_deadline(receiver.close_with_error(error)).await;
                return;
            }
            _ = ctx.cancel.cancelled() => return,
        };
        let delivery = match delivery {
            Ok(d) => d,
            Err(e) => {
                debug!(connection = ctx.id, entity = %ingress.name, error = %e, "sender link ended");
                // A transfer the link cannot take ends it with a condition, as Service Bus
                // names one: never a bare detach the client can only call "unknown".
                let refusal = match &e {
                    RecvError::TransferLimitExceeded => Some((
                        "amqp:link:transfer-limit-exceeded",
                        "The peer sent more transfers than the link credit allowed.".to_owned(),
                    )),
                    RecvError::MessageDecode(why) => Some((
                        "amqp:decode-error",
                        format!("The message could not be decoded: {why}"),
                    )),
                    _ => None,
                };
                if let Some((condition, description)) = refusal {
                    let error = wire::error(condition, description);
                    super::with_deadline(receiver.close_with_error(error)).await;
                }
                return;
            }
        };
        let format = *delivery.message_format();
        let (info, message) = delivery.into_parts();
        let result = wire::unbatch(message, format)
            .map_err(|e| wire::error(wire::ERR_ARGUMENT, e))
            .and_then(|messages| {
                ingress
                    .ingest(messages)
                    .map_err(|r| wire::error(r.condition, r.description))
            });
        let disposed = match result {
            Ok(outcome) => {
                if outcome.duplicates > 0 {
                    debug!(entity = %ingress.name, duplicates = outcome.duplicates, "dropped duplicates");
                }
                receiver.accept(info).await
            }
            Err(error) => {
                warn!(entity = %ingress.name, condition = ?error.condition, "refused transfer");
                receiver.reject(info, error).await
            }
        };
        if disposed.is_err() {
            return;
        }
    }
}
