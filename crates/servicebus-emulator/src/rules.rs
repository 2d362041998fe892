//! What Service Bus refuses at the door: the checks a transfer (one message or a batch) must
//! pass before anything of it is enqueued. Pure functions of the messages and the entity's
//! settings, so each rule is tested on its own (`mod tests`) and through the SDKs
//! (`tests/azure_rules/sending.rs`).
//!
//! | rule | condition | source |
//! |---|---|---|
//! | MessageId, SessionId, PartitionKey at most 128 | `com.microsoft:argument-out-of-range` | [`MAX_ID_LEN`] |
//! | PartitionKey equals SessionId when both are set | `amqp:not-allowed` | [`partition_key_mismatch`] |
//! | no `x-opt-scheduled-enqueue-time` (not implemented) | `amqp:not-implemented` | [`scheduled`] |
//! | a session queue takes only messages with SessionId | `amqp:not-allowed` | [`session_required`] |
//! | partitioned: one SessionId and PartitionKey per batch | `amqp:not-allowed` | [`partitioned_batch`] |
//! | partitioned + duplicate detection: one MessageId per batch | `amqp:not-allowed` | [`partitioned_batch`] |

use fe2o3_amqp_types::primitives::Value;

use crate::{store::AmqpMessage, wire};

/// Why a transfer was refused: the AMQP error the sender's link gets as the transfer's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub condition: &'static str,
    pub description: String,
}

/// The settings of a topic or queue that decide what it accepts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Admission {
    pub partitioned: bool,
    pub duplicate_detection: bool,
    /// A queue that requires sessions (a topic dead-letters per subscription instead, see
    /// `store::Entity::enqueue`).
    pub requires_session: bool,
}

/// Service Bus limits MessageId, SessionId and PartitionKey to 128 characters. The limit is the
/// service's ("The length is limited on the service-side", Azure/azure-sdk-for-net#32689); the
/// SDKs check it before sending (`Constants.MaxMessageIdLength = 128` in the .NET SDK,
/// btcpayserver/NBXplorer#101; azservicebus `set_message_id`), so only clients that skip the
/// check reach the service with a longer one. Counted in bytes here, which equals characters for
/// the ASCII ids clients use and never admits more than 128 characters.
pub(crate) const MAX_ID_LEN: usize = 128;

/// The annotation that asks the broker to hold a message until a time.
pub(crate) const SCHEDULED_ENQUEUE_TIME: &str = "x-opt-scheduled-enqueue-time";

/// Checks every rule above; the first one broken refuses the whole transfer.
pub(crate) fn admit(messages: &[AmqpMessage], admission: Admission) -> Result<(), Refusal> {
    for message in messages {
        id_lengths(message)?;
        partition_key_mismatch(message)?;
        scheduled(message)?;
        if admission.requires_session {
            session_required(message)?;
        }
    }
    if admission.partitioned {
        partitioned_batch(messages, admission.duplicate_detection)?;
    }
    Ok(())
}

fn session_id(message: &AmqpMessage) -> Option<&str> {
    message.properties.as_ref()?.group_id.as_deref()
}

fn id_lengths(message: &AmqpMessage) -> Result<(), Refusal> {
    let message_id = wire::message_id_text(message);
    let fields = [
        ("MessageId", message_id.as_deref()),
        ("SessionId", session_id(message)),
        ("PartitionKey", wire::partition_key(message)),
    ];
    for (name, value) in fields {
        if let Some(value) = value.filter(|v| v.len() > MAX_ID_LEN) {
            return Err(Refusal {
                condition: wire::ERR_ARGUMENT_OUT_OF_RANGE,
                description: format!(
                    "The value of {name} ({} bytes, starting {:?}) exceeds the maximum length of \
                     {MAX_ID_LEN}.",
                    value.len(),
                    value.chars().take(16).collect::<String>()
                ),
            });
        }
    }
    Ok(())
}

/// A message whose PartitionKey differs from its SessionId cannot be placed: the session decides
/// the partition. The SDKs refuse it before sending (azservicebus
/// `PartitionKeyAndSessionIdAreDifferent`; the .NET SDK overrides the key with the session id,
/// Azure/azure-sdk-for-net#27924), so only raw clients reach the broker with one.
fn partition_key_mismatch(message: &AmqpMessage) -> Result<(), Refusal> {
    match (session_id(message), wire::partition_key(message)) {
        (Some(session), Some(key)) if session != key => Err(Refusal {
            condition: wire::ERR_NOT_ALLOWED,
            description: format!(
                "PartitionKey {key:?} is different from SessionId {session:?}: both must be \
                 equal when set"
            ),
        }),
        _ => Ok(()),
    }
}

