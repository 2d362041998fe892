//! Rebuilds over an events collection that holds one version of an aggregate twice.

use super::*;

/// Two source documents hold v2 of one user (an events collection without the unique
/// (aggregateId, eventId) index, as a restore without it leaves it): the rebuild refuses to
/// swap in, naming the aggregate, the version and both documents, and leaves the live read
/// models, `ordo_blocked` and the collection list as they were. The fold stops there
/// (`HistoryError::Duplicate`) rather than pick one of the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_over_a_duplicated_version_swaps_nothing_and_names_it() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("d", 4, 3);
    env.insert_events(&events).await;
    let (ok, out) = run_admin(&env, &tuning(), &["reconcile"]).await;
    assert!(ok, "{out}");
    let live = raw_models(&env, "users").await;
    assert_eq!(live.len(), 2, "{live:?}");
    let names_before = env.mongo.database().list_collection_names().await.unwrap();

    let original = env
        .events()
        .find_one(doc! { "aggregateId": "d-0", "eventId": 2 })
        .await
        .unwrap()
        .expect("d-0 v2 is stored");
    let mut twin = original.clone();
    twin.remove("_id");
    let twin_id = env.events().insert_one(twin).await.unwrap().inserted_id;

    let (ok, out) = run_admin(&env, &tuning(), &["rebuild", "--projection", "users"]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("1 aggregates could not be folded") && out.contains("d-0 at v2"),
        "names the aggregate and the version: {out}"
    );
    assert!(
        out.contains("two source documents hold v2")
            && out.contains(&original.get("_id").unwrap().to_string())
            && out.contains(&twin_id.to_string()),
        "names both documents: {out}"
    );
    assert_eq!(
        raw_models(&env, "users").await,
        live,
        "the live models stay"
    );
    let blocked = env.mongo.database().collection::<Document>("ordo_blocked");
    assert_eq!(blocked.count_documents(doc! {}).await.unwrap(), 0);
    let mut names_after = env.mongo.database().list_collection_names().await.unwrap();
    let mut names_before = names_before;
    names_before.sort();
    names_after.sort();
    assert_eq!(names_after, names_before, "no shadow left, nothing created");
}
