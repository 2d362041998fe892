//! Links as AMQP 1.0 knows them: by name and role, and settled by a disposition sent just before
//! their close.

use super::*;

/// A link is known by its name and its role (AMQP 1.0 §2.6.1): a sender and a receiver of one
/// session may share a name, as the request/response ("duplex") links of Microsoft's .NET AMQP
/// stack do for `$cbs` and `$management`. Both attach, and a request on the one is answered on
/// the other.
#[test]
fn a_receiver_may_share_its_name_with_a_sender() {
    use fe2o3_amqp::types::messaging::{ApplicationProperties, Message, Properties};
    use fe2o3_amqp::types::primitives::{SimpleValue, Value};
    run(async {
        let emulator = start_rules().await;
        let mut connection = raw_connection(&emulator).await;
        let mut session = fe2o3_amqp::Session::begin(&mut connection).await.unwrap();
        let mut requests = within(
            10,
            fe2o3_amqp::Sender::attach(&mut session, "duplex", "$cbs"),
        )
        .await
        .expect("the sender attaches");
        let mut replies = within(
            10,
            fe2o3_amqp::Receiver::builder()
                .name("duplex")
                .source("$cbs")
                .target("duplex-replies")
                .attach(&mut session),
        )
        .await
        .expect("a receiver of the same name attaches too");
        // A token that is not one: the broker still answers, on the receiver.
        let request = Message::builder()
            .properties(
                Properties::builder()
                    .message_id(String::from("put-1"))
                    .reply_to("duplex-replies")
                    .build(),
            )
            .application_properties(
                ApplicationProperties::builder()
                    .insert("operation", "put-token")
                    .insert("type", "servicebus.windows.net:sastoken")
                    .insert("name", "sb://emulator/mixed")
                    .build(),
            )
            .value("not a token")
            .build();
        within(10, requests.send(request)).await.unwrap();
        let reply = within(10, replies.recv::<Value>()).await.unwrap();
        let status = reply
            .message()
            .application_properties
            .as_ref()
            .and_then(|p| p.get("status-code"))
            .cloned();
        assert!(
            matches!(
                status,
                Some(SimpleValue::Int(401)) | Some(SimpleValue::Uint(401))
            ),
            "{status:?}"
        );
        replies.accept(&reply).await.unwrap();
        within(10, requests.close()).await.unwrap();
        within(10, replies.close()).await.unwrap();
        emulator.shutdown().await;
    });
}

/// A receiver that settles as it disposes (rcv-settle-mode first: the disposition goes out
/// settled and nothing answers it) and closes its link right behind the disposition: the
/// disposition still counts. Here a complete, so the message is gone, not back in line.
#[test]
fn a_settled_disposition_just_before_a_close_is_applied() {
    use fe2o3_amqp::types::definitions::ReceiverSettleMode;
    use fe2o3_amqp::types::messaging::Source;
    use fe2o3_amqp::types::primitives::Value;
    run(async {
        let emulator = start_rules().await;
        let mut client = client(&emulator).await;
        let path = "mixed/Subscriptions/s";
        for round in 0..20 {
            let session_id = format!("settle-{round}");
            send_to(
                &mut client,
                "mixed",
                vec![message(&session_id, &format!("{session_id}:1"), b"x")],
            )
            .await
            .unwrap();
            let mut connection = raw_connection(&emulator).await;
            let mut session = fe2o3_amqp::Session::begin(&mut connection).await.unwrap();
            let mut filter = fe2o3_amqp::types::definitions::Fields::new();
            filter.insert(
                "com.microsoft:session-filter".into(),
                Value::String(session_id.clone()),
            );
            let source = Source::builder()
                .address(path)
                .filter(filter.into_iter().collect())
                .build();
            let mut receiver = within(
                10,
                fe2o3_amqp::Receiver::builder()
                    .name(format!("settler-{round}"))
                    .source(source)
                    .receiver_settle_mode(ReceiverSettleMode::First)
                    .attach(&mut session),
            )
            .await
            .unwrap();
            let delivery = within(10, receiver.recv::<fe2o3_amqp::types::messaging::Data>())
                .await
                .unwrap();
            receiver.accept(&delivery).await.unwrap();
            within(10, receiver.close()).await.unwrap();
            // Completed, not given back by the close: neither waiting nor locked.
            eventually(5, || {
                let stats = emulator.stats();
                let e = stats.entity(path).unwrap();
                e.active == 0 && e.locked == 0
            })
            .await;
            let _ = session.end().await;
            let _ = connection.close().await;
        }
        emulator.shutdown().await;
    });
}
