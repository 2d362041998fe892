//! The producer on every topic layout Azure allows, with the default `send_mode = "auto"`:
//! partitioned with duplicate detection (batches of distinct ids refused, so the producer
//! falls back to one message per transfer), partitioned without it and unpartitioned (batches
//! accepted and used). In each, every read model equals the fold of the events collection.

use std::time::Duration;

use ordo_core::metrics as names;
use ordo_e2e::stack::{emulator_config, project_a_workload, Stack};
use ordo_testkit::Topology;

async fn publishes_every_event_on(topology: Topology) {
    let mut stack = Stack::start_with(topology.apply(emulator_config(Duration::from_secs(5))))
        .await
        .unwrap();
    if stack.bus.is_external() {
        eprintln!("skipping: the topic layout is the external namespace's own");
        return;
    }
    // 20 aggregates of 30 events, inserted 50 at a time: each change-stream batch holds
    // several events of one aggregate, so the producer forms batches of one session.
    project_a_workload(&mut stack, (10, 30, 21), Duration::from_millis(1), 180).await;

    let producer = stack.producer.as_ref().unwrap();
    let single = producer.metric(names::PUBLISH_SINGLE_SENDS).await;
    let messages = producer
        .metric(&format!("{}_sum", names::PUBLISH_BATCH_MESSAGES))
        .await;
    let batches = producer
        .metric(&format!("{}_count", names::PUBLISH_BATCH_MESSAGES))
        .await;
    assert!(
        messages > batches,
        "no batch of more than one message was formed ({messages} messages in {batches} batches), \
         so the layout's answer to a batch was never asked"
    );
    if topology.accepts_batches() {
        assert_eq!(
            single, 0.0,
            "{topology:?} accepts batches; the producer must keep them"
        );
    } else {
        assert_eq!(
            single, 1.0,
            "{topology:?} refuses batches; the producer must have fallen back to single sends"
        );
        let logs = producer.logs();
        assert_eq!(
            logs.matches("the topic refuses batches").count(),
            1,
            "the fallback is logged once, with what to change"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_with_duplicate_detection_falls_back_to_single_sends() {
    publishes_every_event_on(Topology::PartitionedDeduplicated).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_without_duplicate_detection_keeps_batches() {
    publishes_every_event_on(Topology::Partitioned).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unpartitioned_keeps_batches() {
    publishes_every_event_on(Topology::Unpartitioned).await;
}
