//! What a sender may send: batches on partitioned topics, scheduled messages, ids over 128
//! bytes, and annotation keys written as strings (uAMQP's).

use super::*;

#[test]
fn partitioned_topic_with_duplicate_detection_refuses_batches_and_takes_single_sends() {
    with_rules(async |emulator, client| {
        let path = "part-dedup/Subscriptions/s";
        let batch = vec![message("a", "a:1", b"1"), message("a", "a:2", b"2")];
        let refused = send_to(client, "part-dedup", batch).await.unwrap_err();
        assert!(
            refused.contains("Batching brokered messages with distinct SessionId, PartitionKey, or MessageId is not supported for an entity with partitioning and duplicate detection enabled."),
            "{refused}"
        );
        assert_eq!(
            active(emulator, path),
            0,
            "nothing of a refused batch is kept"
        );
        for m in [message("a", "a:1", b"1"), message("a", "a:2", b"2")] {
            send_to(client, "part-dedup", vec![m]).await.unwrap();
        }
        assert_eq!(active(emulator, path), 2);
    });
}

#[test]
fn partitioned_topic_refuses_a_batch_across_sessions_and_takes_a_one_session_batch() {
    with_rules(async |emulator, client| {
        let across = vec![message("a", "a:1", b"1"), message("b", "b:1", b"1")];
        let refused = send_to(client, "part", across).await.unwrap_err();
        assert!(
            refused.contains("Batching brokered messages with distinct SessionId or PartitionKey is not supported for an entity with partitioning enabled."),
            "{refused}"
        );
        let one_session = vec![message("a", "a:1", b"1"), message("a", "a:2", b"2")];
        send_to(client, "part", one_session).await.unwrap();
        assert_eq!(active(emulator, "part/Subscriptions/s"), 2);
    });
}

#[test]
fn scheduled_messages_are_refused_never_delivered_early() {
    with_rules(async |emulator, client| {
        let mut m = message("a", "a:1", b"later");
        m.set_scheduled_enqueue_time(time::OffsetDateTime::now_utc() + time::Duration::hours(1));
        let refused = send_to(client, "mixed", vec![m]).await.unwrap_err();
        assert!(refused.contains("Scheduled messages"), "{refused}");
        assert_eq!(active(emulator, "mixed/Subscriptions/s"), 0);
    });
}

#[test]
fn ids_longer_than_128_bytes_are_refused_on_the_wire() {
    use fe2o3_amqp::types::messaging::{Body, Message, Properties};
    run(async {
        let emulator = start_rules().await;
        // azservicebus refuses them before sending ...
        let mut m = ServiceBusMessage::new(b"x".to_vec());
        assert!(m.set_message_id("x".repeat(129)).is_err());
        assert!(m.set_session_id(Some("x".repeat(129))).is_err());
        // ... so a raw AMQP client shows what the broker does with them.
        let mut connection = raw_connection(&emulator).await;
        let mut session = fe2o3_amqp::Session::begin(&mut connection).await.unwrap();
        let mut sender = fe2o3_amqp::Sender::attach(&mut session, "raw", "mixed")
            .await
            .unwrap();
        let raw = |id: String, session: String| {
            Message::builder()
                .properties(Properties {
                    message_id: Some(id.into()),
                    group_id: Some(session),
                    ..Default::default()
                })
                .body(Body::Value(fe2o3_amqp::types::messaging::AmqpValue(
                    fe2o3_amqp::types::primitives::Value::String("x".into()),
                )))
                .build()
        };
        for (id, session) in [
            ("x".repeat(129), "s".to_owned()),
            ("i".to_owned(), "x".repeat(129)),
        ] {
            let outcome = within(10, sender.send(raw(id, session))).await;
            let text = format!("{outcome:?}");
            assert!(
                text.contains("com.microsoft:argument-out-of-range"),
                "{text}"
            );
            assert!(text.contains("129 bytes"), "{text}");
        }
        assert_eq!(active(&emulator, "mixed/Subscriptions/s"), 0);
        within(10, sender.send(raw("x".repeat(128), "x".repeat(128))))
            .await
            .unwrap();
        assert_eq!(active(&emulator, "mixed/Subscriptions/s"), 1);
        emulator.shutdown().await;
    });
}

