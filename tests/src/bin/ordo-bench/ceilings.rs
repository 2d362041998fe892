//! The stand-ins' raw ceilings, measured in the same run as the rows: inserts and the change
//! stream of the MongoDB stand-in, guarded updates, and batched sends to the emulator.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{doc, Document};
use mongodb::change_stream::event::ChangeStreamEvent;
use ordo_core::envelope::{Envelope, EventFields};
use ordo_core::secret::Secret;
use ordo_core::servicebus::sender::{Publisher, PublisherFactory, ServiceBusPublisherFactory};
use ordo_e2e::sample::{insert, Generator};
use ordo_e2e::stack::{Stack, TestServiceBus};

use crate::{split, CEILING_TOPIC};

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MongoCeilings {
    pub(crate) insert: f64,
    pub(crate) change_stream: f64,
    pub(crate) guarded_updates: f64,
    /// CPU seconds per event of a bare change-stream reader doing the producer's decoding.
    pub(crate) reader_cpu_per_event: f64,
}

/// CPU seconds the calling thread has used, to the nanosecond (`CLOCK_THREAD_CPUTIME_ID`,
/// which counts the running slice too). The bare reader uses about 0.1 s over its events, which
/// clock ticks (10 ms, `/proc/thread-self/stat`) measured only to about ±10 %, and
/// `/proc/thread-self/schedstat` lags the running slice by up to a scheduler tick.
fn thread_cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// Insert → change-stream ceiling, and the CPU a bare change-stream reader spends per event
/// doing what the producer does with each change (the envelope and the wire message). The
/// reader runs alone on its own thread and runtime, so that thread's CPU time is its cost.
pub(crate) async fn change_stream_ceiling(
    stack: &Stack,
    events: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let coll = stack.db().collection::<Document>("ceiling_events");
    let w = split((events / 20).max(2), 20.min(events.max(1)), 99);
    let total = w.total_events();
    let uri = stack.mongo.uri().to_string();
    let db_name = stack.mongo.db_name().to_string();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let reader = std::thread::spawn(move || -> anyhow::Result<(Instant, f64)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let client = mongodb::Client::with_uri_str(&uri).await?;
            let coll = client
                .database(&db_name)
                .collection::<Document>("ceiling_events");
            let mut stream = coll.watch().await?;
            let _ = ready_tx.send(());
            let cpu0 = thread_cpu_seconds();
            let fields = EventFields::default();
            let mut n = 0;
            let mut bytes = 0usize;
            while n < total {
                let change: ChangeStreamEvent<Document> = match stream.next().await {
                    Some(c) => c?,
                    None => bail!("change stream ended"),
                };
                if let Some(d) = change.full_document {
                    let m =
                        Envelope::from_event(&d, &fields, &db_name, "ceiling_events")?.to_message();
                    bytes += m.body.len();
                    n += 1;
                }
            }
            let cpu = thread_cpu_seconds() - cpu0;
            anyhow::ensure!(bytes > 0, "decoded nothing");
            Ok((Instant::now(), cpu))
        })
    });
    ready_rx.await.context("the bare reader did not start")?;
    let mut g = Generator::new(w, "ceiling-");
    let started = Instant::now();
    loop {
        let batch = g.next_batch(1000);
        if batch.is_empty() {
            break;
        }
        insert(&coll, batch).await?;
    }
    let inserted = started.elapsed().as_secs_f64();
    let (done, cpu) = tokio::task::spawn_blocking(move || reader.join())
        .await?
        .map_err(|_| anyhow::anyhow!("bare reader panicked"))??;
    let drained = done.duration_since(started).as_secs_f64();
    Ok((
        total as f64 / inserted,
        total as f64 / drained,
        cpu / total as f64,
    ))
}

