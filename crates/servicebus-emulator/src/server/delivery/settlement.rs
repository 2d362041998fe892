//! The outcomes a receiver sends back (accepted, rejected, modified, released), applied to the
//! store as Service Bus applies them: at once when the receiver disposes without settling, and
//! otherwise when the delivery's outcome arrives.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use fe2o3_amqp::link::DispositionResponder;
use fe2o3_amqp_types::{
    definitions::Fields,
    messaging::{DeliveryState, MessageAnnotations, Outcome, Rejected},
    primitives::{Symbol, Value},
};
use futures::{stream::FuturesUnordered, FutureExt, StreamExt};
use tokio::sync::mpsc;

use crate::{
    clock::now_ms,
    store::{Entity, Part, Settle, DEAD_LETTER_DESCRIPTION, DEAD_LETTER_REASON},
    wire,
};

/// The lock tokens a link sent and the client has not settled yet.
pub(super) type Outstanding = Arc<Mutex<HashSet<u128>>>;

/// Settles a delivery the moment its receiver disposes of it without settling (what Microsoft's
/// SDKs do: rcv-settle-mode second) and tells fe2o3-amqp what to settle the delivery with, as
/// Service Bus answers: `rejected` without an error for a dead-letter, `rejected` with
/// `com.microsoft:message-lock-lost` (or `session-lock-lost`) when the lock is gone, otherwise
/// the receiver's own outcome. The link's outcome future then finds the message settled.
pub(super) fn responder(entity: Arc<Entity>, part: Part) -> DispositionResponder {
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
            Settle::Defer(m.message_annotations.map(annotations))
        }
        Outcome::Modified(m) => Settle::Abandon(m.message_annotations.map(annotations)),
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

/// The annotations a `modified` outcome carries, as the store keeps them on the message.
fn annotations(fields: Fields) -> MessageAnnotations {
    MessageAnnotations(fields.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

/// The outcome of one sent delivery, as fe2o3-amqp reports it.
pub(super) type DeliveryFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Outcome, fe2o3_amqp::link::SendError>> + Send>,
>;

/// Applies the outcomes of a link's deliveries as they arrive, until the link is gone.
pub(super) async fn settle_loop(
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
