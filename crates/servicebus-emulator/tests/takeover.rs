//! Point 3: a receiver dies mid-session; the next one takes the session over and gets the
//! unsettled messages first, with delivery count + 1, and order is never broken.

mod common;

use std::time::Duration;

use azservicebus::ServiceBusSessionReceiverOptions;
use common::*;
use ordo_servicebus_emulator::EmulatorHandle;

#[test]
fn killed_receiver_session_is_taken_over_with_redelivery_first() {
    run(body());
}

async fn body() {
    let emulator = start_default().await;
    let connection_string = emulator.connection_string();
    let mut client = client(&emulator).await;
    let batch: Vec<_> = (1..=4)
        .map(|i| message("agg-7", &format!("agg-7:{i}"), format!("e{i}").as_bytes()))
        .collect();
    send(&mut client, batch).await;

    let first = FirstReceiver::spawn(connection_string);
    let first = first.crash_with_e2_unsettled(&emulator).await;
    assert_eq!(first[0].1, b"e1");
    assert_eq!(first[1].1, b"e2");

    eventually(10, || {
        let stats = emulator.stats();
        let entity = stats.entity(PATH).unwrap();
        entity.sessions.iter().all(|s| s.holder.is_none()) && entity.locked == 0
    })
    .await;

    the_next_receiver_takes_over(&emulator, &mut client, &first).await;
    emulator.shutdown().await;
}

/// What the first receiver received: each message's sequence number and body.
type Received = Vec<(i64, Vec<u8>)>;

/// The first receiver, on its own runtime; shutting that runtime down drops its TCP
/// connection without any AMQP goodbye, like a crashed process.
struct FirstReceiver {
    thread: std::thread::JoinHandle<Received>,
    /// Says the receiver has completed e1.
    completed: std::sync::mpsc::Receiver<()>,
    /// Tells the receiver to die.
    kill: std::sync::mpsc::Sender<()>,
}

impl FirstReceiver {
    /// Accepts `agg-7`, receives e1 and e2, completes e1 only, and waits to be killed.
    fn spawn(connection_string: String) -> Self {
        let (completed_tx, completed) = std::sync::mpsc::channel::<()>();
        let (kill, kill_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .stack_size(32 * 1024 * 1024)
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_stack_size(32 * 1024 * 1024)
                    .enable_all()
                    .build()
                    .unwrap();
                let got = rt.block_on(Box::pin(async move {
                    let mut client = azservicebus::ServiceBusClient::unsecured()
                        .new_from_connection_string(connection_string, Default::default())
                        .await
                        .unwrap();
                    let mut receiver = client
                        .accept_session_for_subscription(
                            TOPIC,
                            SUBSCRIPTION,
                            "agg-7",
                            ServiceBusSessionReceiverOptions::default(),
                        )
                        .await
                        .unwrap();
                    let mut got = Vec::new();
                    while got.len() < 2 {
                        let batch = receiver
                            .receive_messages_with_max_wait_time(
                                2 - got.len() as u32,
                                Some(Duration::from_secs(5)),
                            )
                            .await
                            .unwrap();
                        got.extend(batch);
                    }
                    // Settle only the first; the second stays locked when the process dies.
                    receiver.complete_message(&got[0]).await.unwrap();
                    // The client may return before its disposition left the socket: wait until
                    // the broker has applied it, so only e2 is unsettled at the crash.
                    completed_tx.send(()).unwrap();
                    kill_rx.recv().unwrap();
                    std::mem::forget(receiver);
                    std::mem::forget(client);
                    got.iter()
                        .map(|m| (m.sequence_number(), m.body().unwrap().to_vec()))
                        .collect::<Vec<_>>()
                }));
                rt.shutdown_background();
                got
            })
            .unwrap();
        Self {
            thread,
            completed,
            kill,
        }
    }

    /// Once the broker has applied the completion of e1 (three messages still active), kills
    /// the receiver: what it received.
    async fn crash_with_e2_unsettled(self, emulator: &EmulatorHandle) -> Received {
        let Self {
            thread,
            completed,
            kill,
        } = self;
        tokio::task::spawn_blocking(move || completed.recv().unwrap())
            .await
            .unwrap();
        eventually(10, || active(emulator, PATH) == 3).await;
        kill.send(()).unwrap();
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap()
    }
}

/// The next receiver gets the session, e2 first with its delivery count raised, then e3 and
/// e4, and completes them all.
async fn the_next_receiver_takes_over(
    emulator: &EmulatorHandle,
    client: &mut Client,
    first: &Received,
) {
    let mut receiver = accept(client, None).await.unwrap();
    assert_eq!(receiver.session_id(), "agg-7");
    let got = receive(&mut receiver, 3).await;
    assert_eq!(
        bodies_and_counts(&got),
        vec![
            (b"e2".to_vec(), Some(2)),
            (b"e3".to_vec(), Some(1)),
            (b"e4".to_vec(), Some(1)),
        ]
    );
    assert_eq!(got[0].sequence_number(), first[1].0);
    complete_all(&mut receiver, &got).await;
    eventually(5, || active(emulator, PATH) == 0).await;
}
