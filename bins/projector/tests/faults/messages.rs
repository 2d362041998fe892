//! Messages that cannot be applied as they come: poison, which blocks its aggregate until
//! `repair`, and a message withheld from the topic, filled in from the events collection.

use super::*;

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
    let mut proj = env.spawn_projector(tuning()).await;
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
        &env.projector_toml(health, &tuning()),
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
    stop(&mut proj).await;
}

/// A message withheld from the topic is filled in from the events collection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withheld_message_is_filled_in_from_the_events_collection() {
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
    let _p = env.spawn_projector(tuning()).await;
    converge(&env).await;
    assert!(env.dead_letters().is_empty());
}
