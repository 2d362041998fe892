//! Service Bus conventions on top of AMQP 1.0: annotation names and types, error conditions,
//! batch decoding and the shape of delivered messages.
//!
//! The annotation types matter: clients such as azservicebus abort on an unexpected type, so
//! sequence numbers are `long` and times are AMQP `timestamp`s, exactly as the service sends.

use fe2o3_amqp_types::{
    definitions::{self, ErrorCondition},
    messaging::{
        message::__private::{Deserializable, Serializable},
        Body, DeliveryAnnotations, Header, MessageAnnotations, MessageId,
    },
    primitives::{Symbol, Timestamp, Uuid, Value},
};

use serde_amqp::{described::Described, descriptor::Descriptor};

use crate::stats::DeadLetteredMessage;
use crate::store::{
    AmqpMessage, Delivery, LockError, Stored, DEAD_LETTER_DESCRIPTION, DEAD_LETTER_REASON,
};

/// Message format of a Service Bus batch: one `Data` section per encoded message.
pub(crate) const BATCH_FORMAT: u32 = 0x8001_3700;

pub(crate) const SEQUENCE_NUMBER: &str = "x-opt-sequence-number";
pub(crate) const ENQUEUED_TIME: &str = "x-opt-enqueued-time";
pub(crate) const LOCKED_UNTIL: &str = "x-opt-locked-until";
pub(crate) const ENQUEUE_SEQUENCE_NUMBER: &str = "x-opt-enqueue-sequence-number";
pub(crate) const PARTITION_KEY: &str = "x-opt-partition-key";
pub(crate) const LOCK_TOKEN: &str = "x-opt-lock-token";

pub(crate) const SESSION_FILTER: &str = "com.microsoft:session-filter";
pub(crate) const LOCKED_UNTIL_UTC: &str = "com.microsoft:locked-until-utc";

/// .NET ticks (100 ns since 0001-01-01) at the Unix epoch.
const DOTNET_TICKS_AT_UNIX_EPOCH: i64 = 621_355_968_000_000_000;

/// Unix milliseconds as .NET ticks, the unit of `com.microsoft:locked-until-utc`.
pub(crate) fn dotnet_ticks(unix_ms: i64) -> i64 {
    DOTNET_TICKS_AT_UNIX_EPOCH + unix_ms * 10_000
}
pub(crate) const LINK_TIMEOUT: &str = "com.microsoft:timeout";

pub(crate) const ERR_TIMEOUT: &str = "com.microsoft:timeout";
pub(crate) const ERR_SESSION_CANNOT_BE_LOCKED: &str = "com.microsoft:session-cannot-be-locked";
pub(crate) const ERR_SESSION_LOCK_LOST: &str = "com.microsoft:session-lock-lost";
pub(crate) const ERR_MESSAGE_LOCK_LOST: &str = "com.microsoft:message-lock-lost";
pub(crate) const ERR_NOT_FOUND: &str = "amqp:not-found";
pub(crate) const ERR_MESSAGE_NOT_FOUND: &str = "com.microsoft:message-not-found";
pub(crate) const ERR_ARGUMENT: &str = "com.microsoft:argument-error";
pub(crate) const ERR_NOT_IMPLEMENTED: &str = "amqp:not-implemented";
pub(crate) const ERR_NOT_ALLOWED: &str = "amqp:not-allowed";
pub(crate) const ERR_UNAUTHORIZED: &str = "amqp:unauthorized-access";
pub(crate) const ERR_ARGUMENT_OUT_OF_RANGE: &str = "com.microsoft:argument-out-of-range";

pub(crate) const SESSION_LOCK_LOST_TEXT: &str =
    "The session lock has expired or the session is not locked by this receiver.";
pub(crate) const MESSAGE_LOCK_LOST_TEXT: &str = "The lock supplied is invalid. Either the lock expired, or the message has already been removed from the queue.";

