//! Points 3 and 4: session locking rules, settlement outcomes, dead-lettering, duplicates,
//! size limits, lock expiry.

mod common;

use std::time::Duration;

use azservicebus::receiver::DeadLetterOptions;
use common::*;

#[test]
fn locked_named_session_is_refused_and_accept_next_times_out() {
    run(async {
        let emulator = start(short_config(Duration::from_secs(30), 10)).await;
        let mut client = client(&emulator).await;
        send(&mut client, vec![message("s1", "s1:1", b"a")]).await;
        let _holder = accept(&mut client, Some("s1")).await.unwrap();

        let mut other = common::client(&emulator).await;
        let Err(refused) = accept(&mut other, Some("s1")).await else {
            panic!("a locked session must be refused");
        };
        // The refusal is a null source with the detach naming the condition right behind it;
        // the client must see the condition, not just the null source.
        assert!(refused.contains("session-cannot-be-locked"), "{refused}");

        // Nothing else has messages: accept-next gives up after the server timeout (1 s here).
        let started = std::time::Instant::now();
        let Err(timed_out) = accept(&mut other, None).await else {
            panic!("accept-next must time out");
        };
        assert!(timed_out.contains("timeout"), "{timed_out}");
        assert!(started.elapsed() >= Duration::from_millis(900));
        emulator.shutdown().await;
    });
}

#[test]
fn accept_next_is_fair_oldest_first() {
    run(async {
        let emulator = start_default().await;
        let mut client = client(&emulator).await;
        for s in ["a", "b", "c"] {
            send(&mut client, vec![message(s, &format!("{s}:1"), b"x")]).await;
        }
        let mut order = Vec::new();
        let mut held = Vec::new();
        for _ in 0..3 {
            let r = accept(&mut client, None).await.unwrap();
            order.push(r.session_id().to_owned());
            held.push(r);
        }
        assert_eq!(order, vec!["a", "b", "c"]);
        emulator.shutdown().await;
    });
}

#[test]
fn abandon_redelivers_then_max_delivery_count_dead_letters() {
    run(async {
        let emulator = start(short_config(Duration::from_secs(30), 2)).await;
        let mut client = client(&emulator).await;
        send(
            &mut client,
            vec![message("s", "s:1", b"poison"), message("s", "s:2", b"ok")],
        )
        .await;
        let mut receiver = accept(&mut client, Some("s")).await.unwrap();
        let first = receive(&mut receiver, 1).await.pop().unwrap();
        assert_eq!(first.delivery_count(), Some(1));
        within(10, receiver.abandon_message(&first, None))
            .await
            .unwrap();
        let again = receive(&mut receiver, 1).await.pop().unwrap();
        assert_eq!(
            again.body().unwrap(),
            b"poison",
            "redelivery comes before later messages"
        );
        assert_eq!(again.delivery_count(), Some(2));
        within(10, receiver.abandon_message(&again, None))
            .await
            .unwrap();
        let next = receive(&mut receiver, 1).await.pop().unwrap();
        assert_eq!(next.body().unwrap(), b"ok");
        within(10, receiver.complete_message(&next)).await.unwrap();

        let dlq = emulator
            .subscription_dead_letters(TOPIC, SUBSCRIPTION)
            .unwrap();
        assert_eq!(dlq.len(), 1);
        assert_eq!(dlq[0].reason.as_deref(), Some("MaxDeliveryCountExceeded"));
        assert_eq!(dlq[0].body, b"poison");
        assert_eq!(dlq[0].message_id.as_deref(), Some("s:1"));
        emulator.shutdown().await;
    });
}

