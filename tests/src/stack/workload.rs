//! Driving a run: write a workload into the events collection, wait until every read model
//! caught up, and check each equals its fold.

use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};

use super::Stack;
use crate::sample::{insert, Generator, Workload};

/// Inserts the whole `workload` in batches of 50, each after `pace`.
pub async fn write(stack: &Stack, generator: &mut Generator, events: usize, pace: Duration) {
    let collection = stack.db().collection::<Document>("events");
    let mut written = 0;
    let mut ticker = tokio::time::interval(pace);
    while written < events {
        ticker.tick().await;
        let batch = generator.next_batch(50.min(events - written));
        assert!(!batch.is_empty(), "the generator ran dry at {written}");
        written += batch.len();
        insert(&collection, batch).await.unwrap();
    }
}

/// Waits until every read model reached its aggregate's last event, then checks each equals
/// the fold; returns the number of events folded.
pub async fn caught_up_and_folded(stack: &mut Stack, within: Duration) -> usize {
    caught_up_and_folded_for(stack, within, "").await
}

/// [`caught_up_and_folded`], with `context` (a seed, a layout) in every failure message.
pub async fn caught_up_and_folded_for(stack: &mut Stack, within: Duration, context: &str) -> usize {
    let deadline = Instant::now() + within;
    loop {
        if let Err(e) = stack.check_alive() {
            panic!("{context}: {e}");
        }
        let (done, aggregates) = stack.caught_up().await.unwrap();
        if aggregates > 0 && done == aggregates {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: read models did not catch up: {done}/{aggregates}"
        );
        tokio::time::sleep(ordo_testkit::wait::POLL_INTERVAL).await;
    }
    let verdict = stack.verify().await.unwrap();
    assert!(
        verdict.ok(),
        "{context}: {} read models differ from the fold, e.g. {:?}",
        verdict.mismatches.len(),
        verdict.mismatches.first()
    );
    let aggregates = stack
        .db()
        .collection::<Document>("events")
        .distinct("aggregateId", doc! {})
        .await
        .unwrap()
        .len();
    assert_eq!(
        verdict.aggregates, aggregates,
        "{context}: every aggregate written has a read model equal to its fold"
    );
    verdict.events
}

/// Starts both daemons on `stack`, writes `users` users and as many orders of
/// `events_per_aggregate` events each (seeded) in batches `pace` apart, and checks every event
/// reaches its read model within `within_s` seconds.
pub async fn project_a_workload(
    stack: &mut Stack,
    (users, events_per_aggregate, seed): (usize, usize, u64),
    pace: Duration,
    within_s: u64,
) {
    stack.spawn_producer().await.unwrap();
    stack.spawn_projector(0).await.unwrap();
    let workload = Workload {
        users,
        orders: users,
        events_per_aggregate,
        seed,
    };
    let mut generator = Generator::new(workload, "");
    write(stack, &mut generator, workload.total_events(), pace).await;
    let folded = caught_up_and_folded(stack, Duration::from_secs(within_s)).await;
    assert_eq!(folded, workload.total_events());
}
