//! A broker farther away than the projector's idle timeouts (another region is tens of
//! milliseconds away), under a backlog of small aggregates: every session is worked, not
//! released as idle before its first message arrives.

use std::time::Duration;

use ordo_e2e::stack::{emulator_config, project_a_workload, Stack};

/// A round trip longer than `busy_session_idle_timeout` (20 ms) and `session_idle_timeout`
/// (100 ms is not reached, but a backlog makes the busy timeout the one that applies).
const ROUND_TRIP: Duration = Duration::from_millis(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_50_ms_away_gets_every_event_applied_under_a_backlog() {
    let mut config = emulator_config(Duration::from_secs(5));
    config.namespace.round_trip = ROUND_TRIP;
    let mut stack = Stack::start_with(config).await.unwrap();
    if stack.bus.is_external() {
        eprintln!("skipped: the round trip is the emulator's");
        return;
    }
    // 150 users and 150 orders of 2 events each: more aggregates than the projector's 32
    // workers, so its accepts keep finding sessions and the busy idle timeout applies.
    project_a_workload(&mut stack, (150, 2, 50), Duration::from_millis(1), 120).await;
}
