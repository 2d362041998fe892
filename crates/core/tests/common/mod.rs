//! Shared fixtures of the broker tests: a raw client sending one message at a time, and the
//! session source ordo itself receives through.

#![allow(dead_code)]

use azservicebus::core::BasicRetryPolicy;
use azservicebus::{
    ServiceBusClient, ServiceBusClientOptions, ServiceBusMessage, ServiceBusSender,
};
use ordo_core::secret::Secret;
use ordo_core::servicebus::receiver::AzureSessionSource;
use ordo_testkit::TestServiceBus;

/// The emulator with each of its answers `round_trip` late, as Service Bus is from a client;
/// `None` (the caller skips the test, as this says) against an external namespace, whose round
/// trip is its own.
pub async fn bus_with_round_trip(round_trip: std::time::Duration) -> Option<TestServiceBus> {
    let mut config = ordo_servicebus_emulator::EmulatorConfig::default_ordo();
    config.namespace.round_trip = round_trip;
    let sb = TestServiceBus::start_with(config).await.unwrap();
    if sb.is_external() {
        eprintln!("skipped: the round trip is the emulator's");
        return None;
    }
    Some(sb)
}

/// A client and a sender on the test topic. The test topic is partitioned with duplicate
/// detection, where a batch of distinct MessageIds is refused, so tests send one by one.
pub struct TopicSender {
    client: ServiceBusClient<BasicRetryPolicy>,
    pub sender: ServiceBusSender,
}

impl TopicSender {
    pub async fn open(sb: &TestServiceBus) -> Self {
        let mut client = ServiceBusClient::unsecured()
            .new_from_connection_string(sb.connection_string(), ServiceBusClientOptions::default())
            .await
            .unwrap();
        let sender = client
            .create_sender(sb.topic(), Default::default())
            .await
            .unwrap();
        Self { client, sender }
    }

    pub async fn close(self) {
        self.sender.dispose().await.unwrap();
        self.client.dispose().await.unwrap();
    }
}

/// A message of `session` (also its partition key, as the producer sends it).
pub fn message(session: &str, id: String, body: String) -> ServiceBusMessage {
    let mut m = ServiceBusMessage::new(body.into_bytes());
    m.set_message_id(id).unwrap();
    m.set_session_id(Some(session.to_string())).unwrap();
    m.set_partition_key(Some(session.to_string())).unwrap();
    m
}

/// The session source a projector worker connects, named `identifier`.
pub async fn session_source(sb: &TestServiceBus, identifier: &str) -> AzureSessionSource {
    AzureSessionSource::connect(
        &Secret::new(sb.connection_string()),
        sb.topic(),
        sb.subscription(),
        identifier,
        0,
    )
    .await
    .unwrap()
}
