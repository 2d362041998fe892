//! Rebuilds that must not happen, or not all of it: a projection on the events collection
//! or on ordo's own, a rebuild failing half-way, new rules that fail on old events.

use super::*;

/// A projection whose collection is the events collection, or one of ordo's own, is refused by
/// the daemon at start and by `rebuild`, and the events collection is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_on_the_events_collection_or_an_ordo_collection_is_refused() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("x", 4, 3);
    env.insert_events(&events).await;
    let rules = std::fs::read_to_string(projections_path()).unwrap();
    for (coll, why) in [
        ("events", "is the events collection"),
        // Already refused by the rules' own check, which names the reserved prefix.
        ("ordo_checkpoints", "ordo_"),
    ] {
        let bad = rules.replace(
            "collection = \"users\"",
            &format!("collection = \"{coll}\""),
        );
        assert_ne!(bad, rules);
        let path = projections_file(&bad);
        let projector = ProjectorSection {
            projections_file: path,
            ..tuning()
        };
        let (ok, out) = run_admin(&env, &projector, &["rebuild", "--projection", "users"]).await;
        assert!(!ok, "{out}");
        assert!(
            out.contains(&format!("\"{coll}\"")) && out.contains(why),
            "{out}"
        );
        let health = ordo_testkit::free_health_addr();
        let mut daemon =
            Daemon::spawn(&bin(), &env.projector_toml(health, &projector), health, &[]).unwrap();
        let status = daemon.wait_exit(Duration::from_secs(30)).await.unwrap();
        assert!(!status.success());
        assert!(daemon.logs().contains(why), "{}", daemon.logs());
    }
    assert_eq!(
        env.events().count_documents(doc! {}).await.unwrap(),
        events.len() as u64
    );
}

/// A rebuild that fails half-way (the shadow's insert refused by a fail point scoped to the
/// subcommand's connections) drops its shadow, exits non-zero and leaves the read models as
/// they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rebuild_drops_its_shadow_and_leaves_the_read_models_alone() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("f", 6, 4);
    env.insert_events(&events).await;
    let (ok, out) = run_admin(&env, &tuning(), &["reconcile"]).await;
    assert!(ok, "{out}");
    let expected = env.expected().await;
    assert!(env.converged(&expected).await);
    let before = raw_models(&env, "users").await;

    env.mongo
        .configure_fail_point(
            "failCommand",
            doc! {"mode": {"times": 1}, "data": {
                "failCommands": ["insert"], "appName": "ordo-projector-admin",
                "errorCode": 2, "errorLabels": [],
            }},
        )
        .await
        .unwrap();
    let (ok, out) = run_admin(&env, &tuning(), &["rebuild", "--projection", "users"]).await;
    env.mongo.disable_fail_point("failCommand").await.unwrap();
    assert!(!ok, "{out}");
    assert!(
        out.contains("failCommand"),
        "the fail point did not fire: {out}"
    );
    assert!(
        out.contains("rebuild of users failed; shadow users_rebuild_"),
        "{out}"
    );
    let names = env.mongo.database().list_collection_names().await.unwrap();
    assert!(
        !names.iter().any(|n| n.contains("_rebuild_")),
        "shadow collection left behind: {names:?}"
    );
    assert_eq!(raw_models(&env, "users").await, before);
}

/// New rules that fail on old events (a `set` from a payload field those events lack): the
/// rebuild swaps nothing in and blocks nothing, naming the aggregates; the live read models
/// stay. With `--allow-blocked` it swaps in what folded and blocks the rest; a later rebuild
/// with working rules replaces those blocks. Before, the first run swapped in an empty
/// collection, exited 0, and its blocks outlived a good rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_whose_rules_fail_on_old_events_swaps_nothing_unless_allowed() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("r", 4, 3);
    env.insert_events(&events).await;
    let (ok, out) = run_admin(&env, &tuning(), &["reconcile"]).await;
    assert!(ok, "{out}");
    let live = raw_models(&env, "users").await;
    assert_eq!(live.len(), 2);
    let rules = std::fs::read_to_string(projections_path()).unwrap();
    let failing = rules.replacen("\"$payload.email\"", "\"$payload.currency\"", 1);
    assert_ne!(failing, rules);
    let projector = ProjectorSection {
        projections_file: projections_file(&failing),
        ..tuning()
    };
    let blocked = env.mongo.database().collection::<Document>("ordo_blocked");

    let (ok, out) = run_admin(&env, &projector, &["rebuild", "--projection", "users"]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("2 aggregates could not be folded") && out.contains("r-0 at v1"),
        "{out}"
    );
    assert_eq!(
        raw_models(&env, "users").await,
        live,
        "the live models stay"
    );
    assert_eq!(blocked.count_documents(doc! {}).await.unwrap(), 0);
    let names = env.mongo.database().list_collection_names().await.unwrap();
    assert!(!names.iter().any(|n| n.contains("_rebuild_")), "{names:?}");

    let (ok, out) = run_admin(
        &env,
        &projector,
        &["rebuild", "--projection", "users", "--allow-blocked"],
    )
    .await;
    assert!(ok, "{out}");
    assert!(raw_models(&env, "users").await.is_empty());
    assert_eq!(
        blocked
            .count_documents(doc! {"reason": "RebuildStopped"})
            .await
            .unwrap(),
        2
    );

    let (ok, out) = run_admin(&env, &tuning(), &["rebuild", "--projection", "users"]).await;
    assert!(ok, "{out}");
    assert_eq!(blocked.count_documents(doc! {}).await.unwrap(), 0, "{out}");
    let rebuilt = raw_models(&env, "users").await;
    assert_eq!(
        rebuilt.keys().collect::<Vec<_>>(),
        live.keys().collect::<Vec<_>>()
    );
    assert!(rebuilt.values().all(|d| d.get_i64("lastEventId") == Ok(3)));
}
