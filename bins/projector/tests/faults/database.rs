//! Database faults: a read preference the projector must not follow, fail points on the
//! read-model writes, and a fault longer than the broker's delivery count allows.

use super::*;

/// `readPreference=secondary` in the URI does not send ordo's reads to a replica, whose lag
/// would read as a gap (blocked after `gap_timeout`) or as a stale read model: the stand-in is
/// a one-member replica set with no secondary, so every read that followed the URI would find
/// no server. A withheld event is filled in all the same, and the projector says the setting is
/// ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_read_preference_in_the_uri_is_not_followed() {
    let env = start(Duration::from_secs(5)).await;
    let hello = env
        .mongo
        .database()
        .run_command(doc! { "hello": 1 })
        .await
        .unwrap();
    let set = hello.get_str("setName").expect("a replica set").to_string();
    let direct = env.mongo.uri();
    let secondary = direct.replace(
        "directConnection=true",
        &format!("replicaSet={set}&readPreference=secondary&serverSelectionTimeoutMS=3000"),
    );
    assert_ne!(direct, secondary);
    let events = workload("s", 4, 8);
    env.insert_events(&events).await;
    for e in events.iter().filter(|e| e.get_i64("eventId").unwrap() != 4) {
        env.publish(std::slice::from_ref(e)).await;
    }
    let mut p = env.spawn_unready(|c| c.set("mongodb", "uri", secondary));
    p.wait_ready(Duration::from_secs(30)).await.unwrap();
    converge(&env).await;
    assert!(env.dead_letters().is_empty(), "{:?}", env.dead_letters());
    assert!(
        p.logs().contains("readPreference is ignored"),
        "{}",
        p.logs()
    );
}

/// A fail point on the read-model writes is retried in place, never dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_fail_points_are_retried_not_dead_lettered() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("f", 6, 10);
    env.insert_events(&events).await;
    // On inserts only: the first write of each new read model is one, and nothing else of the
    // projector inserts here (its heartbeat is an update, which on a loaded machine could
    // otherwise use up the failures before any worker wrote). WriteConflict (112) is not a
    // retryable write for the driver, so each of the three failures reaches a worker as an
    // error of its own, whichever of the concurrent inserts meets it. (A retryable code such as
    // 91 would let three concurrent inserts each absorb one failure in the driver's own retry.)
    env.mongo
        .configure_fail_point(
            "failCommand",
            doc! { "mode": { "times": 3 }, "data": { "failCommands": ["insert"], "errorCode": 112 } },
        )
        .await
        .unwrap();
    let p = env.spawn_projector(tuning()).await;
    env.publish(&events).await;
    converge(&env).await;
    assert!(env.dead_letters().is_empty(), "{:?}", env.dead_letters());
    // The fail point fired: the projector's workers (the only inserters) used up its three
    // failures, met each as an error, and retried it.
    let retries = p
        .metric_where(ordo_core::metrics::RETRIES, ("operation", "apply"))
        .await;
    assert!(
        retries >= 3.0,
        "{retries} apply retries counted\n{}",
        p.logs()
    );
    // Labelled with the driver's class of the error (WriteConflict, 112, is transient), as
    // the producer's MongoDB retries are.
    let labelled = p
        .metric_where(
            ordo_core::metrics::RETRIES,
            ("reason", "transient_server_error"),
        )
        .await;
    assert!(
        labelled >= 3.0,
        "{labelled} retries labelled transient_server_error\n{}",
        p.logs()
    );
    env.mongo
        .database()
        .collection::<mongodb::bson::Document>("fail_point_probe")
        .insert_one(doc! { "probe": 1 })
        .await
        .expect("the fail point still had failures left: the projector did not meet them all");
}

/// A database fault far longer than `transient_retry_limit` retries: the projector keeps its
/// sessions and retries in place, so the broker's delivery count never reaches its maximum
/// (3 here) and nothing is dead-lettered; every event is applied once the fault is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_database_fault_never_reaches_the_max_delivery_count() {
    let env = start_with(Duration::from_secs(5), |cfg| {
        cfg.namespace.session_accept_timeout = Duration::from_secs(1);
        cfg.topics[0].subscriptions[0].max_delivery_count = 3;
    })
    .await;
    let events = workload("md", 2, 4);
    env.insert_events(&events).await;
    let failures = 40;
    env.mongo
        .configure_fail_point(
            "failCommand",
            // WriteConflict: transient without making the driver rediscover the server, so
            // the 40 failures take seconds, not one server-selection timeout each. Inserts
            // only: the first write of each read model is one, and no other writer of the
            // projector inserts (its heartbeat is an upsert), so the retries metric counts
            // exactly these failures.
            doc! { "mode": { "times": failures }, "data": { "failCommands": ["insert"], "errorCode": 112 } },
        )
        .await
        .unwrap();
    let p = env
        .spawn_projector(ProjectorSection {
            transient_retry_limit: 2,
            max_concurrent_sessions: 2,
            ..tuning()
        })
        .await;
    env.publish(&events).await;
    converge(&env).await;
    assert!(env.dead_letters().is_empty(), "{:?}", env.dead_letters());
    // Every failure met a batch write: each one was retried and counted.
    let retries = p.metric(ordo_core::metrics::RETRIES).await;
    assert!(
        retries >= f64::from(failures),
        "{retries} retries\n{}",
        p.logs()
    );
    env.mongo
        .database()
        .collection::<Document>("fail_point_probe")
        .insert_one(doc! { "probe": 1 })
        .await
        .expect("the fail point is spent");
}
