//! AMQPS: with a certificate and key the emulator serves TLS on 5671 next to plain AMQP on
//! 5672, and azservicebus reaches it with a connection string as for Azure (no
//! `UseDevelopmentEmulator`), trusting the test CA; a client that does not trust the CA fails
//! the handshake. `microsoft_sdks.rs` does the same with the Python SDK.

mod common;

use std::time::Duration;

use azservicebus::{ServiceBusClient, ServiceBusClientOptions, ServiceBusSenderOptions};
use common::tls::TestCa;
use common::*;

fn no_retry() -> ServiceBusClientOptions {
    ServiceBusClientOptions {
        retry_options: azservicebus::ServiceBusRetryOptions {
            max_retries: 0,
            try_timeout: Duration::from_secs(10),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn azservicebus_sends_and_receives_over_tls_next_to_plain_amqp() {
    run(async {
        let ca = TestCa::loopback();
        let emulator = start(ca.serve(batching_ordo())).await;
        let tls = emulator.tls_address().expect("TLS is configured");
        assert_eq!(tls.port(), ordo_servicebus_emulator::AMQPS_PORT);
        assert_eq!(tls.ip(), emulator.address().ip());
        let conn = emulator.tls_connection_string().unwrap();
        assert!(!conn.contains("UseDevelopmentEmulator"), "{conn}");
        ca.trust_in_azservicebus();
        let mut secure = within(
            20,
            ServiceBusClient::new_from_connection_string(conn, no_retry()),
        )
        .await
        .unwrap();
        let mut sender = within(
            20,
            secure.create_sender(TOPIC, ServiceBusSenderOptions::default()),
        )
        .await
        .unwrap();
        within(20, sender.send_message(message("s", "s:1", b"over tls")))
            .await
            .unwrap();
        let mut receiver = accept(&mut secure, Some("s")).await.unwrap();
        let got = receive(&mut receiver, 1).await;
        assert_eq!(got[0].body().unwrap(), b"over tls");
        receiver.complete_message(&got[0]).await.unwrap();
        // Plain AMQP still serves the same namespace.
        let mut plain = client(&emulator).await;
        send(&mut plain, vec![message("s", "s:2", b"plain")]).await;
        let got = receive(&mut receiver, 1).await;
        assert_eq!(got[0].body().unwrap(), b"plain");
        emulator.shutdown().await;
    });
}

#[test]
fn a_client_that_does_not_trust_the_ca_fails_the_handshake() {
    run(async {
        // This CA is never added to the client's roots (other tests add their own CAs only).
        let ca = TestCa::loopback();
        let emulator = start(ca.serve(batching_ordo())).await;
        let conn = emulator.tls_connection_string().unwrap();
        let opened = async {
            let mut client = ServiceBusClient::new_from_connection_string(conn, no_retry()).await?;
            client
                .create_sender(TOPIC, ServiceBusSenderOptions::default())
                .await
                .map(|_| ())
        };
        let refused = within(30, opened).await.unwrap_err();
        let text = format!("{refused:?}");
        assert!(
            text.contains("UnknownIssuer") || text.contains("certificate"),
            "{text}"
        );
        assert_eq!(emulator.stats().connections, 0);
        emulator.shutdown().await;
    });
}

#[test]
fn a_key_that_does_not_fit_the_certificate_is_refused_at_start() {
    run(async {
        let ca = TestCa::loopback();
        let other = TestCa::loopback();
        let mut config = ca.serve(batching_ordo());
        config.namespace.tls_key = Some(other.key_file.clone());
        let error =
            ordo_servicebus_emulator::Emulator::start_on(config, "127.0.0.1:0".parse().unwrap())
                .await
                .unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains(&other.key_file.display().to_string()),
            "{text}"
        );
    });
}
