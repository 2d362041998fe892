//! The session state a block writes, and its clearing by `repair`.
//!
//! A worker that blocks an aggregate records it in `ordo_blocked`, the record ordo reads, and
//! writes "blocked at vN (reason)" into the aggregate's Service Bus session state, for people
//! browsing the subscription. Workers do not read the state when they accept a session: that
//! would cost every session a `$management` link and a round trip, for a state that is empty
//! but for blocked aggregates. So the one who lifts a block clears the state: the worker that
//! wrote it, when a repair lifts the block while it still holds the session, and otherwise
//! `repair`, through [`clear`], once the block is lifted.

use std::time::Duration;

use ordo_core::envelope::session_id;
use ordo_core::retry::Backoff;
use ordo_core::servicebus::receiver::{
    AzureSessionSource, ReceiveError, SessionConnections, SessionReceiver,
};

use crate::store::BlockRecord;
use crate::ProjectorConfig;

/// How long `repair` tries to lock one aggregate's session while a worker holds it (a worker
/// releases a session after `session_idle_timeout` without messages).
const CLEAR_WAIT: Duration = Duration::from_secs(15);

/// The session state a block writes: "blocked at vN (reason)".
pub(crate) fn text(record: &BlockRecord) -> Vec<u8> {
    format!(
        "blocked at v{} ({})",
        record.blocked_at_event_id, record.reason
    )
    .into_bytes()
}

/// Clears the session state of each of `aggregate_ids`. Returns the aggregates whose state
/// could not be cleared, with why; their blocks are lifted all the same (the state is only
/// informational), and a later block or clear overwrites it.
pub async fn clear(cfg: &ProjectorConfig, aggregate_ids: &[String]) -> Vec<(String, ReceiveError)> {
    if aggregate_ids.is_empty() {
        return Vec::new();
    }
    let sb = &cfg.servicebus;
    let connections = SessionConnections::new(
        sb.connection_string(),
        &sb.topic,
        &sb.subscription,
        &format!("ordo-projector-admin-{}", std::process::id()),
        0,
        1,
    );
    let mut source = match connections.source(0).await {
        Ok(s) => s,
        Err(e) => {
            let text = e.to_string();
            return aggregate_ids
                .iter()
                .map(|id| (id.clone(), ReceiveError::Broker(text.clone())))
                .collect();
        }
    };
    let mut failed = Vec::new();
    for id in aggregate_ids {
        if let Err(e) = clear_one(&mut source, id, cfg.projector.retry_initial).await {
            failed.push((id.clone(), e));
        }
    }
    failed
}

/// Locks the aggregate's session (retrying while a worker holds it, for up to [`CLEAR_WAIT`]),
/// empties its state if it has one, and releases it.
async fn clear_one(
    source: &mut AzureSessionSource,
    aggregate_id: &str,
    retry: Duration,
) -> Result<(), ReceiveError> {
    let sid = session_id(aggregate_id);
    let deadline = tokio::time::Instant::now() + CLEAR_WAIT;
    let mut delays = Backoff {
        initial: retry.max(Duration::from_millis(50)),
        max: Duration::from_secs(1),
    }
    .delays();
    let mut session = loop {
        match source.accept_session(&sid, CLEAR_WAIT).await {
            Ok(s) => break s,
            Err(e @ ReceiveError::Refused { .. }) if tokio::time::Instant::now() >= deadline => {
                return Err(e)
            }
            Err(ReceiveError::Refused { .. }) => {
                tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(1))).await;
            }
            Err(e) => return Err(e),
        }
    };
    let cleared = match session.state().await {
        Ok(state) if state.is_empty() => Ok(false),
        Ok(_) => session.set_state(Vec::new()).await.map(|()| true),
        Err(e) => Err(e),
    };
    session.close().await;
    match cleared {
        Ok(true) => tracing::info!(aggregate = aggregate_id, "session state cleared"),
        Ok(false) => tracing::debug!(aggregate = aggregate_id, "session state already empty"),
        Err(_) => {}
    }
    cleared.map(|_| ())
}
