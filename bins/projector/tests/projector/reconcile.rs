//! Reconciliation: read models behind events that never reached the broker are caught up from
//! the events collection.

use super::*;

/// Events inserted while no producer runs never reach the broker; `ordo-projector reconcile`
/// catches up every read model from the events collection, reports the blocked aggregate and leaves
/// it alone. A second run is incremental: it checks only the aggregates with new events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_catches_up_events_that_never_reached_the_broker_and_leaves_blocked_aggregates_alone(
) {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("n", 10, 5);
    env.insert_events(&events).await;
    block(&env, "n-3", 1).await;

    let (ok, out) = run_admin(&env, &tuning(), &["reconcile"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("reconcile (full: no watermark yet): 10 aggregates checked, 10 behind, 9 read models caught up, 1 blocked (left alone), 0 not caught up"),
        "{out}"
    );
    assert!(out.contains("blocked: n-3"), "{out}");
    let mut expected = env.expected().await;
    assert!(expected.get_mut("orders").unwrap().remove("n-3").is_some());
    assert!(
        env.converged(&expected).await,
        "{}",
        env.diff(&expected).await
    );

    let more = vec![
        event(
            "n-0",
            "User",
            6,
            "UserEmailUpdated",
            doc! { "email": "n-0+6@x" },
        ),
        event(
            "n-10",
            "User",
            1,
            "UserRegistered",
            doc! { "email": "n-10@x", "name": "n-10" },
        ),
    ];
    env.insert_events(&more).await;
    let (ok, out) = run_admin(&env, &tuning(), &["reconcile"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("reconcile (incremental): 2 aggregates checked, 2 behind, 2 read models caught up, 0 blocked (left alone), 0 not caught up"),
        "{out}"
    );
    let mut expected = env.expected().await;
    expected.get_mut("orders").unwrap().remove("n-3");
    assert!(
        env.converged(&expected).await,
        "{}",
        env.diff(&expected).await
    );
    assert!(
        !env.read_models("orders").await.contains_key("n-3"),
        "a blocked aggregate was touched"
    );
    assert_eq!(blocked(&env).await, 1);
    assert_eq!(env.active(), 0, "the broker never saw these events");
}

/// Two sets of projections over one events collection (a second pipeline's read models, or a
/// projection added later) keep their own watermark: the second set's first run is a full
/// pass that builds every read model it owns. Before, it took the first set's watermark,
/// checked nothing and left all of them missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_set_of_projections_over_the_same_events_is_reconciled_in_full() {
    let env = start(Duration::from_secs(5)).await;
    env.insert_events(&workload("q", 6, 3)).await;
    let (ok, out) = run_admin(&env, &tuning(), &["reconcile"]).await;
    assert!(ok, "{out}");
    let rules = std::fs::read_to_string(projections_path()).unwrap();
    let second = rules
        .replace("collection = \"users\"", "collection = \"users_b\"")
        .replace("collection = \"orders\"", "collection = \"orders_b\"");
    assert_ne!(second, rules);
    let projector = ProjectorSection {
        projections_file: projections_file(&second),
        ..tuning()
    };
    let (ok, out) = run_admin(&env, &projector, &["reconcile"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("reconcile (full: no watermark yet): 6 aggregates checked, 6 behind, 6 read models caught up"),
        "{out}"
    );
    assert_eq!(env.read_models("users_b").await.len(), 3);
    assert_eq!(env.read_models("orders_b").await.len(), 3);
    // The first set's watermark is its own: its next run is incremental and finds nothing.
    let (ok, out) = run_admin(&env, &tuning(), &["reconcile"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("reconcile (incremental): 0 aggregates checked"),
        "{out}"
    );
}

/// With `reconcile_interval`, the daemon catches up events that never reached the broker by itself,
/// run after run (the second run is incremental), and its heartbeat expires the heartbeat of
/// a projector that died without retiring it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_reconciles_periodically_and_expires_dead_heartbeats() {
    let env = start(Duration::from_secs(5)).await;
    let heartbeats = env
        .mongo
        .database()
        .collection::<Document>(ordo_core::status::PROJECTORS_COLLECTION);
    let long_ago = DateTime::now().timestamp_millis() - 600_000;
    heartbeats
        .insert_one(doc! { "_id": "dead:1:1", "host": "dead", "updatedAt": DateTime::from_millis(long_ago) })
        .await
        .unwrap();
    let mut proj = env
        .spawn_projector(ProjectorSection {
            reconcile_interval: Some(Duration::from_millis(300)),
            ..tuning()
        })
        .await;

    let events = workload("p", 6, 4);
    env.insert_events(&events).await;
    converge(&env, &env.expected().await, CONVERGE).await;
    let p = &proj;
    wait_until(Duration::from_secs(30), || async move {
        p.metric(m::RECONCILE_CAUGHT_UP).await >= 6.0
    })
    .await;

    let runs_before = proj.metric(m::RECONCILE_RUNS).await;
    let more = vec![
        event(
            "p-0",
            "User",
            5,
            "UserEmailUpdated",
            doc! { "email": "p-0+5@x" },
        ),
        event(
            "p-1",
            "Order",
            5,
            "OrderCreated",
            doc! { "customerId": "late" },
        ),
    ];
    env.insert_events(&more).await;
    converge(&env, &env.expected().await, CONVERGE).await;
    assert!(proj.metric(m::RECONCILE_CAUGHT_UP).await >= 7.0);
    assert!(proj.metric(m::RECONCILE_RUNS).await > runs_before);
    assert!(proj.logs().contains("\"incremental\""), "{}", proj.logs());

    let hb = &heartbeats;
    wait_until(Duration::from_secs(30), || async move {
        hb.count_documents(doc! { "_id": "dead:1:1" })
            .await
            .unwrap()
            == 0
    })
    .await;
    assert_eq!(env.active(), 0, "the broker never saw these events");
    assert_eq!(proj.metric(m::EVENTS_APPLIED).await, 0.0);
    stop(&mut proj).await;
}

/// A periodic reconciliation run that fails (its aggregate commands refused by a fail point
/// scoped to the daemon's connections) is counted as a retry and logged; a later run catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reconcile_run_is_counted_and_the_next_run_catches_up() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("q", 4, 3);
    env.insert_events(&events).await;
    env.mongo
        .configure_fail_point(
            "failCommand",
            // Three: the blocked-aggregates gauge counts with an aggregate command too, and
            // may take the first.
            doc! {"mode": {"times": 3}, "data": {
                "failCommands": ["aggregate"], "appName": "ordo-projector",
                "errorCode": 2, "errorLabels": [],
            }},
        )
        .await
        .unwrap();
    let mut proj = env
        .spawn_projector(ProjectorSection {
            reconcile_interval: Some(Duration::from_millis(300)),
            ..tuning()
        })
        .await;
    converge(&env, &env.expected().await, CONVERGE).await;
    env.mongo.disable_fail_point("failCommand").await.unwrap();
    assert!(proj.metric(m::RETRIES).await >= 1.0);
    assert!(
        proj.logs().contains("reconcile run failed"),
        "{}",
        proj.logs()
    );
    assert!(proj.logs().contains("failCommand"), "{}", proj.logs());
    stop(&mut proj).await;
}
