//! Send modes: single sends keep every event in order; batches a topic refuses are retried and
//! the producer says what to change.

use super::*;

/// `send_mode = "single"` (for partitioned topics with duplicate detection, which refuse
/// batches of distinct ids): one message per transfer, still every event in order per
/// aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_sends_keep_every_event_in_order() {
    let world = World::start().await;
    let events = world.events();
    let mut writer = Writer::new(10, 24);
    let collector = Collector::start(&world.bus);
    let mut producer = world.spawn(ProducerSection {
        send_mode: SendMode::Single,
        ..tuning()
    });
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.write(&events, 200, 50).await;
    wait_distinct(&collector, 200, DEADLINE).await;
    stop(&mut producer).await;
    collector.stop().await.check(&writer.expected()).unwrap();
}

/// `send_mode = "batch"` on a topic that refuses batches (partitioned, duplicate detection on):
/// the refused batches are retried, not dropped, `/readyz` is 503, and the producer says once
/// what to change; with `auto` it would have fallen back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_mode_on_a_topic_that_refuses_batches_says_what_to_change() {
    let world = World::start().await;
    let events = world.events();
    let mut writer = Writer::new(2, 31);
    let mut producer = world.spawn(ProducerSection {
        send_mode: SendMode::Batch,
        ..tuning()
    });
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    // Several events per aggregate in one insert, so batches of more than one form.
    writer.write(&events, 40, 40).await;
    let p = &producer;
    wait_until(Duration::from_secs(30), || async move {
        p.metric(names::RETRIES).await >= 3.0 && !p.is_ready().await
    })
    .await;
    let logs = producer.logs();
    assert_eq!(
        logs.matches("set send_mode = \\\"auto\\\" or \\\"single\\\"")
            .count()
            + logs
                .matches("set send_mode = \"auto\" or \"single\"")
                .count(),
        1,
        "said once what to change:\n{logs}"
    );
    // A claim of one message may go through; the refused batches are not counted as sent.
    assert!(p.metric(names::EVENTS_PUBLISHED).await < 40.0);
    stop(&mut producer).await;
}
