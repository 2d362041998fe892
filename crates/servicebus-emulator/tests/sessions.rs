//! Sessions end to end with azservicebus: batches in, accept-next, settle, lock, state.

mod common;

use azservicebus::CreateMessageBatchOptions;
use common::*;

#[test]
fn batch_accept_next_receive_complete_renew_state() {
    run(batch_accept_next_receive_complete_renew_state_body());
}

async fn batch_accept_next_receive_complete_renew_state_body() {
    let emulator = start_default().await;
    let mut client = client(&emulator).await;
    let mut sender = sender(&mut client).await;
    let mut batch = sender
        .create_message_batch(CreateMessageBatchOptions::default())
        .unwrap();
    for i in 1..=3 {
        batch
            .try_add_message(message(
                "agg-1",
                &format!("agg-1:{i}"),
                format!("e{i}").as_bytes(),
            ))
            .unwrap();
    }
    within(10, sender.send_message_batch(batch)).await.unwrap();

    let mut receiver = accept(&mut client, None).await.unwrap();
    assert_eq!(receiver.session_id(), "agg-1");
    // The attach carries the expiry as .NET ticks, which azservicebus does not read; it learns
    // it from renew-session-lock.
    within(10, receiver.renew_session_lock()).await.unwrap();
    assert!(receiver.session_locked_until() > time_now());

    let mut got = within(10, receiver.receive_messages(3)).await.unwrap();
    while got.len() < 3 {
        got.extend(
            within(10, receiver.receive_messages(3 - got.len() as u32))
                .await
                .unwrap(),
        );
    }
    let bodies: Vec<_> = got.iter().map(|m| m.body().unwrap().to_vec()).collect();
    assert_eq!(bodies, vec![b"e1".to_vec(), b"e2".to_vec(), b"e3".to_vec()]);
    let seqs: Vec<_> = got.iter().map(|m| m.sequence_number()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(got[0].delivery_count(), Some(1));
    assert_eq!(got[0].session_id(), Some("agg-1"));

    complete_all(&mut receiver, &got).await;

    within(10, receiver.renew_session_lock()).await.unwrap();
    assert_eq!(
        within(10, receiver.session_state()).await.unwrap(),
        Vec::<u8>::new()
    );
    within(10, receiver.set_session_state(b"v3".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        within(10, receiver.session_state()).await.unwrap(),
        b"v3".to_vec()
    );

    eventually(5, || {
        active(&emulator, "ordo-events/Subscriptions/projector") == 0
    })
    .await;
    within(10, receiver.dispose()).await.unwrap();
    emulator.shutdown().await;
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// ReceiveAndDelete on a session subscription: messages are handed to the caller (settled
/// transfers that still carry a lock token, as the service sends) and gone from the broker.
#[test]
fn receive_and_delete_session_receiver_gets_every_message() {
    run(async {
        let emulator = start_default().await;
        let mut client = client(&emulator).await;
        let sent: Vec<_> = (1..=20).map(|i| format!("rd:{i}")).collect();
        send(
            &mut client,
            sent.iter()
                .map(|id| message("rd", id, id.as_bytes()))
                .collect(),
        )
        .await;
        let options = azservicebus::ServiceBusSessionReceiverOptions {
            receive_mode: azservicebus::ServiceBusReceiveMode::ReceiveAndDelete,
            ..Default::default()
        };
        let mut receiver = within(
            10,
            client.accept_session_for_subscription(TOPIC, SUBSCRIPTION, "rd", options),
        )
        .await
        .unwrap();
        let got = receive(&mut receiver, sent.len()).await;
        let ids: Vec<_> = got
            .iter()
            .map(|m| m.message_id().unwrap().into_owned())
            .collect();
        assert_eq!(ids, sent);
        assert_eq!(active(&emulator, PATH), 0);
        within(10, receiver.dispose()).await.unwrap();
        emulator.shutdown().await;
    });
}
