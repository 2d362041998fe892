//! The daemons as they run against Azure: AMQPS with a private CA trusted through
//! `[servicebus] ca_file`, authorization enforced, and least-privilege keys (the producer's
//! key can only Send, the projector's only Listen). The read models equal the fold.

use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};
use ordo_e2e::sample::{insert, Generator, Workload};
use ordo_e2e::stack::{emulator_config, Stack};
use ordo_servicebus_emulator::{AccessRight, AuthorizationRule};

const PRODUCER_KEY: (&str, &str) = ("ordo-producer", "send-only-key");
const PROJECTOR_KEY: (&str, &str) = ("ordo-projector", "listen-only-key");

fn rule((name, key): (&str, &str), right: AccessRight) -> AuthorizationRule {
    AuthorizationRule {
        name: name.into(),
        key: key.into(),
        rights: vec![right],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn daemons_over_tls_with_least_privilege_keys_project_every_event() {
    let mut config = emulator_config(Duration::from_secs(5));
    config.namespace.require_authorization = true;
    config.namespace.authorization_rules = vec![
        rule(PRODUCER_KEY, AccessRight::Send),
        rule(PROJECTOR_KEY, AccessRight::Listen),
    ];
    let mut stack = Stack::start_tls(config).await.unwrap();
    let (Some(producer), Some(projector), Some(ca_file)) = (
        stack
            .bus
            .connection_string_for_key(PRODUCER_KEY.0, PRODUCER_KEY.1),
        stack
            .bus
            .connection_string_for_key(PROJECTOR_KEY.0, PROJECTOR_KEY.1),
        stack.bus.ca_file(),
    ) else {
        eprintln!("skipping: needs the emulator's TLS listener and keys");
        return;
    };
    assert!(!producer.contains("UseDevelopmentEmulator"), "{producer}");

    // The keys are what they claim: the producer's cannot receive.
    ordo_core::servicebus::trust_ca_file(&ca_file).unwrap();
    let mut sender_only =
        ordo_core::servicebus::connect(&ordo_core::secret::Secret::new(&producer), "tls-test")
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

    stack.producer_connection_string = Some(producer);
    stack.projector_connection_string = Some(projector);
    stack.spawn_producer().await.unwrap();
    stack.spawn_projector(0).await.unwrap();

    let workload = Workload {
        users: 10,
        orders: 10,
        events_per_aggregate: 30,
        seed: 12,
    };
    let events = stack.db().collection::<Document>("events");
    let mut generator = Generator::new(workload, "");
    let mut written = 0;
    while written < workload.total_events() {
        let batch = generator.next_batch(50);
        if batch.is_empty() {
            break;
        }
        written += batch.len();
        insert(&events, batch).await.unwrap();
    }
    assert_eq!(written, workload.total_events());

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        stack.check_alive().unwrap();
        let (done, aggregates) = stack.caught_up().await.unwrap();
        if aggregates > 0 && done == aggregates {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "read models did not catch up over TLS: {done}/{aggregates}"
        );
        tokio::time::sleep(ordo_testkit::wait::POLL_INTERVAL).await;
    }
    let verdict = stack.verify().await.unwrap();
    assert!(
        verdict.ok(),
        "{} read models differ from the fold, e.g. {:?}",
        verdict.mismatches.len(),
        verdict.mismatches.first()
    );
    let aggregates = events.distinct("aggregateId", doc! {}).await.unwrap().len();
    assert_eq!(verdict.aggregates, aggregates);
    assert_eq!(verdict.events, workload.total_events());
}