/// A message as Microsoft's uAMQP C library (a transport of the Python SDK) encodes one:
/// message annotations whose keys are strings (AMQP asks for symbols), properties, a data
/// body.
fn uamqp_message(id: &str, session: &str, partition_key: &str) -> Vec<u8> {
    use fe2o3_amqp::types::messaging::Properties;
    let str8 = |s: &str| [&[0xa1, s.len() as u8][..], s.as_bytes()].concat();
    let pairs = [str8("x-opt-partition-key"), str8(partition_key)].concat();
    let mut bytes = vec![0x00, 0x53, 0x72, 0xc1, (pairs.len() + 1) as u8, 2];
    bytes.extend(pairs);
    let properties = Properties {
        message_id: Some(id.to_owned().into()),
        group_id: Some(session.to_owned()),
        ..Default::default()
    };
    bytes.extend(serde_amqp::to_vec(&properties).unwrap());
    bytes.extend([0x00, 0x53, 0x75, 0xa0, 1, b'x']);
    bytes
}

/// Sends an encoded message (`format` 0) or batch unsettled; the outcome, or the error's text.
async fn send_encoded(
    sender: &mut fe2o3_amqp::Sender,
    payload: Vec<u8>,
    format: u32,
) -> Result<(), String> {
    let outcome = within(
        10,
        sender.send_batchable_encoded(payload.into(), format, Some(false), None),
    )
    .await
    .map_err(|e| format!("{e:?}"))?;
    match within(10, outcome).await {
        Ok(fe2o3_amqp::types::messaging::Outcome::Accepted(_)) => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

/// Service Bus reads annotation keys written as strings (uAMQP's), so its rules apply to them:
/// on a partitioned topic a partition key that differs from the SessionId is refused, in a
/// single message and in a batch, and one that matches is stored. (The emulator once detached such a link without a
/// condition, and refused such a batch as undecodable.)
#[test]
fn annotation_keys_written_as_strings_are_read() {
    const BATCH: u32 = 0x8001_3700;
    run(async {
        let emulator = start_rules().await;
        let mut connection = raw_connection(&emulator).await;
        let mut session = fe2o3_amqp::Session::begin(&mut connection).await.unwrap();
        let mut sender = fe2o3_amqp::Sender::attach(&mut session, "uamqp", "part")
            .await
            .unwrap();
        let batch = |messages: &[Vec<u8>]| {
            messages
                .iter()
                .flat_map(|m| [&[0x00, 0x53, 0x75, 0xa0, m.len() as u8][..], m].concat())
                .collect::<Vec<u8>>()
        };
        let path = "part/Subscriptions/s";

        send_encoded(&mut sender, uamqp_message("u1", "s1", "s1"), 0)
            .await
            .unwrap();
        assert_eq!(active(&emulator, path), 1);
        let refused = send_encoded(&mut sender, uamqp_message("u2", "s1", "other"), 0)
            .await
            .unwrap_err();
        assert!(refused.contains("NotAllowed"), "{refused}");

        let good = [
            uamqp_message("u3", "s2", "s2"),
            uamqp_message("u4", "s2", "s2"),
        ];
        send_encoded(&mut sender, batch(&good), BATCH)
            .await
            .unwrap();
        assert_eq!(active(&emulator, path), 3);
        let mixed = [
            uamqp_message("u5", "s3", "s3"),
            uamqp_message("u6", "s3", "elsewhere"),
        ];
        let refused = send_encoded(&mut sender, batch(&mixed), BATCH)
            .await
            .unwrap_err();
        assert!(refused.contains("NotAllowed"), "{refused}");
        assert_eq!(active(&emulator, path), 3);
        emulator.shutdown().await;
    });
}