/// The error Service Bus reports for an operation under a lock that is gone.
pub(crate) fn lock_lost(e: LockError) -> definitions::Error {
    match e {
        LockError::SessionLockLost => error(ERR_SESSION_LOCK_LOST, SESSION_LOCK_LOST_TEXT),
        LockError::MessageLockLost => error(ERR_MESSAGE_LOCK_LOST, MESSAGE_LOCK_LOST_TEXT),
    }
}

/// An AMQP error with a (possibly vendor-specific) condition symbol. Like Service Bus it
/// carries an `info` map with a tracking id: Microsoft's Python SDK reads the error of a
/// rejected transfer as a three-field list and fails with an `IndexError` when `info` is left
/// out, never reporting the refusal.
pub(crate) fn error(condition: &str, description: impl Into<String>) -> definitions::Error {
    let mut info = definitions::Fields::new();
    info.insert(
        Symbol::from("com.microsoft:tracking-id"),
        Value::String(uuid::Uuid::new_v4().to_string()),
    );
    definitions::Error::new(
        ErrorCondition::Custom(Symbol::from(condition)),
        Some(description.into()),
        Some(info),
    )
}

/// `properties.message-id` as text, whatever its AMQP type.
pub(crate) fn message_id_text(message: &AmqpMessage) -> Option<String> {
    Some(match message.properties.as_ref()?.message_id.as_ref()? {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => uuid::Uuid::from_bytes(u.clone().into_inner()).to_string(),
        MessageId::Binary(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
    })
}

/// The `x-opt-partition-key` annotation, when present and a string.
pub(crate) fn partition_key(message: &AmqpMessage) -> Option<&str> {
    let annotations = &message.message_annotations.as_ref()?.0;
    match annotations
        .get(&PARTITION_KEY as &dyn fe2o3_amqp_types::messaging::annotations::AnnotationKey)?
    {
        Value::String(s) => Some(s.as_str()),
        _ => None,
    }
}

/// Concatenated `Data` sections of a body.
pub(crate) fn body_bytes(message: &AmqpMessage) -> Vec<u8> {
    match &message.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
        _ => Vec::new(),
    }
}

/// The inspection view of a stored dead-lettered message (what
/// [`crate::EmulatorHandle::dead_letters`] and the HTTP endpoint show).
pub(crate) fn dead_lettered_message(stored: &Stored) -> DeadLetteredMessage {
    use fe2o3_amqp_types::primitives::SimpleValue;

    let message = &stored.message;
    let app = message.application_properties.as_ref();
    let text = |name: &str| match app.and_then(|a| a.0.get(name)) {
        Some(SimpleValue::String(v)) => Some(v.clone()),
        _ => None,
    };
    DeadLetteredMessage {
        sequence_number: stored.seq,
        message_id: message_id_text(message),
        session_id: message.properties.as_ref().and_then(|p| p.group_id.clone()),
        reason: text(DEAD_LETTER_REASON),
        description: text(DEAD_LETTER_DESCRIPTION),
        delivery_count: stored.delivery_count,
        body: body_bytes(message),
    }
}

/// Splits a transfer into the messages it carries: itself, or each `Data` section of a batch.
pub(crate) fn unbatch(
    message: AmqpMessage,
    format: Option<u32>,
) -> Result<Vec<AmqpMessage>, String> {
    if format != Some(BATCH_FORMAT) {
        return Ok(vec![message]);
    }
    let Body::Data(sections) = message.body else {
        return Err("a batch (message format 0x80013700) must carry Data sections".into());
    };
    sections
        .into_inner()
        .into_iter()
        .map(|data| {
            // Annotation keys written as strings (uAMQP) are read as symbols, as for a single
            // message (vendor/README.md).
            serde_amqp::from_slice::<Deserializable<AmqpMessage>>(&data.0)
                .or_else(|e| {
                    let fixed =
                        fe2o3_amqp::frames::amqp::annotation_keys_as_symbols(&data.0).ok_or(e)?;
                    serde_amqp::from_slice::<Deserializable<AmqpMessage>>(&fixed)
                })
                .map(|d| d.0)
                .map_err(|e| format!("undecodable message in batch: {e}"))
        })
        .collect()
}