/// Raw batched sends to a topic without subscriptions, one batch per session, `senders` in
/// parallel — the producer's publishing pattern without the producer.
pub(crate) async fn send_ceiling(
    bus: &TestServiceBus,
    events: usize,
    senders: usize,
) -> anyhow::Result<f64> {
    let w = split((events / 20).max(2), 20.min(events.max(1)), 98);
    let mut g = Generator::new(w, "ceiling-");
    let mut by_session: BTreeMap<String, Vec<ordo_core::envelope::WireMessage>> = BTreeMap::new();
    loop {
        let batch = g.next_batch(1000);
        if batch.is_empty() {
            break;
        }
        for mut d in batch {
            d.insert("_id", mongodb::bson::oid::ObjectId::new());
            let m =
                Envelope::from_event(&d, &EventFields::default(), "bench", "events")?.to_message();
            by_session.entry(m.session_id.clone()).or_default().push(m);
        }
    }
    let mut batches: Vec<Vec<ordo_core::envelope::WireMessage>> = Vec::new();
    for msgs in by_session.into_values() {
        for chunk in msgs.chunks(100) {
            batches.push(chunk.to_vec());
        }
    }
    let total: usize = batches.iter().map(Vec::len).sum();
    let factory = ServiceBusPublisherFactory {
        connection_string: Secret::new(bus.connection_string().to_string()),
        topic: CEILING_TOPIC.into(),
        identifier: "ordo-bench".into(),
        max_batch_bytes: None,
        send_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(10),
        connections: Default::default(),
    };
    let queue = Arc::new(tokio::sync::Mutex::new(batches));
    let mut publishers = Vec::new();
    for _ in 0..senders {
        publishers.push(factory.open().await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut p in publishers {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let next = queue.lock().await.pop();
                let Some(batch) = next else {
                    return Ok::<_, anyhow::Error>(());
                };
                p.publish(&batch).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Guarded single-document updates, 8 in flight: the projector's write pattern without it.
pub(crate) async fn guarded_update_ceiling(stack: &Stack) -> anyhow::Result<f64> {
    let coll = stack.db().collection::<Document>("ceiling_models");
    let docs = 200;
    let rounds = 10;
    coll.insert_many((0..docs).map(|i| doc! {"_id": format!("m{i}"), "lastEventId": 0_i64}))
        .await?;
    let started = Instant::now();
    for r in 0..rounds {
        futures::stream::iter(0..docs)
            .map(|i| {
                let coll = coll.clone();
                async move {
                    coll.update_one(
                        doc! {"_id": format!("m{i}"), "lastEventId": r as i64},
                        doc! {"$set": {"lastEventId": r as i64 + 1, "v": r}},
                    )
                    .await
                }
            })
            .buffer_unordered(8)
            .try_collect::<Vec<_>>()
            .await?;
    }
    Ok((docs * rounds) as f64 / started.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bare reader's CPU is about 0.1 s in all: a clock tick (10 ms) would be a tenth of
    /// it. A spinning thread's CPU time must move in steps far smaller than a tick, and the
    /// thread cannot use more CPU than the wall time it ran.
    #[test]
    fn a_threads_cpu_time_is_read_finer_than_a_clock_tick() {
        let cpu0 = thread_cpu_seconds();
        let started = Instant::now();
        let step = loop {
            std::hint::spin_loop();
            let d = thread_cpu_seconds() - cpu0;
            if d > 0.0 {
                break d;
            }
            assert!(
                started.elapsed().as_secs() < 5,
                "no CPU time counted in 5 s"
            );
        };
        assert!(
            step < 0.002,
            "the first step was {step} s: clock ticks, not nanoseconds"
        );
        // Spin for 20 ms of CPU: what was counted fits in the wall time it took.
        while thread_cpu_seconds() - cpu0 < 0.02 {
            std::hint::spin_loop();
        }
        let (cpu, wall) = (thread_cpu_seconds() - cpu0, started.elapsed().as_secs_f64());
        assert!(cpu <= wall + 0.001, "{cpu} s of CPU in {wall} s");
    }
}
