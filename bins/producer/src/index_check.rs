//! The events collection's unique (aggregateId, eventId) index: checked at start and every
//! `[producer] index_check_interval` (a minute by default), created when allowed, reported in
//! `ordo_events_index_enforced`.

use std::time::Duration;

use mongodb::Database;
use ordo_core::indexes::IndexState;
use ordo_core::metrics as names;
use ordo_core::retry::{Backoff, Retry};
use tokio_util::sync::CancellationToken;

/// Checks (and, when `[mongodb] create_indexes` allows, creates) the unique (aggregateId,
/// eventId) index of the events collection, at start and every `recheck`, retrying
/// with `backoff` while the database is unreachable. Its state is the
/// `ordo_events_index_enforced` gauge; a change is logged, a missing or non-unique index as a
/// warning: publishing does not need it, the projector does. Ends when `cancel` fires, also in
/// the middle of a check.
pub(crate) async fn check_event_index(
    db: Database,
    mongo: ordo_core::config::MongoConfig,
    recheck: Duration,
    backoff: Backoff,
    cancel: CancellationToken,
) {
    let coll = db.collection(&mongo.events_collection);
    let mut last: Option<String> = None;
    let mut retry = Retry::new("check_event_index", backoff);
    loop {
        let check =
            ordo_core::indexes::ensure_event_index(&coll, &mongo.fields, mongo.create_indexes);
        let Some(checked) = cancel.run_until_cancelled(check).await else {
            return;
        };
        let wait = match checked {
            Ok(state) => {
                retry.reset();
                report(&state, &mongo, &mut last);
                recheck
            }
            Err(e) => retry.next(ordo_core::mongo::error_reason(&e), &e),
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// Sets the gauge and logs the state when it changed since `last` (or the index was created).
fn report(state: &IndexState, mongo: &ordo_core::config::MongoConfig, last: &mut Option<String>) {
    let enforced = state.is_enforced();
    ::metrics::gauge!(names::EVENTS_INDEX_ENFORCED).set(if enforced { 1.0 } else { 0.0 });
    let text = state.to_string();
    // A creation is always told: it means the index was missing until now.
    let created = matches!(state, IndexState::Created);
    if created || last.as_deref() != Some(text.as_str()) {
        if enforced {
            tracing::info!(collection = %mongo.events_collection, "events index: {state}");
        } else {
            tracing::warn!(collection = %mongo.events_collection, create_indexes = mongo.create_indexes, "events index: {state}");
        }
        *last = Some(text);
    }
}