fn key(name: &str) -> fe2o3_amqp_types::messaging::annotations::OwnedKey {
    Symbol::from(name).into()
}

/// Adds the broker annotations every received or peeked message carries.
fn annotate(message: &mut AmqpMessage, seq: i64, enqueued_ms: i64, locked_until_ms: Option<i64>) {
    let annotations = message
        .message_annotations
        .get_or_insert_with(|| MessageAnnotations(Default::default()));
    annotations.0.insert(key(SEQUENCE_NUMBER), Value::Long(seq));
    annotations.0.insert(
        key(ENQUEUED_TIME),
        Value::Timestamp(Timestamp::from_milliseconds(enqueued_ms)),
    );
    annotations
        .0
        .insert(key(ENQUEUE_SEQUENCE_NUMBER), Value::Long(seq));
    if let Some(until) = locked_until_ms {
        annotations.0.insert(
            key(LOCKED_UNTIL),
            Value::Timestamp(Timestamp::from_milliseconds(until)),
        );
    }
}

fn header_with_count(message: &mut AmqpMessage, delivery_count: u32) {
    let header = message.header.get_or_insert_with(Header::default);
    header.delivery_count = delivery_count;
    header.first_acquirer = delivery_count == 0;
}

/// The message as a receiver sees it: broker annotations, lock token, header delivery-count;
/// `x-opt-locked-until` only for peek-lock.
pub(crate) fn delivered_message(delivery: &Delivery, peek_lock: bool) -> AmqpMessage {
    let mut message = (*delivery.message).clone();
    header_with_count(&mut message, delivery.delivery_count);
    annotate(
        &mut message,
        delivery.seq,
        delivery.enqueued_ms,
        peek_lock.then_some(delivery.locked_until_ms),
    );
    // Always sent, also to ReceiveAndDelete receivers: azservicebus fails a receive whose
    // delivery has neither this annotation nor a 16-byte tag (`LockTokenNotFound`), and in
    // that mode the message is already gone.
    let annotations = message
        .delivery_annotations
        .get_or_insert_with(|| DeliveryAnnotations(Default::default()));
    annotations.0.insert(
        key(LOCK_TOKEN),
        Value::Uuid(lock_token_uuid(delivery.token)),
    );
    message
}

/// A lock token as the AMQP uuid of `x-opt-lock-token` (RFC 4122 byte order).
pub(crate) fn lock_token_uuid(token: u128) -> Uuid {
    Uuid::from(uuid::Uuid::from_u128(token).into_bytes())
}

/// The delivery tag of a delivery: its lock token's 16 bytes in .NET `Guid` order, as Service
/// Bus sends them. Microsoft's SDKs take the lock token from the tag (`new Guid(tag)`,
/// `uuid.UUID(bytes_le=tag)`); azservicebus prefers `x-opt-lock-token`. Both name one GUID.
pub(crate) fn delivery_tag(token: u128) -> Vec<u8> {
    uuid::Uuid::from_u128(token).to_bytes_le().to_vec()
}

/// Descriptor code of the AMQP `header` section.
const HEADER_CODE: u64 = 0x70;

/// Encodes a message for delivery (or peek) the way Service Bus does: a header with every field present,
/// then the other sections. fe2o3-amqp leaves out header fields that hold their default value,
/// which AMQP allows, but Microsoft's SDKs then report a first delivery's delivery count as
/// `None` (Python) or `undefined` (JavaScript) instead of 0.
pub(crate) fn encode_delivered(mut message: AmqpMessage) -> Vec<u8> {
    let header = message.header.take().unwrap_or_default();
    let fields = vec![
        Value::Bool(header.durable),
        Value::Ubyte(header.priority.0),
        header.ttl.map(Value::Uint).unwrap_or(Value::Null),
        Value::Bool(header.first_acquirer),
        Value::Uint(header.delivery_count),
    ];
    let section = Described {
        descriptor: Descriptor::Code(HEADER_CODE),
        value: Value::List(fields),
    };
    let mut out = serde_amqp::to_vec(&section).unwrap_or_default();
    out.extend(encode(&message));
    out
}

