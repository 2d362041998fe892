//! `[namespace] round_trip`: every answer of the broker reaches the client one configured
//! round trip later, as from a namespace in another building.

mod common;

use std::time::{Duration, Instant};

use azservicebus::ServiceBusSenderOptions;
use common::*;

/// Far above what an operation costs on loopback, so the difference is the configured delay.
const ROUND_TRIP: Duration = Duration::from_millis(400);

/// How long a send (its transfer outcome), a receive of a waiting message (credit out,
/// delivery back) and a `$management` call take. A settlement is not among them: azservicebus
/// returns from `complete_message` without waiting for the broker's settled disposition, which
/// the delay holds back like every other frame.
async fn timings(round_trip: Duration) -> [Duration; 3] {
    let mut config = batching_ordo();
    config.namespace.round_trip = round_trip;
    let emulator = start(config).await;
    let mut client = client(&emulator).await;
    let mut sender = within(
        30,
        client.create_sender(TOPIC, ServiceBusSenderOptions::default()),
    )
    .await
    .unwrap();
    let started = Instant::now();
    within(30, sender.send_message(message("r", "r:1", b"1")))
        .await
        .unwrap();
    let send = started.elapsed();
    let mut receiver = accept(&mut client, Some("r")).await.unwrap();
    let started = Instant::now();
    let got = receive(&mut receiver, 1).await;
    let received = started.elapsed();
    within(30, receiver.complete_message(&got[0]))
        .await
        .unwrap();
    let started = Instant::now();
    within(30, receiver.renew_session_lock()).await.unwrap();
    let renew = started.elapsed();
    emulator.shutdown().await;
    [send, received, renew]
}

#[test]
fn the_configured_round_trip_delays_outcomes_deliveries_and_management_answers() {
    run(async {
        let delayed = timings(ROUND_TRIP).await;
        for (what, took) in ["send", "receive", "renew-session-lock"]
            .iter()
            .zip(delayed)
        {
            assert!(
                took >= ROUND_TRIP,
                "{what} took {took:?} with a {ROUND_TRIP:?} round trip"
            );
        }
        let direct = timings(Duration::ZERO).await;
        for (what, took) in ["send", "receive", "renew-session-lock"].iter().zip(direct) {
            assert!(
                took < ROUND_TRIP,
                "{what} took {took:?} without a round trip"
            );
        }
    });
}