/// A queue that requires sessions refuses a message without SessionId, with the text Service
/// Bus gives (Azure/azure-sdk-for-python#738). The condition is not in that report;
/// `amqp:not-allowed` is the one Service Bus uses for operations an entity does not allow.
fn session_required(message: &AmqpMessage) -> Result<(), Refusal> {
    if session_id(message).is_some() {
        return Ok(());
    }
    Err(Refusal {
        condition: wire::ERR_NOT_ALLOWED,
        description: "The SessionId was not set on a message, and it cannot be sent to the \
                      entity. Entities that have session support enabled can only receive \
                      messages that have the SessionId set to a valid value."
            .to_owned(),
    })
}

/// Scheduled messages are refused rather than delivered early: a receiver must never see a
/// message before its `ScheduledEnqueueTime` ("Service Bus will hide the message from receivers
/// until the requested time", learn.microsoft.com, `ServiceBusReceivedMessage.ScheduledEnqueueTime`).
fn scheduled(message: &AmqpMessage) -> Result<(), Refusal> {
    let scheduled = message.message_annotations.as_ref().is_some_and(|a| {
        a.0.get(
            &SCHEDULED_ENQUEUE_TIME as &dyn fe2o3_amqp_types::messaging::annotations::AnnotationKey,
        )
        .is_some_and(|v| !matches!(v, Value::Null))
    });
    if scheduled {
        return Err(Refusal {
            condition: wire::ERR_NOT_IMPLEMENTED,
            description: format!(
                "Scheduled messages ({SCHEDULED_ENQUEUE_TIME}) are not supported by the emulator; \
                 send the message at its time instead."
            ),
        });
    }
    Ok(())
}

/// A batch is stored on one partition, so a partitioned entity takes a batch only when its
/// messages share SessionId and PartitionKey; with duplicate detection on as well, also their
/// MessageId (duplicate detection runs per partition on the batch's id). Single messages are
/// always accepted.
///
/// Azure answers with condition `amqp:not-allowed` (the Python SDK prints it as "Error
/// condition: ErrorCodes.NotAllowed"): on a partitioned entity, with the text of
/// [`PARTITIONED_TEXT`] (Azure/amqpnetlite#120); with duplicate detection on as well, with
/// the text of [`DISTINCT_IDS_TEXT`] (Azure/azure-sdk-for-python#21955). The service team
/// confirmed it does not implement batching there and recommends sending single messages when
/// deduplication is needed on a partitioned entity (Azure/azure-sdk-for-python#36333, #37744).
/// Azure appends the ids it looked at (`LogicalPartitionId:…::PartitionKey:…::SessionId:…::
/// MessageId:…`); the emulator appends those of the first message that differs.
fn partitioned_batch(messages: &[AmqpMessage], duplicate_detection: bool) -> Result<(), Refusal> {
    let Some((first, rest)) = messages.split_first() else {
        return Ok(());
    };
    let first_id = wire::message_id_text(first);
    for message in rest {
        let distinct = session_id(message) != session_id(first)
            || wire::partition_key(message) != wire::partition_key(first)
            || (duplicate_detection && wire::message_id_text(message) != first_id);
        if distinct {
            let text = if duplicate_detection {
                DISTINCT_IDS_TEXT
            } else {
                PARTITIONED_TEXT
            };
            return Err(Refusal {
                condition: wire::ERR_NOT_ALLOWED,
                description: format!(
                    "{text}PartitionKey:{}::SessionId:{}::MessageId:{}",
                    wire::partition_key(message).unwrap_or_default(),
                    session_id(message).unwrap_or_default(),
                    wire::message_id_text(message).unwrap_or_default(),
                ),
            });
        }
    }
    Ok(())
}

/// Azure's description for a batch of several sessions or partition keys refused by a
/// partitioned entity (see [`partitioned_batch`]).
pub(crate) const PARTITIONED_TEXT: &str = "Batching brokered messages with distinct SessionId or \
     PartitionKey is not supported for an entity with partitioning enabled.";

