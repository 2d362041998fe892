//! Shared helpers of the conformance tests: an emulator on its own loopback address and
//! azservicebus clients pointed at it.
#![allow(dead_code)]

use std::{future::Future, time::Duration};

use azservicebus::{ServiceBusClient, ServiceBusClientOptions};
use ordo_servicebus_emulator::{Emulator, EmulatorConfig, EmulatorHandle};

pub mod tls;

pub type Client = ServiceBusClient<azservicebus::core::BasicRetryPolicy>;

pub const TOPIC: &str = "ordo-events";
pub const SUBSCRIPTION: &str = "projector";

/// Starts an emulator on a free loopback address.
pub async fn start(config: EmulatorConfig) -> EmulatorHandle {
    Emulator::start_on_free_loopback(config)
        .await
        .unwrap_or_else(|e| panic!("cannot start emulator: {e}"))
}

pub async fn start_default() -> EmulatorHandle {
    start(batching_ordo()).await
}

/// The ordo namespace without partitioning. These tests send per-session batches of distinct
/// MessageIds, which Azure refuses on a partitioned topic with duplicate detection (ordo's
/// default, see `azure_rules/sending.rs`) and accepts on an unpartitioned one.
pub fn batching_ordo() -> EmulatorConfig {
    let mut config = EmulatorConfig::default_ordo();
    config.topics[0].partition_count = 0;
    config
}

pub async fn client(emulator: &EmulatorHandle) -> Client {
    ServiceBusClient::unsecured()
        .new_from_connection_string(
            emulator.connection_string(),
            ServiceBusClientOptions::default(),
        )
        .await
        .expect("client connects")
}

/// A client that does not retry. azservicebus 0.25 reports a send the broker rejected as a
/// success once it retries it (`AmqpSender::send_batch_envelope` marks the envelope settled
/// before returning the rejection, and the retry returns `Ok` for a settled envelope), so a
/// test of a refusal must see the first answer.
pub async fn no_retry_client(emulator: &EmulatorHandle) -> Client {
    let options = ServiceBusClientOptions {
        retry_options: azservicebus::ServiceBusRetryOptions {
            max_retries: 0,
            ..Default::default()
        },
        ..Default::default()
    };
    ServiceBusClient::unsecured()
        .new_from_connection_string(emulator.connection_string(), options)
        .await
        .expect("client connects")
}

/// Fails the test when `f` does not finish within `secs` seconds.
pub async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("operation timed out")
}

/// Waits until `cond` holds, failing after `secs` seconds.
pub async fn eventually(secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn message(session: &str, id: &str, body: &[u8]) -> azservicebus::ServiceBusMessage {
    let mut m = azservicebus::ServiceBusMessage::new(body.to_vec());
    m.set_message_id(id).unwrap();
    m.set_session_id(Some(session.to_owned())).unwrap();
    m
}

/// Runs a test body on a runtime with roomy stacks: azservicebus futures are large in debug
/// builds and overflow the default 2 MiB test thread stack.
pub fn run<F>(body: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    run_with(move || body);
}

/// Like [`run`], with the body made on the runtime's own thread by `make`, so that it need not
/// be `Send`.
pub fn run_with<M, F>(make: M)
where
    M: FnOnce() -> F + Send + 'static,
    F: Future<Output = ()>,
{
    const STACK: usize = 32 * 1024 * 1024;
    std::thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_stack_size(STACK)
                .enable_all()
                .build()
                .unwrap()
                .block_on(Box::pin(make()))
        })
        .unwrap()
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

/// The ordo namespace with shorter locks and fewer deliveries, for expiry and dead-letter tests.
pub fn short_config(lock: Duration, max_delivery_count: u32) -> EmulatorConfig {
    let mut config = batching_ordo();
    config.namespace.session_accept_timeout = Duration::from_secs(1);
    let sub = &mut config.topics[0].subscriptions[0];
    sub.lock_duration = lock;
    sub.max_delivery_count = max_delivery_count;
    config
}

pub const PATH: &str = "ordo-events/Subscriptions/projector";

/// How many messages wait on entity `path` (not locked, not deferred).
pub fn active(emulator: &EmulatorHandle, path: &str) -> usize {
    emulator.stats().entity(path).unwrap().active
}

/// A sender on the ordo topic.
pub async fn sender(client: &mut Client) -> azservicebus::ServiceBusSender {
    within(
        10,
        client.create_sender(TOPIC, azservicebus::ServiceBusSenderOptions::default()),
    )
    .await
    .unwrap()
}

/// Sends `messages` in one transfer on a sender of its own.
pub async fn send(client: &mut Client, messages: Vec<azservicebus::ServiceBusMessage>) {
    let mut sender = sender(client).await;
    within(10, sender.send_messages(messages)).await.unwrap();
    within(10, sender.dispose()).await.unwrap();
}

/// Accepts a named session or the next available one; the error is the client's message.
pub async fn accept(
    client: &mut Client,
    session: Option<&str>,
) -> Result<azservicebus::ServiceBusSessionReceiver, String> {
    let options = azservicebus::ServiceBusSessionReceiverOptions::default();
    within(20, async {
        match session {
            Some(id) => {
                client
                    .accept_session_for_subscription(TOPIC, SUBSCRIPTION, id, options)
                    .await
            }
            None => {
                client
                    .accept_next_session_for_subscription(TOPIC, SUBSCRIPTION, options)
                    .await
            }
        }
    })
    .await
    .map_err(|e| format!("{e:?}"))
}

