//! What Service Bus refuses, refused here too (see the `rules` module and the README's list of
//! enforced rules), through azservicebus and, where azservicebus checks an input before
//! sending, a raw AMQP client. `microsoft_sdks.rs` runs the same rules through Microsoft's
//! Python SDK.

mod common;

use std::time::Duration;

use azservicebus::{
    primitives::sub_queue::SubQueue, receiver::DeadLetterOptions, ServiceBusMessage,
    ServiceBusReceiverOptions, ServiceBusSenderOptions,
};
use common::*;
use ordo_servicebus_emulator::{EmulatorConfig, EmulatorHandle};

async fn start_rules() -> EmulatorHandle {
    start(EmulatorConfig::from_toml_str(RULES_CONFIG).unwrap()).await
}

/// Runs `body` against an emulator of [`RULES_CONFIG`] and a client of it that does not retry,
/// then shuts the emulator down.
fn with_rules(body: impl AsyncFnOnce(&EmulatorHandle, &mut Client) + Send + 'static) {
    run_with(move || async move {
        let emulator = start_rules().await;
        let mut client = no_retry_client(&emulator).await;
        body(&emulator, &mut client).await;
        emulator.shutdown().await;
    });
}

/// Sends one transfer (one message, or a batch for several); the error is the client's text.
async fn send_to(
    client: &mut Client,
    topic: &str,
    messages: Vec<ServiceBusMessage>,
) -> Result<(), String> {
    let mut sender = within(
        10,
        client.create_sender(topic, ServiceBusSenderOptions::default()),
    )
    .await
    .unwrap();
    let sent = within(10, sender.send_messages(messages)).await;
    let _ = within(10, sender.dispose()).await;
    sent.map_err(|e| format!("{e:?}"))
}

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

/// A connection string for the same emulator with another key name and key.
fn with_key(emulator: &EmulatorHandle, name: &str, key: &str) -> String {
    let namespace = EmulatorConfig::default_ordo().namespace;
    emulator
        .connection_string()
        .replace(&namespace.key_name, name)
        .replace(&namespace.key, key)
}

async fn client_for(connection_string: String) -> Result<Client, String> {
    azservicebus::ServiceBusClient::unsecured()
        .new_from_connection_string(connection_string, Default::default())
        .await
        .map_err(|e| format!("{e:?}"))
}

/// Whether a client of `connection_string` may open a sender on `mixed`; the error is the
/// client's text.
async fn can_send(connection_string: String) -> Result<(), String> {
    let mut client = client_for(connection_string).await?;
    within(
        30,
        client.create_sender("mixed", ServiceBusSenderOptions::default()),
    )
    .await
    .map(|_| ())
    .map_err(|e| format!("{e:?}"))
}

/// A rule named `sender` with the Send right only.
fn send_rule(
    key: &str,
    secondary_key: Option<&str>,
) -> ordo_servicebus_emulator::AuthorizationRule {
    ordo_servicebus_emulator::AuthorizationRule {
        name: "sender".into(),
        key: key.into(),
        secondary_key: secondary_key.map(Into::into),
        rights: vec![ordo_servicebus_emulator::AccessRight::Send],
    }
}

#[test]
fn tokens_are_verified_and_links_need_the_right_for_their_entity() {
    run(async {
        let mut config = EmulatorConfig::from_toml_str(RULES_CONFIG).unwrap();
        config.namespace.authorization_rules = vec![send_rule("sender-key", None)];
        let emulator = start(config).await;
        // A wrong key and an unknown key name: put-token answers 401, no link opens.
        for (name, key) in [("sender", "wrong"), ("nobody", "sender-key")] {
            let mut client = client_for(with_key(&emulator, name, key)).await.unwrap();
            let refused = within(
                30,
                client.create_sender("mixed", ServiceBusSenderOptions::default()),
            )
            .await
            .map(|_| ())
            .unwrap_err();
            let text = format!("{refused:?}");
            assert!(text.contains("InvalidSignature"), "{name}/{key}: {text}");
        }
        // A Send key sends, and cannot receive.
        let mut client = client_for(with_key(&emulator, "sender", "sender-key"))
            .await
            .unwrap();
        send_to(&mut client, "mixed", vec![message("k", "k:1", b"1")])
            .await
            .unwrap();
        assert_eq!(active(&emulator, "mixed/Subscriptions/s"), 1);
        let refused = within(
            30,
            client.create_receiver_for_subscription("mixed", "plain", Default::default()),
        )
        .await
        .map(|_| ())
        .unwrap_err();
        let text = format!("{refused:?}");
        assert!(text.contains("'Listen' claim(s) are required"), "{text}");
        emulator.shutdown().await;
    });
}

