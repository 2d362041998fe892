//! Repair: blocked aggregates brought back to the fold of their events.

use super::*;

/// `repair --all-blocked`, after a fix that unblocks many aggregates at once: every blocked
/// aggregate whose history folds is re-projected and unblocked; one that still cannot be (a
/// hole) keeps its block and is named with why, and the command exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_all_blocked_repairs_each_blocked_aggregate_and_names_the_rest() {
    let env = start(Duration::from_secs(5)).await;
    env.insert_events(&workload("b", 6, 3)).await;
    let db = env.mongo.database();
    db.collection::<Document>("events")
        .delete_one(doc! {"aggregateId": "b-4", "eventId": 2})
        .await
        .unwrap();
    let blocked = db.collection::<Document>("ordo_blocked");
    for id in ["b-0", "b-2", "b-4"] {
        blocked
            .insert_one(doc! {
                "_id": id, "projection": "users", "blockedAtEventId": 2_i64,
                "reason": "ProjectionError", "description": "fixed since",
                "messageId": format!("{id}:2"),
            })
            .await
            .unwrap();
    }

    let (ok, out) = run_admin(&env, &tuning(), &["repair"]).await;
    assert!(
        !ok && out.contains("--aggregate") && out.contains("--all-blocked"),
        "{out}"
    );

    let (ok, out) = run_admin(&env, &tuning(), &["repair", "--all-blocked"]).await;
    assert!(!ok, "{out}");
    assert!(out.contains("repaired 2 of 3 blocked aggregates"), "{out}");
    assert!(
        out.contains("still blocked: b-4:") && out.contains("1 aggregates are still blocked"),
        "{out}"
    );
    let left = all_documents(&blocked).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].get_str("_id"), Ok("b-4"));
    let users = raw_models(&env, "users").await;
    assert_eq!(users.keys().collect::<Vec<_>>(), ["b-0", "b-2"]);
    assert!(
        users.values().all(|d| d.get_i64("lastEventId") == Ok(3)),
        "{users:?}"
    );
}

/// Two source documents with the same version (no unique index): `repair` and `reconcile`
/// read an aggregate's events the way gap filling does, so neither folds one of them silently;
/// both name the two documents and write nothing for that aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_and_reconcile_refuse_a_duplicate_version_naming_both_documents() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("w", 1, 3);
    let mut twin = events[1].clone();
    twin.insert("_id", "twin-of-v2");
    let events_coll = env.mongo.database().collection::<Document>("events");
    events_coll.insert_many(&events).await.unwrap();
    events_coll.insert_one(twin).await.unwrap();
    let v2 = events_coll
        .find_one(doc! {"aggregateId": "w-0", "eventId": 2, "_id": {"$ne": "twin-of-v2"}})
        .await
        .unwrap()
        .unwrap();
    let v2_id = v2.get_object_id("_id").unwrap().to_hex();
    let users = env.mongo.database().collection::<Document>("users");

    let (ok, out) = run_admin(&env, &tuning(), &["repair", "--aggregate", "w-0"]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("twin-of-v2") && out.contains(&v2_id) && out.contains("eventId 2"),
        "names both documents: {out}"
    );
    assert_eq!(users.find_one(doc! {"_id": "w-0"}).await.unwrap(), None);

    let (ok, out) = run_admin(&env, &tuning(), &["reconcile", "--full"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("not caught up: w-0") && out.contains("twin-of-v2"),
        "{out}"
    );
    assert_eq!(users.find_one(doc! {"_id": "w-0"}).await.unwrap(), None);
}

/// A read model without `lastEventId` (left by the service ordo replaces) matches no guard:
/// `repair` says so and exits non-zero instead of retrying forever, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_over_a_document_without_a_version_fails_instead_of_looping() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("v", 2, 3);
    env.insert_events(&events).await;
    let users = env.mongo.database().collection::<Document>("users");
    users
        .insert_one(doc! { "_id": "v-0", "name": "legacy" })
        .await
        .unwrap();
    let (ok, out) = run_admin(&env, &tuning(), &["repair", "--aggregate", "v-0"]).await;
    assert!(!ok, "{out}");
    assert!(out.contains("users/v-0"), "{out}");
    assert!(out.contains("no numeric lastEventId"), "{out}");
    let stored = users
        .find_one(doc! { "_id": "v-0" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored, doc! { "_id": "v-0", "name": "legacy" });
}