/// Encoded form of a stored message for `$management` answers (peek).
pub(crate) fn encode_peeked(stored: &Stored) -> Vec<u8> {
    let mut message = (*stored.message).clone();
    header_with_count(&mut message, stored.delivery_count);
    annotate(&mut message, stored.seq, stored.enqueued_ms, None);
    encode_delivered(message)
}

pub(crate) fn encode(message: &AmqpMessage) -> Vec<u8> {
    serde_amqp::to_vec(&Serializable(message)).unwrap_or_default()
}

/// The lock token a delivery tag carries, when it is one of ours (16 bytes, .NET order).
pub(crate) fn token_from_tag(tag: &[u8]) -> Option<u128> {
    let bytes: [u8; 16] = tag.try_into().ok()?;
    Some(uuid::Uuid::from_bytes_le(bytes).as_u128())
}

/// A lock token from its wire form (AMQP uuid).
pub(crate) fn token_from_uuid(uuid: &Uuid) -> u128 {
    u128::from_be_bytes(*uuid.as_inner())
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp_types::{
        messaging::{message::__private::Deserializable, Body, Header},
        primitives::Value,
    };
    use serde_amqp::described::Described;

    use crate::store::AmqpMessage;

    #[test]
    fn delivered_header_has_every_field_even_at_defaults() {
        let message: AmqpMessage = fe2o3_amqp_types::messaging::Message::builder()
            .header(Header {
                first_acquirer: true,
                ..Header::default()
            })
            .body(Body::Value(fe2o3_amqp_types::messaging::AmqpValue(
                Value::String("x".into()),
            )))
            .build();
        let bytes = super::encode_delivered(message.clone());
        let header: Described<Value> = serde_amqp::from_slice(&bytes).unwrap();
        assert_eq!(
            header.value,
            Value::List(vec![
                Value::Bool(false),
                Value::Ubyte(4),
                Value::Null,
                Value::Bool(true),
                Value::Uint(0),
            ])
        );
        let decoded: Deserializable<AmqpMessage> = serde_amqp::from_slice(&bytes).unwrap();
        assert_eq!(decoded.0, message);
    }

    #[test]
    fn delivery_tag_and_annotation_name_the_same_guid() {
        let token = 0x0011_2233_4455_6677_8899_aabb_ccdd_eeff_u128;
        let annotation = super::lock_token_uuid(token);
        assert_eq!(super::token_from_uuid(&annotation), token);
        assert_eq!(
            uuid::Uuid::from_bytes(annotation.into_inner()).to_string(),
            "00112233-4455-6677-8899-aabbccddeeff"
        );
        assert_eq!(
            super::token_from_tag(&super::delivery_tag(token)),
            Some(token)
        );
        assert_eq!(super::token_from_tag(&[0, 0, 0, 1]), None);
        // .NET `new Guid(tag)` / Python `uuid.UUID(bytes_le=tag)`: the first three fields are
        // little-endian, the last eight bytes as they are.
        assert_eq!(
            super::delivery_tag(token),
            [
                0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff
            ]
        );
    }

    #[test]
    fn ticks_match_the_dotnet_epoch() {
        // 2024-01-01T00:00:00Z is 638396640000000000 ticks in .NET.
        assert_eq!(
            super::dotnet_ticks(1_704_067_200_000),
            638_396_640_000_000_000
        );
        assert_eq!(super::dotnet_ticks(0), 621_355_968_000_000_000);
    }
}
