//! What a message says: its event, its aggregate, and the block record a poison one leaves.

use super::Event;
use crate::settle::{Poison, Stop, REASON_DECODE, REASON_VERSION};
use crate::store::BlockRecord;
use ordo_core::envelope::{Envelope, HASHED_ID_PREFIX};
use ordo_core::servicebus::receiver::Delivery;

pub(super) fn decode<M: Delivery>(msg: &M) -> Result<Event, Poison> {
    let poison = |reason: &'static str, description: String| Poison {
        reason,
        description,
        projection: "*".into(),
    };
    Envelope::check_version(msg.envelope_version())
        .map_err(|e| poison(REASON_VERSION, e.to_string()))?;
    let body = msg.body().map_err(|e| poison(REASON_DECODE, e))?;
    let env = Envelope::decode(body).map_err(|e| match e {
        ordo_core::envelope::DecodeError::Version(_) => poison(REASON_VERSION, e.to_string()),
        _ => poison(REASON_DECODE, e.to_string()),
    })?;
    let doc = env
        .to_event_document()
        .map_err(|e| poison(REASON_DECODE, e.to_string()))?;
    Ok(Event {
        version: env.event_id,
        aggregate_id: env.aggregate_id.clone(),
        timestamp_ms: env.timestamp_millis(),
        doc,
    })
}

/// The aggregate a batch belongs to: from a decoded body, else from the `aggregateId`
/// property, else the session id (which is the aggregate id unless it was too long and is
/// its `sha256:` digest; a block recorded under a digest names it in its description).
pub(super) fn aggregate_of<M: Delivery>(
    session_id: &str,
    msgs: &[M],
    decoded: &[Result<Event, Poison>],
) -> String {
    decoded
        .iter()
        .find_map(|d| d.as_ref().ok().map(|e| e.aggregate_id.clone()))
        .or_else(|| msgs.iter().find_map(|m| m.aggregate_id()))
        .unwrap_or_else(|| session_id.to_string())
}

/// The `ordo_blocked` record of a poison. Under a `sha256:` session id (nothing in the batch
/// named the aggregate) the description says so: `repair` needs the real id.
pub(super) fn block_record(
    aggregate_id: &str,
    stop: &Stop,
    poison_message_id: String,
) -> BlockRecord {
    let mut description = stop.poison.description.clone();
    if aggregate_id.starts_with(HASHED_ID_PREFIX) {
        description.push_str(
            " (no message of the batch could be read: recorded under the session id, the digest of the aggregate id)",
        );
    }
    BlockRecord {
        aggregate_id: aggregate_id.to_string(),
        projection: stop.poison.projection.clone(),
        blocked_at_event_id: stop.version,
        reason: stop.poison.reason.to_string(),
        description,
        message_id: poison_message_id,
    }
}