/// A rule has two keys, as on Service Bus, and tokens signed with either are accepted; after
/// the secondary is regenerated (put again with a new one), the old secondary is refused and
/// the primary still works: the steps of a rotation without downtime.
#[test]
fn either_key_of_a_rule_authorizes_and_a_regenerated_one_stops() {
    run(async {
        let rule = |secondary: &str| send_rule("primary-key", Some(secondary));
        let mut config = EmulatorConfig::from_toml_str(RULES_CONFIG).unwrap();
        config.namespace.authorization_rules = vec![rule("secondary-key")];
        let emulator = start(config).await;
        let sends = |key: &str| can_send(with_key(&emulator, "sender", key));
        sends("primary-key").await.unwrap();
        sends("secondary-key").await.unwrap();
        emulator.put_key(rule("secondary-key-2"));
        let refused = sends("secondary-key").await.unwrap_err();
        assert!(refused.contains("InvalidSignature"), "{refused}");
        sends("secondary-key-2").await.unwrap();
        sends("primary-key").await.unwrap();
        emulator.shutdown().await;
    });
}

/// A rotation as docs/operations.md runs it, over the emulator's HTTP copy of Azure's
/// `listKeys` and `regenerateKeys`: the key nobody uses is regenerated, a client moves to the
/// connection string returned, then the old key is regenerated. Each regenerated key stops
/// signing at once, the other keeps working, and keys are shown only to a Manage key.
#[test]
fn keys_are_listed_and_regenerated_over_http_for_a_manage_key_only() {
    run(async {
        let mut config = EmulatorConfig::from_toml_str(RULES_CONFIG).unwrap();
        config.namespace.authorization_rules =
            vec![send_rule("primary-key", Some("secondary-key"))];
        let root = format!(
            "SharedAccessKeyName={};SharedAccessKey={}",
            config.namespace.key_name, config.namespace.key
        );
        let emulator = start(config).await;
        let ip = emulator.address().ip();
        let http = emulator
            .serve_http(std::net::SocketAddr::new(ip, 0))
            .await
            .unwrap();
        let keys = KeysApi { http, root };
        keys.refuses_what_azure_refuses().await;
        keys.lists_the_keys().await;
        // 1. Regenerate the key nobody uses; the connection string returned works as it is.
        let moved = keys.regenerates_the_unused_key(&emulator).await;
        // 2. Then the old one, to a chosen value.
        keys.regenerates_the_old_key(&emulator, moved).await;
        emulator.shutdown().await;
    });
}

const LIST: &str = "/keys/sender/listKeys";
const REGENERATE: &str = "/keys/sender/regenerateKeys";

/// The emulator's HTTP keys endpoint and a connection string's key of the root (Manage) rule.
struct KeysApi {
    http: std::net::SocketAddr,
    root: String,
}

impl KeysApi {
    /// POSTs `body` to `path` with `auth` as the Authorization header: the status and body.
    async fn post(
        &self,
        path: &'static str,
        auth: Option<String>,
        body: &'static str,
    ) -> (u16, String) {
        let http = self.http;
        tokio::task::spawn_blocking(move || http_request(http, "POST", path, auth.as_deref(), body))
            .await
            .unwrap()
    }

    /// POSTs as the root rule.
    async fn post_as_root(&self, path: &'static str, body: &'static str) -> (u16, String) {
        self.post(path, Some(self.root.clone()), body).await
    }