/// Receives exactly `n` messages (failing after 10 s).
pub async fn receive(
    receiver: &mut azservicebus::ServiceBusSessionReceiver,
    n: usize,
) -> Vec<azservicebus::ServiceBusReceivedMessage> {
    let mut got = Vec::new();
    while got.len() < n {
        let batch = within(
            10,
            receiver.receive_messages_with_max_wait_time(
                (n - got.len()) as u32,
                Some(Duration::from_secs(5)),
            ),
        )
        .await
        .unwrap();
        got.extend(batch);
    }
    got
}

/// Completes every message of `got`.
pub async fn complete_all(
    receiver: &mut azservicebus::ServiceBusSessionReceiver,
    got: &[azservicebus::ServiceBusReceivedMessage],
) {
    for m in got {
        within(10, receiver.complete_message(m)).await.unwrap();
    }
}

/// Each message's body and delivery count, in order.
pub fn bodies_and_counts(
    got: &[azservicebus::ServiceBusReceivedMessage],
) -> Vec<(Vec<u8>, Option<u32>)> {
    got.iter()
        .map(|m| (m.body().unwrap().to_vec(), m.delivery_count()))
        .collect()
}

/// A raw fe2o3-amqp connection: an AMQP stack without the checks the Service Bus SDKs make
/// before sending, logged in with the namespace key through SASL PLAIN.
pub async fn raw_connection(
    emulator: &EmulatorHandle,
) -> fe2o3_amqp::connection::ConnectionHandle<()> {
    raw_connection_with(emulator, "raw", None).await
}

/// [`raw_connection`] as container `container`, asking for frames of at most
/// `max_frame_size` bytes when given.
pub async fn raw_connection_with(
    emulator: &EmulatorHandle,
    container: &str,
    max_frame_size: Option<u32>,
) -> fe2o3_amqp::connection::ConnectionHandle<()> {
    let url = format!(
        "amqp://{}:{}",
        emulator.address().ip(),
        emulator.address().port()
    );
    let namespace = EmulatorConfig::default_ordo().namespace;
    let builder = fe2o3_amqp::Connection::builder().container_id(container);
    let builder = match max_frame_size {
        Some(n) => builder.max_frame_size(n),
        None => builder,
    };
    builder
        .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Plain {
            username: namespace.key_name,
            password: namespace.key,
        })
        .open(url.as_str())
        .await
        .expect("raw AMQP connection")
}

/// A partitioned topic with duplicate detection (ordo's default), a partitioned one without,
/// and a plain one with a session and a session-less subscription.
pub const RULES_CONFIG: &str = r#"
[[topics]]
name = "part-dedup"
partition_count = 2
duplicate_detection_window = "10m"

[[topics.subscriptions]]
name = "s"
requires_session = true

[[topics]]
name = "part"
partition_count = 2

[[topics.subscriptions]]
name = "s"
requires_session = true

[[topics]]
name = "mixed"

[[topics.subscriptions]]
name = "s"
requires_session = true

[[topics.subscriptions]]
name = "plain"
"#;

/// One HTTP/1.1 request to the emulator's HTTP endpoint: the status and the body.
pub fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let authorization = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{authorization}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `GET path`: the status and the body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, None, "")
}

/// A connection of the AMQP client under azservicebus (fe2o3-amqp 0.14, with ordo's patch) used
/// directly, without the SDK on top,
/// logged in with PLAIN and the namespace key.
pub async fn client_connection(
    emulator: &EmulatorHandle,
    container: &str,
) -> fe2o3_amqp_client::connection::ConnectionHandle<()> {
    let namespace = EmulatorConfig::default_ordo().namespace;
    within(
        10,
        fe2o3_amqp_client::Connection::builder()
            .container_id(container)
            .sasl_profile(fe2o3_amqp_client::sasl_profile::SaslProfile::Plain {
                username: namespace.key_name.clone(),
                password: namespace.key.clone(),
            })
            .open(format!("amqp://{}", emulator.address()).as_str()),
    )
    .await
    .unwrap()
}

/// A receiver of Service Bus session `id` on `session` of a [`client_connection`].
pub async fn client_session_receiver(
    session: &mut fe2o3_amqp_client::session::SessionHandle<()>,
    id: &str,
) -> fe2o3_amqp_client::Receiver {
    use fe2o3_amqp_client::types::{messaging::Source, primitives::Value};
    within(
        10,
        fe2o3_amqp_client::Receiver::builder()
            .name(format!("receiver-{id}"))
            .source(
                Source::builder()
                    .address(format!("{TOPIC}/Subscriptions/{SUBSCRIPTION}"))
                    .add_to_filter_using_legacy_format(
                        "com.microsoft:session-filter",
                        Value::String(id.to_owned()),
                    )
                    .build(),
            )
            .attach(session),
    )
    .await
    .unwrap()
}