/// Azure's description for a batch refused by a partitioned entity with duplicate detection
/// (see [`partitioned_batch`]).
pub(crate) const DISTINCT_IDS_TEXT: &str = "Batching brokered messages with distinct SessionId, \
     PartitionKey, or MessageId is not supported for an entity with partitioning and duplicate \
     detection enabled.";

#[cfg(test)]
mod tests {
    use fe2o3_amqp_types::{
        messaging::{AmqpValue, Body, Message, MessageAnnotations, Properties},
        primitives::{Timestamp, Value},
    };

    use super::*;

    fn message(session: Option<&str>, id: &str) -> AmqpMessage {
        Message::builder()
            .properties(Properties {
                message_id: Some(id.to_owned().into()),
                group_id: session.map(str::to_owned),
                ..Default::default()
            })
            .body(Body::Value(AmqpValue(Value::Null)))
            .build()
    }

    const PARTITIONED_DEDUP: Admission = Admission {
        partitioned: true,
        duplicate_detection: true,
        requires_session: false,
    };
    const PARTITIONED: Admission = Admission {
        partitioned: true,
        duplicate_detection: false,
        requires_session: false,
    };
    const PLAIN: Admission = Admission {
        partitioned: false,
        duplicate_detection: true,
        requires_session: false,
    };

    #[test]
    fn partitioned_with_dedup_refuses_a_batch_of_distinct_message_ids() {
        let batch = [message(Some("s"), "a"), message(Some("s"), "b")];
        let refused = admit(&batch, PARTITIONED_DEDUP).unwrap_err();
        assert_eq!(refused.condition, "amqp:not-allowed");
        assert!(refused.description.starts_with(DISTINCT_IDS_TEXT));
        assert_eq!(admit(&batch, PARTITIONED), Ok(()));
        assert_eq!(admit(&batch, PLAIN), Ok(()));
        assert_eq!(admit(&batch[..1], PARTITIONED_DEDUP), Ok(()));
    }

    #[test]
    fn partitioned_refuses_a_batch_across_sessions() {
        let batch = [message(Some("s"), "a"), message(Some("t"), "a")];
        let refused = admit(&batch, PARTITIONED).unwrap_err();
        assert_eq!(refused.condition, "amqp:not-allowed");
        assert_eq!(
            refused.description,
            format!("{PARTITIONED_TEXT}PartitionKey:::SessionId:t::MessageId:a")
        );
        assert!(admit(&batch, PARTITIONED_DEDUP)
            .unwrap_err()
            .description
            .starts_with(DISTINCT_IDS_TEXT));
        assert_eq!(admit(&batch, PLAIN), Ok(()));
    }

    #[test]
    fn ids_longer_than_128_bytes_are_refused_and_128_pass() {
        let long = "x".repeat(129);
        let exact = "x".repeat(128);
        for m in [message(Some(&long), "a"), message(Some("s"), &long)] {
            let refused = admit(&[m], PLAIN).unwrap_err();
            assert_eq!(refused.condition, "com.microsoft:argument-out-of-range");
            assert!(refused.description.contains("129 bytes"), "{refused:?}");
        }
        assert_eq!(admit(&[message(Some(&exact), &exact)], PLAIN), Ok(()));
    }

    #[test]
    fn a_session_queue_refuses_a_message_without_session_id() {
        let queue = Admission {
            requires_session: true,
            ..PLAIN
        };
        let refused = admit(&[message(None, "a")], queue).unwrap_err();
        assert!(refused.description.starts_with("The SessionId was not set"));
        assert_eq!(admit(&[message(Some("s"), "a")], queue), Ok(()));
        assert_eq!(admit(&[message(None, "a")], PLAIN), Ok(()));
    }

    #[test]
    fn scheduled_messages_are_refused_as_not_implemented() {
        let mut m = message(Some("s"), "a");
        let mut annotations = MessageAnnotations::default();
        annotations.0.insert(
            fe2o3_amqp_types::primitives::Symbol::from(SCHEDULED_ENQUEUE_TIME).into(),
            Value::Timestamp(Timestamp::from_milliseconds(0)),
        );
        m.message_annotations = Some(annotations);
        let refused = admit(&[m], PLAIN).unwrap_err();
        assert_eq!(refused.condition, "amqp:not-implemented");
    }
}
