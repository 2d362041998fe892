//! Flow control under load: pipelined and multi-frame transfers from several connections must
//! each get their outcome, and replies sent back to back must all arrive.

mod common;

use std::time::Duration;

use azservicebus::CreateMessageBatchOptions;
use common::*;

const CONNECTIONS: usize = 4;
const SESSIONS: usize = 200;
const BATCHES: usize = 50;
const PER_BATCH: usize = 100;

/// Every batch send must be answered promptly: a missing disposition would leave the client
/// waiting for its send timeout.
#[test]
fn concurrent_batch_sends_from_several_connections_are_all_answered() {
    run(async {
        let emulator = start_default().await;
        let mut tasks = Vec::new();
        for c in 0..CONNECTIONS {
            let mut client = client(&emulator).await;
            tasks.push(tokio::spawn(async move {
                let mut sender = sender(&mut client).await;
                for b in 0..BATCHES {
                    let mut batch = sender
                        .create_message_batch(CreateMessageBatchOptions::default())
                        .unwrap();
                    for i in 0..PER_BATCH {
                        let n = (c * BATCHES + b) * PER_BATCH + i;
                        // Sizes vary so that some batches span several transfer frames.
                        let body = vec![b'x'; 256 + (n * 37) % 4000];
                        batch
                            .try_add_message(message(
                                &format!("s{}", n % SESSIONS),
                                &format!("m{n}"),
                                &body,
                            ))
                            .unwrap();
                    }
                    tokio::time::timeout(Duration::from_secs(10), sender.send_message_batch(batch))
                        .await
                        .unwrap_or_else(|_| panic!("connection {c} batch {b} got no answer"))
                        .unwrap();
                }
                within(10, sender.dispose()).await.unwrap();
                within(10, client.dispose()).await.unwrap();
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let total = CONNECTIONS * BATCHES * PER_BATCH;
        let stats = emulator.stats();
        assert_eq!(
            stats.entity(PATH).expect("subscription stats").active,
            total
        );
        emulator.shutdown().await;
    });
}

/// Lock renewals answered back to back all complete, each extending the lock.
#[test]
fn renew_message_lock_always_completes() {
    run(async {
        let emulator = start(short_config(Duration::from_secs(30), 10)).await;
        let mut client = client(&emulator).await;
        send(
            &mut client,
            (1..=5)
                .map(|i| message("rl", &format!("rl:{i}"), b"x"))
                .collect(),
        )
        .await;
        let mut receiver = accept(&mut client, Some("rl")).await.unwrap();
        let mut got = receive(&mut receiver, 5).await;
        for round in 0..40 {
            for m in got.iter_mut() {
                let before = m.locked_until();
                tokio::time::timeout(Duration::from_secs(5), receiver.renew_message_lock(m))
                    .await
                    .unwrap_or_else(|_| panic!("renewal {round} got no answer"))
                    .unwrap();
                assert!(m.locked_until() >= before);
            }
        }
        complete_all(&mut receiver, &got).await;
        eventually(10, || {
            let stats = emulator.stats();
            let sub = stats.entity(PATH).unwrap();
            sub.active + sub.locked == 0
        })
        .await;
        emulator.shutdown().await;
    });
}
