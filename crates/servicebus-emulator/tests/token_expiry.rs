//! A link lives only as long as a token covers it: when the token expires and none was put in
//! its place, the emulator detaches the link as Service Bus does (`amqp:link:detach-forced`,
//! "Code: RenewToken"); a token put before the expiry keeps it running. Through a raw AMQP
//! client that puts its own tokens on `$cbs`, and through azservicebus with a connection string
//! holding a pre-made signature it cannot renew. `microsoft_sdks.rs` does the same with the
//! Python SDK.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use azservicebus::{ServiceBusReceiverOptions, ServiceBusSenderOptions};
use common::*;
use fe2o3_amqp::{
    link::{Receiver, RecvError, Sender},
    session::SessionHandle,
    Connection, Session,
};
use fe2o3_amqp_types::{
    messaging::{ApplicationProperties, Body, Message, Properties},
    primitives::{SimpleValue, Value},
};
use ordo_servicebus_emulator::{EmulatorConfig, EmulatorHandle};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// URL-encodes as the SDKs do for `sr` and `sig`.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A SAS token for `resource` signed with the namespace's Manage key, expiring at `expires_s`.
fn sas_token(resource: &str, expires_s: u64) -> String {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let namespace = EmulatorConfig::default_ordo().namespace;
    let sr = encode(resource);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(namespace.key.as_bytes()).unwrap();
    mac.update(format!("{sr}\n{expires_s}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expires_s}&skn={}",
        encode(&sig),
        namespace.key_name
    )
}

/// A raw AMQP connection that authorizes itself only through CBS (SASL ANONYMOUS), as the
/// Service Bus SDKs do.
struct CbsClient {
    _connection: fe2o3_amqp::connection::ConnectionHandle<()>,
    session: SessionHandle<()>,
    cbs: Sender,
    replies: Receiver,
    next: u64,
}

impl CbsClient {
    async fn open(emulator: &EmulatorHandle) -> Self {
        let url = format!("amqp://{}:5672", emulator.address().ip());
        let mut connection = Connection::builder()
            .container_id("cbs-client")
            .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Anonymous)
            .open(url.as_str())
            .await
            .unwrap();
        let mut session = Session::begin(&mut connection).await.unwrap();
        let cbs = Sender::attach(&mut session, "cbs-sender", "$cbs")
            .await
            .unwrap();
        let replies = Receiver::builder()
            .name("cbs-receiver")
            .source("$cbs")
            .target("cbs-replies")
            .attach(&mut session)
            .await
            .unwrap();
        Self {
            _connection: connection,
            session,
            cbs,
            replies,
            next: 0,
        }
    }

    /// Puts `token` for `audience`; the status code of the answer.
    async fn put_token(&mut self, audience: &str, token: String) -> i32 {
        self.next += 1;
        let properties = ApplicationProperties::builder()
            .insert("operation", "put-token")
            .insert("type", "servicebus.windows.net:sastoken")
            .insert("name", audience)
            .build();
        let message = Message::builder()
            .properties(
                Properties::builder()
                    .message_id(format!("put-{}", self.next))
                    .reply_to("cbs-replies")
                    .build(),
            )
            .application_properties(properties)
            .value(token)
            .build();
        within(10, self.cbs.send(message)).await.unwrap();
        let reply = within(10, self.replies.recv::<Body<Value>>())
            .await
            .unwrap();
        self.replies.accept(&reply).await.unwrap();
        match reply
            .message()
            .application_properties
            .as_ref()
            .and_then(|p| p.0.get("status-code"))
        {
            Some(SimpleValue::Int(code)) => *code,
            other => panic!("no status-code in the put-token answer: {other:?}"),
        }
    }
}

/// A session receiver-less subscription of the rules namespace, and the audience for it.
const ENTITY: &str = "mixed/subscriptions/plain";

fn audience(emulator: &EmulatorHandle) -> String {
    format!("sb://{}/{ENTITY}", emulator.address().ip())
}

async fn send_one(emulator: &EmulatorHandle, id: &str) {
    let mut client = client(emulator).await;
    let mut sender = within(
        10,
        client.create_sender("mixed", ServiceBusSenderOptions::default()),
    )
    .await
    .unwrap();
    within(10, sender.send_message(message("k", id, b"x")))
        .await
        .unwrap();
    let _ = sender.dispose().await;
    let _ = client.dispose().await;
}

fn message_id(delivery: &fe2o3_amqp::link::delivery::Delivery<Body<Value>>) -> String {
    match delivery
        .message()
        .properties
        .as_ref()
        .and_then(|p| p.message_id.as_ref())
    {
        Some(fe2o3_amqp_types::messaging::MessageId::String(s)) => s.clone(),
        other => panic!("unexpected message id {other:?}"),
    }
}

