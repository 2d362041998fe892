//! Answers to `$cbs` and `$management` requests go to the reply link the request names.
//!
//! Many request/response clients can share one AMQP session: azservicebus opens a
//! `$management` client per session receiver, and a projector's session workers share a few
//! connections. A request can reach the broker before its own reply link is attached; its
//! answer must wait for that link, not go to another client's.

mod common;

use common::*;
use fe2o3_amqp::types::messaging::{AmqpValue, ApplicationProperties, Message, Properties};
use fe2o3_amqp::types::primitives::Value;

/// A put-token request with a token that is not one: the broker answers it (401) on the reply
/// link named by `reply_to`.
fn put_token(id: &str, reply_to: &str) -> Message<AmqpValue<String>> {
    Message::builder()
        .properties(
            Properties::builder()
                .message_id(id.to_owned())
                .reply_to(reply_to)
                .build(),
        )
        .application_properties(
            ApplicationProperties::builder()
                .insert("operation", "put-token")
                .insert("type", "servicebus.windows.net:sastoken")
                .insert("name", "sb://emulator/ordo-events")
                .build(),
        )
        .value(String::from("not a token"))
        .build()
}

fn correlation_of(reply: &fe2o3_amqp::link::delivery::Delivery<Value>) -> String {
    let id = reply
        .message()
        .properties
        .as_ref()
        .and_then(|p| p.correlation_id.clone());
    format!("{id:?}")
}

#[test]
fn an_answer_waits_for_its_own_reply_link_and_never_goes_to_another_clients() {
    run(async {
        let emulator = start_default().await;
        let mut connection = raw_connection(&emulator).await;
        let mut session = fe2o3_amqp::Session::begin(&mut connection).await.unwrap();
        // Client A, fully attached: its request link and its reply link.
        let mut a_requests = within(
            10,
            fe2o3_amqp::Sender::attach(&mut session, "a-requests", "$cbs"),
        )
        .await
        .unwrap();
        let mut a_replies = within(
            10,
            fe2o3_amqp::Receiver::builder()
                .name("a-replies-link")
                .source("$cbs")
                .target("a-replies")
                .attach(&mut session),
        )
        .await
        .unwrap();
        // Client B sends before its reply link exists.
        let mut b_requests = within(
            10,
            fe2o3_amqp::Sender::attach(&mut session, "b-requests", "$cbs"),
        )
        .await
        .unwrap();
        within(10, b_requests.send(put_token("b-1", "b-replies")))
            .await
            .expect("the broker takes B's request");
        let mut b_replies = within(
            10,
            fe2o3_amqp::Receiver::builder()
                .name("b-replies-link")
                .source("$cbs")
                .target("b-replies")
                .attach(&mut session),
        )
        .await
        .unwrap();
        let b_reply = within(10, b_replies.recv::<Value>())
            .await
            .expect("B's answer reaches B's reply link once it is attached");
        assert!(correlation_of(&b_reply).contains("b-1"), "{b_reply:?}");
        b_replies.accept(&b_reply).await.unwrap();
        // A's first answer is its own: B's did not land on A's link.
        within(10, a_requests.send(put_token("a-1", "a-replies")))
            .await
            .unwrap();
        let a_reply = within(10, a_replies.recv::<Value>()).await.unwrap();
        assert!(
            correlation_of(&a_reply).contains("a-1"),
            "A's link got another client's answer first: {a_reply:?}"
        );
        a_replies.accept(&a_reply).await.unwrap();
        emulator.shutdown().await;
    });
}

/// Microsoft's JavaScript `$cbs` client attaches its reply link with no target, named after the
/// `reply-to` it sends: the answer finds it by name.
#[test]
fn a_reply_link_without_a_target_is_found_by_its_name() {
    run(async {
        let emulator = start_default().await;
        let mut connection = raw_connection(&emulator).await;
        let mut session = fe2o3_amqp::Session::begin(&mut connection).await.unwrap();
        let mut requests = within(
            10,
            fe2o3_amqp::Sender::attach(&mut session, "requests", "$cbs"),
        )
        .await
        .unwrap();
        let mut replies = within(
            10,
            fe2o3_amqp::Receiver::builder()
                .name("cbs-7f3a")
                .source("$cbs")
                .attach(&mut session),
        )
        .await
        .unwrap();
        within(10, requests.send(put_token("n-1", "cbs-7f3a")))
            .await
            .unwrap();
        let reply = within(10, replies.recv::<Value>()).await.unwrap();
        assert!(correlation_of(&reply).contains("n-1"), "{reply:?}");
        replies.accept(&reply).await.unwrap();
        emulator.shutdown().await;
    });
}
