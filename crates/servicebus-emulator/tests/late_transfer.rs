//! A receiver link the client lets go of while a delivery to it is still on the wire costs
//! only that link. The broker sent the transfer before it saw the client's detach; the client
//! (the vendored fe2o3-amqp 0.14 under azservicebus) used to end the whole AMQP session on it,
//! and with it every other link of the session: session workers sharing a connection all lost
//! their sessions at once. The emulator's round trip holds the transfer back, so the client
//! drops its receiver first, every time.

mod common;

use std::time::Duration;

use common::*;
use fe2o3_amqp_client::{
    types::{messaging::Body, primitives::Value},
    Session,
};

#[test]
fn a_transfer_to_a_dropped_receiver_leaves_its_session_working() {
    run(body());
}

async fn body() {
    let mut config = batching_ordo();
    config.namespace.round_trip = Duration::from_millis(300);
    let emulator = start(config).await;
    let mut client = client(&emulator).await;

    let mut connection = client_connection(&emulator, "late-transfer").await;
    let mut session = within(10, Session::begin(&mut connection)).await.unwrap();
    // Two links on one AMQP session, as session workers sharing a connection have them.
    let mut witness = client_session_receiver(&mut session, "w").await;
    let doomed = client_session_receiver(&mut session, "x").await;

    send(&mut client, vec![message("x", "x:1", b"x1")]).await;
    // The broker has sent it (the message is locked to the link); the transfer reaches the
    // client a round trip later, after the receiver below is gone.
    let path = format!("{TOPIC}/Subscriptions/{SUBSCRIPTION}");
    eventually(10, || emulator.stats().entity(&path).unwrap().locked == 1).await;
    drop(doomed);

    send(&mut client, vec![message("w", "w:1", b"w1")]).await;
    let delivery = within(10, witness.recv::<Body<Value>>())
        .await
        .expect("the other link of the session still receives");
    within(10, witness.accept(&delivery)).await.unwrap();
    // The dropped receiver's message was given back, not lost.
    let mut again = accept(&mut client, Some("x")).await.unwrap();
    let got = receive(&mut again, 1).await;
    assert_eq!(got[0].body().unwrap(), b"x1");
    drop((witness, session, connection));
}
