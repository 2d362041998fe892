//! Session and message ids bounded to what Service Bus accepts: kept as they are, or replaced
//! by a digest when longer than [`MAX_ID_LEN`] bytes or when they look like a digest.

use sha2::{Digest, Sha256};

use super::{HASHED_ID_PREFIX, MAX_ID_LEN};

fn digest(text: &str) -> String {
    let hash = Sha256::digest(text.as_bytes());
    format!("{HASHED_ID_PREFIX}{}", hex::encode(hash))
}

fn bounded(id: String) -> String {
    // The prefix without case: Service Bus is reported to compare session ids so.
    let looks_hashed = id
        .get(..HASHED_ID_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(HASHED_ID_PREFIX));
    if id.len() > MAX_ID_LEN || looks_hashed {
        digest(&id)
    } else {
        id
    }
}

/// SessionId (and PartitionKey) of an aggregate: the id itself, or its digest when longer than
/// 128 bytes or when it starts with [`HASHED_ID_PREFIX`].
pub fn session_id(aggregate_id: &str) -> String {
    bounded(aggregate_id.to_string())
}

/// MessageId of an event: `"{aggregateId}:{eventId}"`, or its digest when longer than 128
/// bytes or when it starts with [`HASHED_ID_PREFIX`].
pub fn message_id(aggregate_id: &str, event_id: i64) -> String {
    bounded(format!("{aggregate_id}:{event_id}"))
}
