//! Points 1, 5 and 6 and the outage simulation: connection string, `$management`
//! (peek, renew-lock), suspend/resume keeping state, the inspection API and HTTP endpoint.

mod common;

use std::time::Duration;

use common::*;
use ordo_servicebus_emulator::EmulatorConfig;

#[test]
fn connection_string_names_host_key_and_emulator_flag() {
    run(async {
        let emulator = start_default().await;
        let cs = emulator.connection_string();
        let ip = emulator.address().ip();
        assert_eq!(
            cs,
            format!("Endpoint=sb://{ip};SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true")
        );
        // A second emulator on the same address is refused with a recognisable error.
        let again = ordo_servicebus_emulator::Emulator::start(EmulatorConfig::default_ordo(), ip)
            .await
            .unwrap_err();
        assert!(again.is_addr_in_use(), "{again}");
        emulator.shutdown().await;
    });
}

#[test]
fn peek_returns_messages_in_sequence_order() {
    run(async {
        let emulator = start_default().await;
        let mut client = client(&emulator).await;
        send(
            &mut client,
            vec![message("p", "p:1", b"one"), message("p", "p:2", b"two")],
        )
        .await;
        let mut receiver = accept(&mut client, Some("p")).await.unwrap();
        let peeked = within(10, receiver.peek_messages(10, None)).await.unwrap();
        assert_eq!(peeked.len(), 2);
        assert_eq!(peeked[0].body().unwrap(), b"one");
        assert_eq!(peeked[1].body().unwrap(), b"two");
        assert!(peeked[0].sequence_number() < peeked[1].sequence_number());

        let got = receive(&mut receiver, 2).await;
        assert_eq!(got[0].sequence_number(), peeked[0].sequence_number());
        complete_all(&mut receiver, &got).await;
        emulator.shutdown().await;
    });
}

#[test]
fn suspend_drops_connections_but_keeps_state() {
    run(async {
        let emulator = start_default().await;
        let mut client = client(&emulator).await;
        send(
            &mut client,
            vec![message("o", "o:1", b"one"), message("o", "o:2", b"two")],
        )
        .await;
        let mut receiver = accept(&mut client, Some("o")).await.unwrap();
        within(10, receiver.set_session_state(b"v1".to_vec()))
            .await
            .unwrap();
        let first = receive(&mut receiver, 1).await.pop().unwrap();
        assert_eq!(first.body().unwrap(), b"one");

        within(10, emulator.suspend()).await;
        assert_eq!(emulator.stats().connections, 0);
        let stats = emulator.stats();
        let entity = stats.entity(PATH).unwrap();
        assert_eq!(entity.active, 2, "nothing acknowledged is lost");
        assert!(
            entity.sessions.iter().all(|s| s.holder.is_none()),
            "locks released"
        );
        // Nobody can connect while suspended.
        let refused =
            std::net::TcpStream::connect_timeout(&emulator.address(), Duration::from_secs(2));
        assert!(refused.is_err());

        within(10, emulator.resume()).await.unwrap();
        drop(receiver);
        drop(client);
        let mut client = common::client(&emulator).await;
        // Duplicate history survives too: resending o:1 does not enqueue it again.
        send(&mut client, vec![message("o", "o:1", b"one")]).await;
        let mut receiver = accept(&mut client, None).await.unwrap();
        assert_eq!(receiver.session_id(), "o");
        assert_eq!(
            within(10, receiver.session_state()).await.unwrap(),
            b"v1".to_vec()
        );
        let got = receive(&mut receiver, 2).await;
        assert_eq!(
            bodies_and_counts(&got),
            vec![(b"one".to_vec(), Some(2)), (b"two".to_vec(), Some(1))]
        );
        complete_all(&mut receiver, &got).await;
        eventually(5, || active(&emulator, PATH) == 0).await;
        emulator.shutdown().await;
    });
}

#[test]
fn inspection_lists_counts_sessions_holders_and_dead_letters() {
    run(async {
        let emulator = start_default().await;
        let ip = emulator.address().ip();
        let http = emulator
            .serve_http(std::net::SocketAddr::new(ip, 0))
            .await
            .unwrap();
        let mut client = client(&emulator).await;
        send(
            &mut client,
            vec![message("h", "h:1", b"x"), message("h", "h:2", b"y")],
        )
        .await;
        let mut receiver = accept(&mut client, Some("h")).await.unwrap();
        let got = receive(&mut receiver, 1).await;
        within(
            10,
            receiver.dead_letter_message(&got[0], Default::default()),
        )
        .await
        .unwrap();
        eventually(5, || {
            emulator.stats().entity(PATH).unwrap().dead_lettered == 1
        })
        .await;

        let stats = emulator.stats();
        let entity = stats.entity(PATH).unwrap();
        assert_eq!(entity.active, 1);
        assert_eq!(entity.sessions.len(), 1);
        assert_eq!(entity.sessions[0].id, "h");
        assert!(entity.sessions[0].holder.is_some());

        let (status, body) = tokio::task::spawn_blocking(move || http_get(http, "/stats"))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("\"path\":\"ordo-events/Subscriptions/projector\""),
            "{body}"
        );
        assert!(body.contains("\"dead_lettered\":1"), "{body}");
        assert!(body.contains("\"id\":\"h\""), "{body}");
        let (status, dlq) = tokio::task::spawn_blocking(move || {
            http_get(
                http,
                "/dead-letters?entity=ordo-events/Subscriptions/projector",
            )
        })
        .await
        .unwrap();
        assert_eq!(status, 200, "{dlq}");
        assert!(dlq.contains("\"message_id\":\"h:1\""), "{dlq}");
        assert!(
            dlq.contains("\"body\":\"x\""),
            "a text body reads as text: {dlq}"
        );
        emulator.shutdown().await;
    });
}
