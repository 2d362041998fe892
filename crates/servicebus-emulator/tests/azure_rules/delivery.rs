//! What becomes of messages once they are in: one without a session id on a session
//! subscription, dead-lettered ones past their time-to-live, and the ones a closed session
//! receiver held.

use std::time::Duration;

use azservicebus::{
    primitives::sub_queue::SubQueue, receiver::DeadLetterOptions, ServiceBusReceiverOptions,
};

use super::*;

#[test]
fn a_message_without_session_id_is_dead_lettered_on_the_session_subscription_only() {
    with_rules(async |emulator, client| {
        let mut m = ServiceBusMessage::new(b"no session".to_vec());
        m.set_message_id("n:1").unwrap();
        send_to(client, "mixed", vec![m]).await.unwrap();
        assert_eq!(active(emulator, "mixed/Subscriptions/plain"), 1);
        let dead = emulator.subscription_dead_letters("mixed", "s").unwrap();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].reason.as_deref(), Some("Session id is null."));
        assert_eq!(
            dead[0].description.as_deref(),
            Some(
                "Session enabled entity doesn't allow a message whose session identifier is null."
            )
        );
        assert_eq!(active(emulator, "mixed/Subscriptions/s"), 0);
    });
}

#[test]
fn dead_lettered_messages_never_expire() {
    with_rules(async |emulator, client| {
        let ttl = Duration::from_secs(1);
        let mut m = ServiceBusMessage::new(b"short-lived".to_vec());
        m.set_message_id("t:1").unwrap();
        m.set_time_to_live(ttl).unwrap();
        let sent_at = std::time::Instant::now();
        send_to(client, "mixed", vec![m]).await.unwrap();
        let mut receiver = within(
            10,
            client.create_receiver_for_subscription("mixed", "plain", Default::default()),
        )
        .await
        .unwrap();
        let got = within(10, receiver.receive_message()).await.unwrap();
        within(
            10,
            receiver.dead_letter_message(&got, DeadLetterOptions::default()),
        )
        .await
        .unwrap();
        // Past the message's time-to-live, and past a sweep of the entity.
        let dlq = "mixed/Subscriptions/plain";
        eventually(10, || sent_at.elapsed() > ttl + Duration::from_millis(300)).await;
        assert_eq!(emulator.dead_letters(dlq).unwrap().len(), 1);
        let options = ServiceBusReceiverOptions {
            sub_queue: SubQueue::DeadLetter,
            ..Default::default()
        };
        let mut dead = within(
            10,
            client.create_receiver_for_subscription("mixed", "plain", options),
        )
        .await
        .unwrap();
        let again = within(
            10,
            dead.receive_messages_with_max_wait_time(1, Some(Duration::from_secs(3))),
        )
        .await
        .unwrap();
        assert_eq!(again.len(), 1, "the dead-lettered message is still there");
        assert_eq!(again[0].body().unwrap(), b"short-lived");
    });
}

#[test]
fn closing_a_session_receiver_gives_its_messages_back_without_raising_the_delivery_count() {
    with_rules(async |emulator, client| {
        let batch = vec![message("c", "c:1", b"1"), message("c", "c:2", b"2")];
        send_to(client, "mixed", batch).await.unwrap();
        let options = azservicebus::ServiceBusSessionReceiverOptions::default;
        let mut receiver = within(
            10,
            client.accept_session_for_subscription("mixed", "s", "c", options()),
        )
        .await
        .unwrap();
        let got = receive(&mut receiver, 2).await;
        assert!(got.iter().all(|m| m.delivery_count() == Some(1)));
        within(10, receiver.dispose()).await.unwrap();
        let path = "mixed/Subscriptions/s";
        eventually(10, || {
            let stats = emulator.stats();
            let e = stats.entity(path).unwrap();
            e.locked == 0 && e.sessions.iter().all(|s| s.holder.is_none())
        })
        .await;
        let mut receiver = within(
            10,
            client.accept_session_for_subscription("mixed", "s", "c", options()),
        )
        .await
        .unwrap();
        let again = receive(&mut receiver, 2).await;
        assert_eq!(
            bodies_and_counts(&again),
            vec![(b"1".to_vec(), Some(1)), (b"2".to_vec(), Some(1))]
        );
    });
}
