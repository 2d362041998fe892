//! What a message says: its event, its aggregate, and the block record a poison one leaves.

use super::*;

pub(super) fn selects(p: &dyn Projection, e: &Document) -> bool {
    p.selects(
        e.get_str("aggregateType").ok(),
        e.get_str("eventType").unwrap_or_default(),
    )
}

pub(super) fn decode<M: Delivery>(msg: &M) -> Result<Event, Fault> {
    let fault = |reason: &'static str, description: String| Fault {
        reason,
        description,
        projection: "*".into(),
    };
    Envelope::check_version(msg.envelope_version())
        .map_err(|e| fault(REASON_VERSION, e.to_string()))?;
    let body = msg.body().map_err(|e| fault(REASON_DECODE, e))?;
    let env = Envelope::decode(body).map_err(|e| match e {
        ordo_core::envelope::DecodeError::Version(_) => fault(REASON_VERSION, e.to_string()),
        _ => fault(REASON_DECODE, e.to_string()),
    })?;
    let doc = env
        .to_event_document()
        .map_err(|e| fault(REASON_DECODE, e.to_string()))?;
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
    decoded: &[Result<Event, Fault>],
) -> String {
    decoded
        .iter()
        .find_map(|d| d.as_ref().ok().map(|e| e.aggregate_id.clone()))
        .or_else(|| msgs.iter().find_map(|m| m.aggregate_id()))
        .unwrap_or_else(|| session_id.to_string())
}

/// Turns every event of another aggregate than `aggregate_id` into a fault of its own: a
/// session is one aggregate by contract (ordo-producer's session ids are injective), and an
/// event folded into another aggregate's model would corrupt it silently. Such a batch can
/// only come from another publisher; its event stays in the events collection, where
/// `reconcile` or `repair` of its own aggregate finds it.
pub(super) fn one_aggregate(
    decoded: Vec<Result<Event, Fault>>,
    aggregate_id: &str,
    session_id: &str,
) -> Vec<Result<Event, Fault>> {
    decoded
        .into_iter()
        .map(|d| match d {
            Ok(e) if e.aggregate_id != aggregate_id => Err(Fault {
                reason: REASON_FOREIGN,
                description: format!(
                    "event {} of aggregate {:?} arrived in session {session_id:?} with events of aggregate {aggregate_id:?}; one session must carry one aggregate",
                    e.version, e.aggregate_id
                ),
                projection: "*".into(),
            }),
            other => other,
        })
        .collect()
}

/// The `ordo_blocked` record of a poison. Under a `sha256:` session id (nothing in the batch
/// named the aggregate) the description says so: `repair` needs the real id.
pub(super) fn block_record(
    aggregate_id: &str,
    stop: &Stop,
    poison_message_id: String,
) -> BlockRecord {
    let mut description = stop.fault.description.clone();
    if aggregate_id.starts_with(HASHED_ID_PREFIX) {
        description.push_str(
            " (no message of the batch could be read: recorded under the session id, the digest of the aggregate id)",
        );
    }
    BlockRecord {
        aggregate_id: aggregate_id.to_string(),
        projection: stop.fault.projection.clone(),
        blocked_at_event_id: stop.version,
        reason: stop.fault.reason.to_string(),
        description,
        message_id: poison_message_id,
    }
}