#[test]
fn a_link_whose_token_expires_unrenewed_is_force_detached() {
    run(async {
        let emulator = start(EmulatorConfig::from_toml_str(RULES_CONFIG).unwrap()).await;
        let mut client = CbsClient::open(&emulator).await;
        let expires = unix_now() + 2;
        assert_eq!(
            client
                .put_token(
                    &audience(&emulator),
                    sas_token(&audience(&emulator), expires)
                )
                .await,
            202
        );
        let mut receiver = Receiver::attach(&mut client.session, "expiring", ENTITY)
            .await
            .unwrap();
        // Until the expiry the link works.
        send_one(&emulator, "before").await;
        let got = within(10, receiver.recv::<Body<Value>>()).await.unwrap();
        assert_eq!(message_id(&got), "before");
        receiver.accept(&got).await.unwrap();
        assert_eq!(emulator.token_expiry_detaches(), 0);
        // Then nothing is put: the broker detaches the link with Service Bus's error.
        let detached = within(15, receiver.recv::<Body<Value>>())
            .await
            .unwrap_err();
        let RecvError::LinkStateError(
            fe2o3_amqp::link::LinkStateError::RemoteDetachedWithError(error)
            | fe2o3_amqp::link::LinkStateError::RemoteClosedWithError(error),
        ) = &detached
        else {
            panic!("expected a detach with an error, got {detached:?}");
        };
        assert!(
            unix_now() >= expires,
            "detached before the token expired: {error:?}"
        );
        let condition = format!("{:?}", error.condition);
        assert!(
            condition.contains("DetachForced") || condition.contains("amqp:link:detach-forced"),
            "{condition}"
        );
        let description = error.description.clone().unwrap_or_default();
        assert!(
            description.contains("is force detached. Code: RenewToken. Details: Unauthorized access. 'Listen' claim(s) are required"),
            "{description}"
        );
        assert_eq!(emulator.token_expiry_detaches(), 1);
        emulator.shutdown().await;
    });
}

#[test]
fn a_token_put_before_the_expiry_keeps_the_link() {
    run(async {
        let emulator = start(EmulatorConfig::from_toml_str(RULES_CONFIG).unwrap()).await;
        let mut client = CbsClient::open(&emulator).await;
        let first_expiry = unix_now() + 2;
        let audience = audience(&emulator);
        assert_eq!(
            client
                .put_token(&audience, sas_token(&audience, first_expiry))
                .await,
            202
        );
        let mut receiver = Receiver::attach(&mut client.session, "renewed", ENTITY)
            .await
            .unwrap();
        assert_eq!(
            client
                .put_token(&audience, sas_token(&audience, unix_now() + 600))
                .await,
            202
        );
        // Past the first token's expiry the link still receives.
        tokio::time::sleep(Duration::from_secs(
            (first_expiry + 1).saturating_sub(unix_now()),
        ))
        .await;
        send_one(&emulator, "after").await;
        let got = within(10, receiver.recv::<Body<Value>>()).await.unwrap();
        assert_eq!(message_id(&got), "after");
        receiver.accept(&got).await.unwrap();
        assert_eq!(emulator.token_expiry_detaches(), 0);
        emulator.shutdown().await;
    });
}

/// `SharedAccessSignature=` in the connection string: azservicebus puts that token and, when
/// it expires, the same one again (refused), so its receiver is detached and stays so.
#[test]
fn azservicebus_with_a_fixed_signature_loses_its_receiver_when_the_signature_expires() {
    run(async {
        let emulator = start(EmulatorConfig::from_toml_str(RULES_CONFIG).unwrap()).await;
        let ip = emulator.address().ip();
        let expires = unix_now() + 3;
        let conn = format!(
            "Endpoint=sb://{ip};SharedAccessSignature={};UseDevelopmentEmulator=true",
            sas_token(&format!("sb://{ip}/"), expires)
        );
        let options = azservicebus::ServiceBusClientOptions {
            retry_options: azservicebus::ServiceBusRetryOptions {
                max_retries: 0,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut fixed = azservicebus::ServiceBusClient::unsecured()
            .new_from_connection_string(conn, options)
            .await
            .unwrap();
        let mut receiver = within(
            10,
            fixed.create_receiver_for_subscription(
                "mixed",
                "plain",
                ServiceBusReceiverOptions::default(),
            ),
        )
        .await
        .unwrap();
        send_one(&emulator, "before").await;
        let got = within(
            10,
            receiver.receive_messages_with_max_wait_time(1, Some(Duration::from_secs(5))),
        )
        .await
        .unwrap();
        assert_eq!(got.len(), 1);
        receiver.complete_message(&got[0]).await.unwrap();
        eventually(15, || emulator.token_expiry_detaches() == 1).await;
        send_one(&emulator, "after").await;
        let after = within(
            20,
            receiver.receive_messages_with_max_wait_time(1, Some(Duration::from_secs(3))),
        )
        .await;
        assert!(
            !matches!(&after, Ok(messages) if !messages.is_empty()),
            "a receiver without a valid token received {after:?}"
        );
        // The message waits for a receiver that holds a valid token.
        assert_eq!(active(&emulator, "mixed/Subscriptions/plain"), 1);
        emulator.shutdown().await;
    });
}
