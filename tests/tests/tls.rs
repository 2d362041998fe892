//! The daemons as they run against Azure: AMQPS with a private CA trusted through
//! `[servicebus] ca_file`, authorization enforced, and least-privilege keys (the producer's
//! key can only Send, the projector's only Listen). The read models equal the fold, also when
//! tokens expire under the daemons and when their keys are revoked and restored.

use std::time::Duration;

use mongodb::bson::doc;
use ordo_e2e::sample::{Generator, Workload};
use ordo_e2e::stack::{caught_up_and_folded, emulator_config, project_a_workload, write, Stack};
use ordo_servicebus_emulator::{AccessRight, AuthorizationRule};
use ordo_testkit::wait_until;

const PRODUCER_KEY: (&str, &str) = ("ordo-producer", "send-only-key");
const PROJECTOR_KEY: (&str, &str) = ("ordo-projector", "listen-only-key");

fn rule((name, key): (&str, &str), right: AccessRight) -> AuthorizationRule {
    AuthorizationRule {
        name: name.into(),
        key: key.into(),
        secondary_key: None,
        rights: vec![right],
    }
}

/// A stack serving TLS only to the daemons' least-privilege keys, with tokens cut to
/// `max_token_lifetime` when given; `None` against real services.
async fn secured_stack(max_token_lifetime: Option<Duration>) -> Option<Stack> {
    let mut config = emulator_config(Duration::from_secs(5));
    config.namespace.require_authorization = true;
    config.namespace.max_token_lifetime = max_token_lifetime;
    config.namespace.authorization_rules = vec![
        rule(PRODUCER_KEY, AccessRight::Send),
        rule(PROJECTOR_KEY, AccessRight::Listen),
    ];
    let mut stack = Stack::start_tls(config).await.unwrap();
    let (Some(producer), Some(projector), Some(_)) = (
        stack
            .bus
            .connection_string_for_key(PRODUCER_KEY.0, PRODUCER_KEY.1),
        stack
            .bus
            .connection_string_for_key(PROJECTOR_KEY.0, PROJECTOR_KEY.1),
        stack.bus.ca_file(),
    ) else {
        eprintln!("skipping: needs the emulator's TLS listener and keys");
        return None;
    };
    assert!(!producer.contains("UseDevelopmentEmulator"), "{producer}");
    stack.producer_connection_string = Some(producer);
    stack.projector_connection_string = Some(projector);
    Some(stack)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn daemons_over_tls_with_least_privilege_keys_project_every_event() {
    let Some(mut stack) = secured_stack(None).await else {
        return;
    };
    let producer = stack.producer_connection_string.clone().unwrap();
    let ca_file = stack.bus.ca_file().unwrap();

    // The keys are what they claim: the producer's cannot receive.
    ordo_core::servicebus::trust_ca_file(&ca_file).unwrap();
    let mut sender_only =
        ordo_core::servicebus::test_client(&ordo_core::secret::Secret::new(&producer), "tls-test")
            .await
            .unwrap();
    let refused = sender_only
        .create_receiver_for_subscription(
            stack.bus.topic(),
            stack.bus.subscription(),
            Default::default(),
        )
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(
        format!("{refused:?}").contains("'Listen' claim(s) are required"),
        "{refused:?}"
    );
    let _ = sender_only.dispose().await;

    project_a_workload(&mut stack, (10, 30, 12), Duration::from_millis(1), 120).await;
}

/// Tokens cut to 3 s (the emulator's test knob; azservicebus makes 30-minute tokens and cannot
/// be told otherwise): links are detached under the daemons again and again while events flow
/// for several lifetimes, and every event still reaches its read model.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn daemons_keep_publishing_and_projecting_while_tokens_expire_under_them() {
    let Some(mut stack) = secured_stack(Some(Duration::from_secs(3))).await else {
        return;
    };
    // 12 batches a second apart: the run spans four token lifetimes.
    project_a_workload(&mut stack, (10, 30, 13), Duration::from_secs(1), 180).await;
    let detaches = stack.bus.emulator().unwrap().token_expiry_detaches();
    println!("links detached by token expiry: {detaches}");
    assert!(
        detaches >= 2,
        "the tokens expired under the daemons ({detaches} detaches)"
    );
}

