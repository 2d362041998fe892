//! What Service Bus refuses, refused here too (see the `rules` module and the README's list of
//! enforced rules), through azservicebus and, where azservicebus checks an input before
//! sending, a raw AMQP client. `microsoft_sdks.rs` runs the same rules through Microsoft's
//! Python SDK. One module per behaviour: what a sender may send, what becomes of messages once
//! they are in, authorization, and links.

#[path = "../common/mod.rs"]
mod common;

mod authorization;
mod delivery;
mod links;
mod sending;

use azservicebus::{ServiceBusMessage, ServiceBusSenderOptions};
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
