//! Moving messages to an entity's dead-letter queue, with the reasons Service Bus gives.

use std::sync::Arc;

use fe2o3_amqp_types::{messaging::ApplicationProperties, primitives::SimpleValue};

use super::{EntitySettings, Store, Stored};

/// Application property that carries why a message was dead-lettered.
pub(crate) const DEAD_LETTER_REASON: &str = "DeadLetterReason";
/// Application property that carries the dead-letter description.
pub(crate) const DEAD_LETTER_DESCRIPTION: &str = "DeadLetterErrorDescription";

/// Reason and description of a message whose time-to-live passed on an entity with
/// dead-lettering on expiration.
const TTL_EXPIRED: (&str, &str) = (
    "TTLExpiredException",
    "The message expired and was dead lettered.",
);

/// Reason and description of a message without SessionId on a session-enabled subscription,
/// as Service Bus records them (Azure/azure-service-bus#196; the dead-letter reasons table of
/// "Overview of Service Bus dead-letter queues", learn.microsoft.com; messages "go to deadletter
/// when sent to Subscriptions with sessions", Azure/azure-sdk-for-js#1118).
pub(super) const SESSION_ID_IS_NULL: (&str, &str) = (
    "Session id is null.",
    "Session enabled entity doesn't allow a message whose session identifier is null.",
);

/// Puts a message into a dead-letter queue, recording why in its application properties.
/// Dead-lettered messages never expire: in a dead-letter queue "time-to-live isn't observed"
/// and "messages remain in the DLQ until you explicitly retrieve them" (learn.microsoft.com,
/// "Overview of Service Bus dead-letter queues").
pub(super) fn push_dead_letter(
    dlq: &mut Store,
    mut stored: Stored,
    reason: Option<String>,
    description: Option<String>,
) {
    stored.lock = None;
    stored.expires_ms = i64::MAX;
    let message = Arc::make_mut(&mut stored.message);
    let app = message
        .application_properties
        .get_or_insert_with(|| ApplicationProperties(Default::default()));
    if let Some(reason) = reason {
        app.0
            .insert(DEAD_LETTER_REASON.to_owned(), SimpleValue::String(reason));
    }
    if let Some(description) = description {
        app.0.insert(
            DEAD_LETTER_DESCRIPTION.to_owned(),
            SimpleValue::String(description),
        );
    }
    dlq.len += 1;
    dlq.sessions
        .entry(Arc::from(""))
        .or_default()
        .insert(stored);
}

/// An expired message leaves its store: dead-lettered when the entity says so (and `dlq` is
/// there), otherwise dropped. Returns whether the dead-letter queue grew.
pub(super) fn expire(dlq: Option<&mut Store>, stored: Stored, settings: &EntitySettings) -> bool {
    match dlq {
        Some(dlq) if settings.dead_letter_on_expiry => {
            let (reason, description) = TTL_EXPIRED;
            push_dead_letter(dlq, stored, Some(reason.into()), Some(description.into()));
            true
        }
        _ => false,
    }
}

/// Reason and description of a message whose delivery count reached the entity's maximum.
pub(super) fn max_delivery_count_exceeded(settings: &EntitySettings) -> (String, String) {
    (
        "MaxDeliveryCountExceeded".to_owned(),
        format!(
            "Message could not be consumed after {} delivery attempts.",
            settings.max_delivery_count
        ),
    )
}

/// After a failed delivery: back in line (ahead of later messages), or to the dead-letter queue
/// once the delivery count reaches the entity's maximum.
pub(super) fn redeliver_or_dead_letter(
    store: &mut Store,
    dlq: Option<&mut Store>,
    key: &Arc<str>,
    seq: i64,
    settings: &EntitySettings,
) -> (bool, bool) {
    let queue = store.sessions.get_mut(key).expect("present");
    let count = queue
        .messages
        .get(&seq)
        .map(|s| s.delivery_count)
        .unwrap_or(0);
    match dlq {
        Some(dlq) if count >= settings.max_delivery_count => {
            let stored = queue.messages.remove(&seq).expect("present");
            store.len -= 1;
            let (reason, description) = max_delivery_count_exceeded(settings);
            push_dead_letter(dlq, stored, Some(reason), Some(description));
            (false, true)
        }
        _ => {
            queue.released.insert(seq);
            (true, false)
        }
    }
}
