//! Throughput of the embedded emulator driven by azservicebus over loopback.
//!
//! `cargo bench -p ordo-servicebus-emulator --bench throughput` (release). Prints the rate at
//! which 1 KiB messages are accepted when sent in per-session batches, and the rate at which
//! session receivers get and complete them.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use azservicebus::{
    CreateMessageBatchOptions, ServiceBusClient, ServiceBusClientOptions, ServiceBusMessage,
    ServiceBusRetryOptions, ServiceBusSenderOptions, ServiceBusSessionReceiverOptions,
};
use ordo_servicebus_emulator::{Emulator, EmulatorConfig, EmulatorHandle};

const TOPIC: &str = "ordo-events";
const SUBSCRIPTION: &str = "projector";
const SESSIONS: usize = 400;
const PER_SESSION: usize = 100;
const BODY_BYTES: usize = 1024;
const SENDERS: usize = 4;
const RECEIVERS: usize = 32;

fn main() {
    const STACK: usize = 32 * 1024 * 1024;
    std::thread::Builder::new()
        .stack_size(STACK)
        .spawn(|| {
            tokio::runtime::Builder::new_multi_thread()
                .thread_stack_size(STACK)
                .enable_all()
                .build()
                .unwrap()
                .block_on(Box::pin(bench()))
        })
        .unwrap()
        .join()
        .unwrap();
}

/// ordo's topic without duplicate detection: with it, a partitioned topic refuses batches of
/// distinct message ids (Azure's rule, `rules.rs`), and this measures batched sends.
async fn start() -> EmulatorHandle {
    let mut cfg = EmulatorConfig::default_ordo();
    cfg.topics[0].duplicate_detection_window = None;
    Emulator::start_on_free_loopback(cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn client(cs: &str) -> ServiceBusClient<azservicebus::core::BasicRetryPolicy> {
    ServiceBusClient::unsecured()
        .new_from_connection_string(
            cs,
            ServiceBusClientOptions {
                // As ordo's clients: azservicebus 0.25 retries a refused transfer by reporting
                // the already-settled messages as sent, so a refusal would pass for a send.
                retry_options: ServiceBusRetryOptions {
                    max_retries: 0,
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap()
}

async fn bench() {
    let emulator = Arc::new(start().await);
    let cs = emulator.connection_string();
    let total = SESSIONS * PER_SESSION;

    let send_secs = send_all(&cs).await;
    println!(
        "send: {total} messages of {BODY_BYTES} B in {send_secs:.2}s = {:.0} msg/s ({SENDERS} senders, batches of up to {PER_SESSION} per session)",
        total as f64 / send_secs
    );

    let received = Arc::new(AtomicUsize::new(0));
    let watchdog = tokio::spawn(exit_when_stalled(received.clone(), emulator.clone()));
    let started = Instant::now();
    let tasks: Vec<_> = (0..RECEIVERS)
        .map(|_| tokio::spawn(receive_until(cs.clone(), received.clone(), total)))
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let recv_secs = started.elapsed().as_secs_f64();
    watchdog.abort();
    let _ = watchdog.await;
    println!(
        "receive+complete: {total} messages in {recv_secs:.2}s = {:.0} msg/s ({RECEIVERS} session receivers)",
        total as f64 / recv_secs
    );
    Arc::try_unwrap(emulator).unwrap().shutdown().await;
}

/// Sends every session's messages, one batch per session, each sender task owning a client and
/// a slice of the sessions; the seconds it took.
async fn send_all(cs: &str) -> f64 {
    let body = vec![b'x'; BODY_BYTES];
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let mut c = client(cs).await;
        let sender = c
            .create_sender(TOPIC, ServiceBusSenderOptions::default())
            .await
            .unwrap();
        senders.push((s, c, sender));
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (s, c, mut sender) in senders {
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let _c = c;
            for session in (s..SESSIONS).step_by(SENDERS) {
                let id = format!("agg-{session}");
                let mut batch = sender
                    .create_message_batch(CreateMessageBatchOptions::default())
                    .unwrap();
                for i in 0..PER_SESSION {
                    let mut m = ServiceBusMessage::new(body.clone());
                    m.set_message_id(format!("{id}:{i}")).unwrap();
                    m.set_session_id(Some(id.clone())).unwrap();
                    // 100 x 1 KiB fits the 256 KiB limit.
                    batch.try_add_message(m).unwrap();
                }
                sender.send_message_batch(batch).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    started.elapsed().as_secs_f64()
}

/// One session receiver: accepts sessions and completes their messages until `received`
/// reaches `total`.
async fn receive_until(cs: String, received: Arc<AtomicUsize>, total: usize) {
    let mut c = client(&cs).await;
    while received.load(Ordering::Relaxed) < total {
        let accepted = tokio::time::timeout(
            Duration::from_secs(2),
            c.accept_next_session_for_subscription(
                TOPIC,
                SUBSCRIPTION,
                ServiceBusSessionReceiverOptions {
                    prefetch_count: PER_SESSION as u32,
                    ..Default::default()
                },
            ),
        )
        .await;
        let Ok(Ok(mut receiver)) = accepted else {
            continue;
        };
        loop {
            let batch = receiver
                .receive_messages_with_max_wait_time(
                    PER_SESSION as u32,
                    Some(Duration::from_millis(100)),
                )
                .await
                .unwrap();
            if batch.is_empty() {
                break;
            }
            for m in &batch {
                receiver.complete_message(m).await.unwrap();
            }
            received.fetch_add(batch.len(), Ordering::Relaxed);
        }
        let _ = receiver.dispose().await;
    }
}

/// Reports the emulator's entities and exits (instead of hanging) when nothing is received
/// for 10 s.
async fn exit_when_stalled(received: Arc<AtomicUsize>, emulator: Arc<EmulatorHandle>) {
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let now = received.load(Ordering::Relaxed);
        if now == last {
            eprintln!("stalled at {now}: {:?}", emulator.stats().entities);
            std::process::exit(1);
        }
        last = now;
    }
}