#[test]
fn dead_letter_keeps_reason_and_description_and_defer_sets_aside() {
    run(async {
        let emulator = start_default().await;
        let mut client = client(&emulator).await;
        send(
            &mut client,
            vec![message("s", "s:1", b"bad"), message("s", "s:2", b"later")],
        )
        .await;
        let mut receiver = accept(&mut client, Some("s")).await.unwrap();
        let got = receive(&mut receiver, 2).await;
        let options = DeadLetterOptions {
            dead_letter_reason: Some("Undecodable".into()),
            dead_letter_error_description: Some("bad json".into()),
            properties_to_modify: None,
        };
        within(10, receiver.dead_letter_message(&got[0], options))
            .await
            .unwrap();
        within(10, receiver.defer_message(&got[1], None))
            .await
            .unwrap();
        eventually(5, || {
            let stats = emulator.stats();
            let e = stats.entity(PATH).unwrap();
            e.dead_lettered == 1 && e.deferred == 1 && e.active == 0
        })
        .await;
        let dlq = emulator
            .subscription_dead_letters(TOPIC, SUBSCRIPTION)
            .unwrap();
        assert_eq!(dlq[0].reason.as_deref(), Some("Undecodable"));
        assert_eq!(dlq[0].description.as_deref(), Some("bad json"));
        assert_eq!(dlq[0].session_id.as_deref(), Some("s"));
        emulator.shutdown().await;
    });
}

#[test]
fn duplicates_are_accepted_but_not_enqueued() {
    run(async {
        let emulator = start_default().await;
        let mut client = client(&emulator).await;
        send(&mut client, vec![message("s", "s:1", b"one")]).await;
        send(
            &mut client,
            vec![
                message("s", "s:1", b"one again"),
                message("s", "s:2", b"two"),
            ],
        )
        .await;
        let mut receiver = accept(&mut client, Some("s")).await.unwrap();
        let got = receive(&mut receiver, 2).await;
        let bodies: Vec<_> = got.iter().map(|m| m.body().unwrap().to_vec()).collect();
        assert_eq!(bodies, vec![b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(active(&emulator, PATH), 2);
        emulator.shutdown().await;
    });
}

#[test]
fn oversized_messages_are_refused() {
    run(async {
        let emulator = start_default().await;
        // Clients learn the limit from the attach: azservicebus batches refuse to grow past it.
        let mut client = client(&emulator).await;
        let sender = sender(&mut client).await;
        let mut batch = sender
            .create_message_batch(azservicebus::CreateMessageBatchOptions::default())
            .unwrap();
        assert!(batch
            .try_add_message(message("s", "s:big", &vec![0u8; 300 * 1024]))
            .is_err());

        // A client that sends anyway is refused on the wire with the AMQP size condition.
        let mut connection = raw_connection(&emulator).await;
        let mut session = fe2o3_amqp::Session::begin(&mut connection).await.unwrap();
        let mut raw = fe2o3_amqp::Sender::attach(&mut session, "big", TOPIC)
            .await
            .unwrap();
        let body = fe2o3_amqp::types::messaging::Data(vec![0u8; 300 * 1024].into());
        let error = within(10, raw.send(body))
            .await
            .expect_err("must be refused");
        assert!(
            format!("{error:?}").contains("MessageSizeExceeded"),
            "{error:?}"
        );
        assert_eq!(active(&emulator, PATH), 0);
        emulator.shutdown().await;
    });
}

#[test]
fn expired_session_lock_releases_messages_with_delivery_count_incremented() {
    run(async {
        let emulator = start(short_config(Duration::from_millis(700), 10)).await;
        let mut client = client(&emulator).await;
        send(&mut client, vec![message("s", "s:1", b"a")]).await;
        let mut receiver = accept(&mut client, Some("s")).await.unwrap();
        let first = receive(&mut receiver, 1).await.pop().unwrap();
        assert_eq!(first.delivery_count(), Some(1));
        // Neither renewed nor settled: the lock runs out and the session is free again.
        eventually(5, || {
            let stats = emulator.stats();
            let e = stats.entity(PATH).unwrap();
            e.locked == 0 && e.sessions.iter().all(|s| s.holder.is_none())
        })
        .await;
        let mut other = common::client(&emulator).await;
        let mut receiver2 = accept(&mut other, None).await.unwrap();
        assert_eq!(receiver2.session_id(), "s");
        let again = receive(&mut receiver2, 1).await.pop().unwrap();
        assert_eq!(again.delivery_count(), Some(2));
        assert_eq!(again.sequence_number(), first.sequence_number());
        within(10, receiver2.complete_message(&again))
            .await
            .unwrap();
        emulator.shutdown().await;
    });
}
