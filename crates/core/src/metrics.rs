//! Every metric name ordo exports, in one place, so dashboards and docs can rely on them.
//!
//! Counters end in `_total`, durations are seconds. Labels are noted per name.

/// Events published and acknowledged by Service Bus (producer).
pub const EVENTS_PUBLISHED: &str = "ordo_events_published_total";
/// Time from taking an event off the change stream to the broker's acknowledgement (producer).
pub const PUBLISH_LATENCY: &str = "ordo_publish_latency_seconds";
/// Now minus the cluster time of the newest change-stream event seen (producer).
pub const CHANGE_STREAM_LAG: &str = "ordo_change_stream_lag_seconds";
/// Now minus the wall time of the last saved checkpoint (producer).
pub const CHECKPOINT_AGE: &str = "ordo_checkpoint_age_seconds";
/// Checkpoints written (producer).
pub const CHECKPOINTS_SAVED: &str = "ordo_checkpoints_saved_total";
/// Events that could not be published and were parked; label `reason` (producer).
pub const EVENTS_PARKED: &str = "ordo_events_parked_total";
/// Times the change stream's history was lost and events were re-published from the
/// collection; label `cause` (producer).
pub const HISTORY_LOST: &str = "ordo_history_lost_total";
/// Events re-published by recovery or the `beginning` start mode (producer).
pub const EVENTS_REPUBLISHED: &str = "ordo_events_republished_total";
/// Messages per batch sent to the broker; one session per batch (producer).
pub const PUBLISH_BATCH_MESSAGES: &str = "ordo_publish_batch_messages";
/// 1 while the producer sends one message per transfer: `send_mode = "single"`, or `auto`
/// after the topic refused a batch (partitioning with duplicate detection); 0 while it sends
/// batches (producer).
pub const PUBLISH_SINGLE_SENDS: &str = "ordo_publish_single_sends";
/// 1 while this producer holds the stream's lease (producer).
pub const LEASE_HELD: &str = "ordo_lease_held";
/// 1 while `/readyz` answers 200, else 0: readiness for scrapers without HTTP probes (both).
pub const READY: &str = "ordo_ready";
/// 1 while the events collection has its unique (aggregateId, eventId) index, 0 when it is
/// missing or not unique; checked at start and every `index_check_interval` (producer).
pub const EVENTS_INDEX_ENFORCED: &str = "ordo_events_index_enforced";
/// Retries of a failed operation; labels `operation` and `reason` (both).
pub const RETRIES: &str = "ordo_retries_total";
/// Long-running tasks restarted after they panicked or failed; label `task` (producer).
pub const TASK_RESTARTS: &str = "ordo_task_restarts_total";
/// Items read and not yet part of the acknowledged prefix (producer).
pub const UNACKNOWLEDGED: &str = "ordo_unacknowledged_items";
/// Seconds the acknowledged prefix has not moved while items wait behind it; 0 when it moves
/// or nothing waits (producer).
pub const CHECKPOINT_STUCK: &str = "ordo_checkpoint_stuck_seconds";

/// Events applied to read models (projector).
pub const EVENTS_APPLIED: &str = "ordo_events_applied_total";
/// Time to apply one batch: fold, write, settle (projector).
pub const APPLY_LATENCY: &str = "ordo_apply_latency_seconds";
/// Now minus the event's own timestamp, when applied (projector).
pub const END_TO_END_LAG: &str = "ordo_end_to_end_lag_seconds";
/// Messages whose version was already applied (projector).
pub const DUPLICATES: &str = "ordo_duplicates_total";
/// Events read from the events collection to fill a gap (projector). The name keeps the
/// word "healed" it was published with, so dashboards and alerts on it keep working.
pub const GAP_EVENTS_FILLED: &str = "ordo_gap_events_healed_total";
/// Messages dead-lettered; label `reason` (projector).
pub const DEAD_LETTERED: &str = "ordo_dead_lettered_total";
/// Aggregates blocked by this process since start (projector).
pub const AGGREGATES_BLOCKED: &str = "ordo_aggregates_blocked_total";
/// Blocked aggregates currently recorded in `ordo_blocked` (projector).
pub const BLOCKED_AGGREGATES: &str = "ordo_blocked_aggregates";
/// Sessions this process holds now (projector).
pub const SESSIONS_HELD: &str = "ordo_sessions_held";
/// Session lock renewals (projector).
pub const LOCK_RENEWALS: &str = "ordo_lock_renewals_total";
/// Session locks lost before the worker released them (projector).
pub const LOCKS_LOST: &str = "ordo_locks_lost_total";
/// Version guards that failed because another writer moved the document (projector).
pub const GUARD_CONFLICTS: &str = "ordo_guard_conflicts_total";
/// Reconciliation runs finished, by `mode` (`full`, `incremental`) (projector).
pub const RECONCILE_RUNS: &str = "ordo_reconcile_runs_total";
/// Aggregates whose read models reconciliation compared with the events collection (projector).
pub const RECONCILE_CHECKED: &str = "ordo_reconcile_aggregates_checked_total";
/// Read models reconciliation caught up with the events collection (projector). The name
/// keeps the word "healed" it was published with, so dashboards and alerts on it keep working.
pub const RECONCILE_CAUGHT_UP: &str = "ordo_reconcile_read_models_healed_total";
/// Duration of one reconciliation run (projector).
pub const RECONCILE_DURATION: &str = "ordo_reconcile_duration_seconds";

/// Every name above, for the docs test and the `/metrics` smoke test.
pub const ALL: &[&str] = &[
    READY,
    EVENTS_INDEX_ENFORCED,
    EVENTS_PUBLISHED,
    PUBLISH_LATENCY,
    CHANGE_STREAM_LAG,
    CHECKPOINT_AGE,
    CHECKPOINTS_SAVED,
    EVENTS_PARKED,
    HISTORY_LOST,
    EVENTS_REPUBLISHED,
    PUBLISH_BATCH_MESSAGES,
    PUBLISH_SINGLE_SENDS,
    LEASE_HELD,
    RETRIES,
    TASK_RESTARTS,
    UNACKNOWLEDGED,
    CHECKPOINT_STUCK,
    EVENTS_APPLIED,
    APPLY_LATENCY,
    END_TO_END_LAG,
    DUPLICATES,
    GAP_EVENTS_FILLED,
    DEAD_LETTERED,
    AGGREGATES_BLOCKED,
    BLOCKED_AGGREGATES,
    SESSIONS_HELD,
    LOCK_RENEWALS,
    LOCKS_LOST,
    GUARD_CONFLICTS,
    RECONCILE_RUNS,
    RECONCILE_CHECKED,
    RECONCILE_CAUGHT_UP,
    RECONCILE_DURATION,
];
