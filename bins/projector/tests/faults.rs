//! Faults: poison and repair, withheld messages, database fail points, slow projections.

mod common;

use std::time::Duration;

use common::*;
use mongodb::bson::{doc, Document};
use ordo_testkit::{wait_until, Daemon};

async fn converge(env: &Env) {
    let expected = env.expected().await;
    let e = &expected;
    let wait = wait_until(Duration::from_secs(90), || async move {
        env.converged(e).await && env.pending() == 0
    });
    if tokio::time::timeout(Duration::from_secs(95), wait)
        .await
        .is_err()
    {
        panic!("{}", env.diff(&expected).await);
    }
}

/// A poison message is dead-lettered, its aggregate blocked and later events withheld; `repair`
/// re-projects it from the events collection and lifts the block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_blocks_the_aggregate_until_repair() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("p", 2, 6);
    env.insert_events(&events).await;
    let order: Vec<Document> = events
        .iter()
        .filter(|e| e.get_str("aggregateId").unwrap() == "p-1")
        .cloned()
        .collect();
    let mut proj = env.spawn_projector("").await;
    env.publish(&order[..2]).await;
    env.publish_raw("p-1", "p-1:3", b"{not json").await;
    env.publish(&order[3..]).await;
    wait_until(Duration::from_secs(60), || async {
        env.dead_letters().len() == 4
    })
    .await;
    let dl = env.dead_letters();
    assert_eq!(dl[0].message_id.as_deref(), Some("p-1:3"));
    assert_eq!(dl[0].reason.as_deref(), Some("UndecodableMessage"));
    assert!(
        dl[1..]
            .iter()
            .all(|d| d.reason.as_deref() == Some("AggregateBlocked")),
        "{dl:?}"
    );
    let blocked = env
        .mongo
        .database()
        .collection::<Document>("ordo_blocked")
        .find_one(doc! { "_id": "p-1" })
        .await
        .unwrap()
        .expect("blocked record");
    assert_eq!(blocked.get_i64("blockedAtEventId").unwrap(), 3);
    let models = env.read_models("orders").await;
    assert_eq!(
        models["p-1"].get_i64("lastEventId").unwrap(),
        2,
        "nothing applied over the hole"
    );

    let health = ordo_testkit::free_health_addr();
    let mut repair = Daemon::spawn_with_args(
        &bin(),
        &env.projector_toml(health, ""),
        health,
        &[],
        &["repair", "--aggregate", "p-1"],
    )
    .unwrap();
    let status = repair.wait_exit(Duration::from_secs(60)).await.unwrap();
    assert!(status.success(), "{}", repair.logs());
    let expected = env.expected().await;
    assert_eq!(
        env.read_models("orders").await["p-1"],
        expected["orders"]["p-1"]
    );
    assert_eq!(
        env.mongo
            .database()
            .collection::<Document>("ordo_blocked")
            .count_documents(doc! {})
            .await
            .unwrap(),
        0
    );
    proj.sigterm().unwrap();
    assert!(proj
        .wait_exit(Duration::from_secs(15))
        .await
        .unwrap()
        .success());
}

/// A message withheld from the topic is healed from the events collection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withheld_message_is_healed_from_the_events_collection() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("g", 4, 8);
    env.insert_events(&events).await;
    let published: Vec<Document> = events
        .iter()
        .filter(|e| e.get_i64("eventId").unwrap() != 4)
        .cloned()
        .collect();
    for e in &published {
        env.publish(std::slice::from_ref(e)).await;
    }
    let _p = env.spawn_projector("").await;
    converge(&env).await;
    assert!(env.dead_letters().is_empty());
}

/// A fail point on update/insert is retried in place, never dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_fail_points_are_retried_not_dead_lettered() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("f", 6, 10);
    env.insert_events(&events).await;
    env.mongo
        .configure_fail_point(
            "failCommand",
            doc! { "mode": { "times": 3 }, "data": { "failCommands": ["update", "insert"], "errorCode": 91 } },
        )
        .await
        .unwrap();
    let p = env.spawn_projector("").await;
    env.publish(&events).await;
    converge(&env).await;
    assert!(env.dead_letters().is_empty(), "{:?}", env.dead_letters());
    // The fail point fired: every failed write was retried.
    let retries = p.metric(ordo_core::metrics::RETRIES).await;
    assert!(retries >= 3.0, "{retries} retries counted\n{}", p.logs());
}

/// A projection slower than the lock duration keeps its session: the lock is renewed during
/// the apply, nothing is redelivered to another worker, nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_slower_than_the_lock_keeps_its_session() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("s", 2, 3);
    env.insert_events(&events).await;
    let _a = env.spawn_projector("apply_delay = \"7s\"").await;
    let _b = env.spawn_projector("apply_delay = \"7s\"").await;
    env.publish(&events).await;
    converge(&env).await;
    assert!(env.dead_letters().is_empty(), "{:?}", env.dead_letters());
}
