//! The broker never writes a transfer after its detach of the same link. A client that gives a
//! session receiver credit and detaches it in one breath (a session worker closing an idle
//! session: the drain, then the detach) has the broker's answer to its detach written by the
//! session at once, while the link's own task may still be handing over the transfer the credit
//! allowed. Written after the detach, that transfer names a handle the client no longer knows,
//! and a strict client ends the whole AMQP session on it, with every other link on it: the
//! session workers sharing a connection all lost their sessions at once. The client here is
//! fe2o3-amqp 0.18, which is strict about it. Deliveries of many small frames make the race
//! certain: the detach always lands while the broker's link is still writing them.

mod common;

use common::*;
use fe2o3_amqp::{
    link::receiver::CreditMode,
    types::{
        messaging::{Body, Source},
        primitives::Value,
    },
    Receiver, Session,
};

/// How many credit-then-detach rounds: the race is lost most rounds without the rule, and one
/// lost round ends the session.
const ROUNDS: usize = 10;

/// A body of many frames at the smallest frame size AMQP allows (512 bytes).
static BODY: [u8; 64 * 1024] = [b'x'; 64 * 1024];

#[test]
fn a_transfer_never_follows_the_detach_of_its_link() {
    run(body());
}

async fn body() {
    let emulator = start(batching_ordo()).await;
    let mut client = client(&emulator).await;
    let path = format!("{TOPIC}/Subscriptions/{SUBSCRIPTION}");

    // Small frames: a delivery takes a few hundred transfer frames, so the detach lands while
    // the broker's link is still handing them over.
    let mut connection = within(
        10,
        raw_connection_with(&emulator, "detach-order", Some(512)),
    )
    .await;
    let mut session = within(10, Session::begin(&mut connection)).await.unwrap();
    let mut witness = receiver(&mut session, "w", CreditMode::default()).await;

    for round in 0..ROUNDS {
        let id = format!("x{round}");
        send(&mut client, vec![message(&id, &format!("{id}:1"), &BODY)]).await;
        let mut doomed = receiver(&mut session, &id, CreditMode::Manual).await;
        // The link has taken the message and waits for credit.
        eventually(10, || emulator.stats().entity(&path).unwrap().locked == 1).await;
        within(10, doomed.set_credit(1)).await.unwrap();
        // Close at once: the transfer and the answer to this detach race in the broker.
        let _ = within(10, doomed.close()).await;

        // The session still works: the other link receives.
        send(&mut client, vec![message("w", &format!("w:{round}"), b"w")]).await;
        let delivery = within(10, witness.recv::<Body<Value>>())
            .await
            .unwrap_or_else(|e| panic!("round {round}: the session ended: {e}"));
        within(10, witness.accept(&delivery)).await.unwrap();

        // The closed receiver's message was given back (or delivered before the detach and
        // given back unsettled), not lost: another receiver gets it.
        let mut again = accept(&mut client, Some(&id)).await.unwrap();
        let got = receive(&mut again, 1).await;
        assert_eq!(got.len(), 1, "round {round}: {id}'s message is back");
        again.complete_message(&got[0]).await.unwrap();
        again.dispose().await.unwrap();
    }
    drop((witness, session, connection));
}

async fn receiver(
    session: &mut fe2o3_amqp::session::SessionHandle<()>,
    id: &str,
    credit: CreditMode,
) -> Receiver {
    within(
        10,
        Receiver::builder()
            .name(format!("receiver-{id}"))
            .credit_mode(credit)
            .source(
                Source::builder()
                    .address(format!("{TOPIC}/Subscriptions/{SUBSCRIPTION}"))
                    .add_to_filter_using_legacy_format(
                        "com.microsoft:session-filter",
                        Value::String(id.to_owned()),
                    )
                    .build(),
            )
            .attach(session),
    )
    .await
    .unwrap()
}
