//! A client that closes its connection (an AMQP close) has closed its session receivers, even
//! where it sent no detach first, or its detach is still on the way: their unsettled messages
//! come back with the delivery count unchanged, as when the receiver itself closes
//! (`azure_rules/delivery.rs`). Only a connection that drops without a close loses its links (count + 1,
//! `takeover.rs`).

mod common;

use common::*;
use fe2o3_amqp_client::{
    types::{messaging::Body, primitives::Value},
    Session,
};

#[test]
fn closing_the_connection_closes_its_session_receivers() {
    run(body());
}

async fn body() {
    let emulator = start_default().await;
    let mut client = client(&emulator).await;
    let batch = vec![message("c", "c:1", b"1"), message("c", "c:2", b"2")];
    send(&mut client, batch).await;

    // A plain AMQP client: PLAIN login with the namespace key, a receiver on session "c".
    let mut connection = client_connection(&emulator, "closes-without-detach").await;
    let mut session = within(10, Session::begin(&mut connection)).await.unwrap();
    let mut receiver = client_session_receiver(&mut session, "c").await;
    for _ in 0..2 {
        within(10, receiver.recv::<Body<Value>>()).await.unwrap();
    }
    // Neither detach nor end: the close of the connection is the only goodbye.
    within(10, connection.close()).await.unwrap();
    let path = format!("{TOPIC}/Subscriptions/{SUBSCRIPTION}");
    eventually(10, || {
        let stats = emulator.stats();
        let e = stats.entity(&path).unwrap();
        e.locked == 0 && e.sessions.iter().all(|s| s.holder.is_none())
    })
    .await;
    drop((receiver, session));

    let mut again = accept(&mut client, Some("c")).await.unwrap();
    let got = receive(&mut again, 2).await;
    let counts: Vec<_> = got.iter().map(|m| m.delivery_count()).collect();
    // azservicebus reports the header's count + 1: Some(1) is a first delivery.
    assert_eq!(counts, vec![Some(1), Some(1)], "redelivered untouched");
}
