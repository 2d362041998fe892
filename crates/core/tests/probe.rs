//! The projector's Service Bus probe against the emulator, over a real socket: it answers
//! while the broker does, notices an outage on its next check, and names what refuses it.

use std::time::Duration;

use ordo_core::secret::Secret;
use ordo_core::servicebus::receiver::{ReceiveError, SubscriptionProbe};
use ordo_testkit::TestServiceBus;

const BOUND: Duration = Duration::from_secs(10);

async fn open(
    sb: &TestServiceBus,
    conn: &str,
    subscription: &str,
) -> Result<SubscriptionProbe, ReceiveError> {
    tokio::time::timeout(
        BOUND,
        SubscriptionProbe::open(&Secret::new(conn), sb.topic(), subscription, "probe-test"),
    )
    .await
    .expect("an open is answered")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_follows_the_broker_through_an_outage() {
    let sb = TestServiceBus::start().await.unwrap();
    if sb.is_external() {
        eprintln!("skipped: cannot suspend an external namespace");
        return;
    }
    let mut probe = open(&sb, sb.connection_string(), sb.subscription())
        .await
        .unwrap();
    probe.check().await.expect("a live broker answers");
    probe
        .check()
        .await
        .expect("and answers again on the same connection");
    sb.suspend().await.unwrap();
    // The client sometimes errs at once and sometimes never answers on a connection the
    // broker dropped (2 runs in 6 here); the daemon bounds every check, so either is a
    // failure. What must never happen is a success.
    let failed = tokio::time::timeout(BOUND, probe.check()).await;
    assert!(
        !matches!(failed, Ok(Ok(()))),
        "a check on a connection the broker dropped does not succeed: {failed:?}"
    );
    let reopened = tokio::time::timeout(
        BOUND,
        SubscriptionProbe::open(
            &Secret::new(sb.connection_string()),
            sb.topic(),
            sb.subscription(),
            "probe-test",
        ),
    )
    .await;
    assert!(
        matches!(reopened, Ok(Err(_))),
        "no probe opens while the broker is down"
    );
    sb.resume().await.unwrap().unwrap();
    let mut probe = open(&sb, sb.connection_string(), sb.subscription())
        .await
        .unwrap();
    probe.check().await.expect("the broker answers again");
    probe.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_names_a_missing_subscription_and_a_wrong_key() {
    let sb = TestServiceBus::start().await.unwrap();
    let missing = open(&sb, sb.connection_string(), "no-such-subscription").await;
    match missing {
        Err(ReceiveError::Refused { condition, .. }) => assert_eq!(condition, "amqp:not-found"),
        other => panic!("a missing subscription is refused as not found: {other:?}"),
    }
    let Some(wrong) = sb.connection_string_for_key("RootManageSharedAccessKey", "d3Jvbmcga2V5")
    else {
        eprintln!("skipped: no key of its own against an external namespace");
        return;
    };
    let refused = open(&sb, &wrong, sb.subscription()).await;
    assert!(
        matches!(refused, Err(ReceiveError::Unauthorized(_))),
        "a wrong key is refused as unauthorized: {refused:?}"
    );
}
