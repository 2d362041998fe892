//! The stand-ins' ceilings, measured in the same run as the producer: a plain change stream
//! draining N inserts, and the producer's publisher sending N messages with no producer
//! around it.

use super::*;

/// `n` events over `aggregates` aggregates named `{prefix}NNNN`, eventIds contiguous per
/// aggregate, round-robin (every batch touches many sessions, as a busy system does).
pub(super) fn events(n: usize, aggregates: usize, prefix: &str) -> Vec<Document> {
    let mut next = vec![1_i64; aggregates];
    (0..n)
        .map(|i| {
            let a = i % aggregates;
            let id = next[a];
            next[a] += 1;
            doc! {
                "aggregateId": format!("{prefix}{a:04}"),
                "aggregateType": "Account",
                "eventId": id,
                "eventType": "Deposited",
                "payload": { "amount": id, "memo": "benchmark event of a typical size" },
                "timestamp": mongodb::bson::DateTime::now(),
            }
        })
        .collect()
}

pub(super) async fn insert_all(coll: &mongodb::Collection<Document>, docs: Vec<Document>) {
    for chunk in docs.chunks(1000) {
        coll.insert_many(chunk.to_vec()).await.expect("insert");
    }
}

/// Insert → change stream: events/s read by a plain `watch()` while N events are inserted.
pub(super) async fn change_stream_ceiling(world: &World, n: usize, aggregates: usize) -> f64 {
    let coll = world
        .mongo
        .database()
        .collection::<Document>("ceiling_events");
    let mut stream = coll.watch().await.expect("watch");
    let reader = tokio::spawn(async move {
        let mut read = 0;
        while read < n {
            stream.next().await.expect("stream open").expect("event");
            read += 1;
        }
        Instant::now()
    });
    let docs = events(n, aggregates, "ceiling-");
    let started = Instant::now();
    insert_all(&coll, docs).await;
    let done = reader.await.expect("reader");
    n as f64 / done.duration_since(started).as_secs_f64()
}

/// `n` events of `aggregates` aggregates as the producer's batches: one session's messages,
/// up to its default `max_batch_messages` each.
pub(super) fn session_batches(n: usize, aggregates: usize) -> Vec<Vec<WireMessage>> {
    let max_batch = ProducerSection::default().max_batch_messages;
    let mut by_session: BTreeMap<String, Vec<WireMessage>> = BTreeMap::new();
    for mut d in events(n, aggregates, "sendceiling-") {
        d.insert("_id", ObjectId::new());
        let m = Envelope::from_event(&d, &EventFields::default(), "bench", "events")
            .expect("valid event")
            .to_message();
        by_session.entry(m.session_id.clone()).or_default().push(m);
    }
    by_session
        .into_values()
        .flat_map(|msgs| {
            msgs.chunks(max_batch)
                .map(<[WireMessage]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Raw batched sends: `senders` publishers draining per-session batches, as the producer's
/// workers do, with nothing else in the way.
pub(super) async fn send_ceiling(
    world: &World,
    n: usize,
    aggregates: usize,
    senders: usize,
) -> f64 {
    let batches = session_batches(n, aggregates);
    // The producer's own send path: on a partitioned topic with duplicate detection the broker
    // refuses batches and `auto` falls back to single sends, as the producer does.
    let factory = Arc::new(ModalPublisherFactory::new(
        ServiceBusPublisherFactory {
            connection_string: Secret::new(world.bus.connection_string()),
            topic: world.bus.topic().to_string(),
            identifier: "ordo-producer-bench".into(),
            max_batch_bytes: None,
            send_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(30),
            connections: Default::default(),
        },
        ProducerSection::default().send_mode,
    ));
    let mut publishers = Vec::new();
    for _ in 0..senders {
        publishers.push(factory.open().await.expect("open publisher"));
    }
    let queue = Arc::new(std::sync::Mutex::new(batches));
    let started = Instant::now();
    let tasks: Vec<_> = publishers
        .into_iter()
        .map(|mut p| {
            let queue = queue.clone();
            let factory = factory.clone();
            tokio::spawn(async move {
                let mut failures = Vec::new();
                loop {
                    let Some(batch) = queue.lock().unwrap().pop() else {
                        return failures;
                    };
                    // A send whose outcome the client loses (see the README on fe2o3-amqp
                    // 0.14) fails at its timeout; resend it on a new link as the producer does.
                    let mut attempts = 0;
                    while let Err(e) = p.publish(&batch).await {
                        attempts += 1;
                        // A refusal that repeats is not a lost outcome: stop, do not spin.
                        assert!(attempts < 5, "a batch failed {attempts} times: {e}");
                        failures.push(e.to_string());
                        p = factory.open().await.expect("open publisher");
                    }
                }
            })
        })
        .collect();
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await.expect("sender"));
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    if factory.single.load(std::sync::atomic::Ordering::SeqCst) {
        println!("  (the topic refused batches: these are single sends, as the producer's)");
    }
    if !failures.is_empty() {
        println!(
            "  (the send ceiling is understated: {} sends failed and were repeated: {})",
            failures.len(),
            failures.join("; ")
        );
    }
    rate
}