/// A key revoked while the daemons run: once their tokens expire they cannot put new ones
/// (401), `/readyz` answers 503 and the log says why; the key restored, both are ready again
/// and nothing written meanwhile is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_key_turns_readiness_off_and_its_return_brings_the_daemons_back() {
    let Some(mut stack) = secured_stack(Some(Duration::from_secs(3))).await else {
        return;
    };
    stack.spawn_producer().await.unwrap();
    stack.spawn_projector(0).await.unwrap();
    let workload = Workload {
        users: 10,
        orders: 10,
        events_per_aggregate: 20,
        seed: 14,
    };
    let half = workload.total_events() / 2;
    let mut generator = Generator::new(workload, "");
    write(&stack, &mut generator, half, Duration::from_millis(1)).await;
    assert_eq!(
        caught_up_and_folded(&mut stack, Duration::from_secs(120)).await,
        half
    );

    let emulator = stack.bus.emulator().unwrap();
    assert!(emulator.remove_key(PRODUCER_KEY.0));
    assert!(emulator.remove_key(PROJECTOR_KEY.0));
    write(&stack, &mut generator, half, Duration::from_millis(1)).await;
    for daemon in [
        stack.producer.as_ref().unwrap(),
        stack.projectors[0].as_ref().unwrap(),
    ] {
        wait_until(Duration::from_secs(90), || async {
            matches!(daemon.http_get("/readyz").await, Ok((503, _)))
        })
        .await;
        wait_until(Duration::from_secs(30), || async {
            daemon.logs().contains("InvalidSignature")
        })
        .await;
    }

    let emulator = stack.bus.emulator().unwrap();
    emulator.put_key(rule(PRODUCER_KEY, AccessRight::Send));
    emulator.put_key(rule(PROJECTOR_KEY, AccessRight::Listen));
    for daemon in [
        stack.producer.as_ref().unwrap(),
        stack.projectors[0].as_ref().unwrap(),
    ] {
        wait_until(Duration::from_secs(90), || daemon.is_ready()).await;
    }
    assert_eq!(
        caught_up_and_folded(&mut stack, Duration::from_secs(180)).await,
        workload.total_events()
    );
}

/// Microsoft Entra ID instead of keys: each daemon gets JWTs through azure_identity's
/// `AzureCliCredential` (an `az` stand-in on its PATH hands out tokens of the test issuer the
/// emulator trusts), the producer's principal holds Azure Service Bus Data Sender and the
/// projector's Data Receiver, over TLS; every event reaches its read model.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn daemons_authenticate_with_entra_id_and_least_privilege_roles() {
    use ordo_servicebus_emulator::{DataRole, EntraConfig, RoleAssignment};
    use ordo_testkit::entra::{TestIssuer, ISSUER};
    const PRODUCER_OID: &str = "00000000-0000-0000-0000-0000000000a1";
    const PROJECTOR_OID: &str = "00000000-0000-0000-0000-0000000000a2";
    let issuer = TestIssuer::new().unwrap();
    let mut config = emulator_config(Duration::from_secs(5));
    config.namespace.require_authorization = true;
    config.namespace.entra = Some(EntraConfig {
        issuer: ISSUER.into(),
        public_key: issuer.public_key_file(),
        role_assignments: vec![
            RoleAssignment {
                principal_id: PRODUCER_OID.into(),
                role: DataRole::Sender,
            },
            RoleAssignment {
                principal_id: PROJECTOR_OID.into(),
                role: DataRole::Receiver,
            },
        ],
    });
    let mut stack = Stack::start_tls(config).await.unwrap();
    let Ok(emulator) = stack.bus.emulator() else {
        eprintln!("skipping: needs the emulator's trusted test issuer");
        return;
    };
    let entra = format!(
        "Endpoint=sb://{}/;Authentication=AzureCli",
        emulator.address().ip()
    );
    let path = std::env::var("PATH").unwrap_or_default();
    let path_with = |oid: &str| {
        let dir = issuer.fake_azure_cli(oid).unwrap();
        vec![("PATH".to_owned(), format!("{}:{path}", dir.display()))]
    };
    stack.producer_connection_string = Some(entra.clone());
    stack.projector_connection_string = Some(entra);
    stack.producer_env = path_with(PRODUCER_OID);
    stack.projector_env = path_with(PROJECTOR_OID);
    project_a_workload(&mut stack, (5, 20, 15), Duration::from_millis(1), 120).await;
}