    /// Refused: no key, a wrong key, a key without Manage, an unknown rule, a bad body.
    async fn refuses_what_azure_refuses(&self) {
        let (status, why) = self.post(LIST, None, "").await;
        assert_eq!(
            (status, why.contains("Authorization header is missing")),
            (401, true),
            "{why}"
        );
        let wrong = Some("SharedAccessKeyName=sender;SharedAccessKey=nope".to_owned());
        assert_eq!(self.post(LIST, wrong, "").await.0, 401);
        let sender = Some("SharedAccessKeyName=sender;SharedAccessKey=primary-key".to_owned());
        let (status, why) = self.post(LIST, sender, "").await;
        assert_eq!(
            (status, why.contains("no Manage right")),
            (403, true),
            "{why}"
        );
        let (status, why) = self.post_as_root("/keys/nobody/listKeys", "").await;
        assert_eq!(
            (status, why.as_str()),
            (404, "authorization rule not found: nobody")
        );
        let (status, why) = self
            .post_as_root(REGENERATE, r#"{"keyType":"TertiaryKey"}"#)
            .await;
        assert_eq!((status, why.contains("TertiaryKey")), (400, true), "{why}");
        let (status, why) = self
            .post_as_root(REGENERATE, r#"{"keyType":"PrimaryKey","key":"a;b"}"#)
            .await;
        assert_eq!((status, why.contains("\"a;b\"")), (400, true), "{why}");
    }

    /// A Manage key sees both keys, and the connection string listed works.
    async fn lists_the_keys(&self) {
        let (status, listed) = self.post_as_root(LIST, "").await;
        assert_eq!(status, 200, "{listed}");
        let listed = json(&listed);
        assert_eq!(listed["keyName"], "sender");
        assert_eq!(listed["primaryKey"], "primary-key");
        assert_eq!(listed["secondaryKey"], "secondary-key");
        can_send(
            listed["primaryConnectionString"]
                .as_str()
                .unwrap()
                .to_owned(),
        )
        .await
        .unwrap();
    }

    /// Regenerates the secondary key: the connection string returned (given back) works, the
    /// old secondary key stops signing, the primary key goes on.
    async fn regenerates_the_unused_key(&self, emulator: &EmulatorHandle) -> String {
        let (status, renewed) = self
            .post_as_root(REGENERATE, r#"{"keyType":"SecondaryKey"}"#)
            .await;
        assert_eq!(status, 200, "{renewed}");
        let renewed = json(&renewed);
        let new_secondary = renewed["secondaryKey"].as_str().unwrap().to_owned();
        assert_ne!(new_secondary, "secondary-key");
        assert_eq!(
            new_secondary.len(),
            44,
            "256 bits in base64, as Azure's keys"
        );
        assert_eq!(renewed["primaryKey"], "primary-key");
        let moved = renewed["secondaryConnectionString"]
            .as_str()
            .unwrap()
            .to_owned();
        can_send(moved.clone()).await.unwrap();
        let refused = can_send(with_key(emulator, "sender", "secondary-key"))
            .await
            .unwrap_err();
        assert!(refused.contains("InvalidSignature"), "{refused}");
        can_send(with_key(emulator, "sender", "primary-key"))
            .await
            .unwrap();
        moved
    }

    /// Regenerates the primary key to a chosen value: the old primary key stops signing, the
    /// client that `moved` to the secondary goes on, and the chosen key signs.
    async fn regenerates_the_old_key(&self, emulator: &EmulatorHandle, moved: String) {
        let (status, renewed) = self
            .post_as_root(REGENERATE, r#"{"keyType":"PrimaryKey","key":"chosen"}"#)
            .await;
        assert_eq!(status, 200, "{renewed}");
        assert_eq!(json(&renewed)["primaryKey"], "chosen");
        let refused = can_send(with_key(emulator, "sender", "primary-key"))
            .await
            .unwrap_err();
        assert!(refused.contains("InvalidSignature"), "{refused}");
        can_send(moved).await.unwrap();
        can_send(with_key(emulator, "sender", "chosen"))
            .await
            .unwrap();
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap()
}

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
