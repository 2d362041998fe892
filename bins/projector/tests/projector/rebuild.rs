//! Rebuilds: a new set of read models built beside the live one and swapped in.

use super::*;

/// `rebuild` under live traffic, with new rules (UserRegistered also sets `tier`), while a
/// projector still running the old rules holds every session, with its cached models, across
/// the swap:
/// - the application's unique index survives the swap;
/// - an invalid event does not abort the rebuild: its aggregate is rebuilt up to the event
///   before and blocked;
/// - a shadow left by a crashed rebuild is dropped, and none is left behind;
/// - events applied to the old collection during the replay are caught up;
/// - the held sessions' cached models fail their guard on the rebuild epoch instead of
///   overwriting rebuilt documents of the same version (the quiet aggregates get no event
///   during the rebuild, so their cache holds exactly the rebuilt version).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_under_live_traffic_keeps_indexes_and_beats_sessions_held_across_the_swap() {
    let env = start(Duration::from_secs(5)).await;
    let mut proj = sixteen_sessions_held(&env).await;
    let new_rules = prepare_a_rebuild_with_new_rules(&env).await;
    let conflicts_before = proj.metric(m::GUARD_CONFLICTS).await;

    // Live traffic on half of the users during the rebuild; the other half stays quiet.
    let busy = ["r-0", "r-4", "r-8", "r-12"];
    let quiet = ["r-2", "r-6", "r-10", "r-14"];
    rebuild_under_traffic_on(&env, &new_rules.path, &busy).await;
    one_more_event_for_every_user(&env, &busy, &quiet).await;

    let want = users_reach_the_fold_under(&env, &new_rules.text).await;
    for id in quiet {
        assert_eq!(
            want[id].get_str("tier").ok(),
            Some("gold"),
            "the fold under the new rules sets tier"
        );
    }
    assert!(
        proj.metric(m::GUARD_CONFLICTS).await - conflicts_before >= quiet.len() as f64,
        "the cached models never met the rebuild epoch in their guard"
    );
    assert_eq!(proj.metric(m::SESSIONS_HELD).await, 16.0);
    assert_eq!(proj.metric(m::LOCKS_LOST).await, 0.0);

    the_invalid_aggregate_is_blocked_and_the_swap_kept_the_index(&env).await;
    assert!(env.dead_letters().is_empty(), "{:?}", env.dead_letters());
    stop(&mut proj).await;
}

/// Sixteen users projected by a projector that holds all sixteen sessions (and their cached
/// models) for as long as the test runs.
async fn sixteen_sessions_held(env: &Env) -> Daemon {
    let events = workload("r", 16, 10);
    env.insert_events(&events).await;
    env.publish(&events).await;
    let proj = env
        .spawn_projector(ProjectorSection {
            max_concurrent_sessions: 16,
            session_idle_timeout: Duration::from_secs(300),
            busy_session_idle_timeout: Duration::from_secs(300),
            ..tuning()
        })
        .await;
    converge(env, &env.expected().await, CONVERGE).await;
    let p = &proj;
    wait_until(Duration::from_secs(30), || async move {
        p.metric(m::SESSIONS_HELD).await == 16.0
    })
    .await;
    proj
}

/// The new rules of a rebuild, as text and as the file the rebuild reads.
struct Rules {
    text: String,
    path: std::path::PathBuf,
}

/// What the rebuild meets: the application's unique index on `users`, a shadow left by a
/// crashed rebuild, new rules (UserRegistered also sets `tier`), and an aggregate whose second
/// event is invalid.
async fn prepare_a_rebuild_with_new_rules(env: &Env) -> Rules {
    let db = env.mongo.database();
    db.collection::<Document>("users")
        .create_index(
            IndexModel::builder()
                .keys(doc! { "email": 1 })
                .options(
                    IndexOptions::builder()
                        .name("email_unique".to_string())
                        .unique(true)
                        .sparse(true)
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
    db.create_collection("users_rebuild_1").await.unwrap();
    let old_rules = std::fs::read_to_string(projections_path()).unwrap();
    let new_rules = old_rules.replace(
        "status = \"active\", ",
        "status = \"active\", tier = \"gold\", ",
    );
    assert_ne!(new_rules, old_rules);
    let rules_path = projections_file(&new_rules);
    // Never published (the producer parks an event whose payload is not a document).
    env.insert_events(&[event(
        "bad-0",
        "User",
        1,
        "UserRegistered",
        doc! { "email": "bad-0@x", "name": "bad" },
    )])
    .await;
    env.events()
        .insert_one(doc! {
            "aggregateId": "bad-0", "aggregateType": "User", "eventId": 2_i64,
            "eventType": "UserEmailUpdated", "payload": "not a document",
            "timestamp": DateTime::now(),
        })
        .await
        .unwrap();
    Rules {
        text: new_rules,
        path: rules_path,
    }
}

/// Runs `rebuild` with the rules at `rules_path` while events of the `busy` users keep
/// arriving, and checks what it reports: rebuilt, the stale shadow dropped, bad-0 blocked.
async fn rebuild_under_traffic_on(env: &Env, rules_path: &std::path::Path, busy: &[&str]) {
    let done = AtomicBool::new(false);
    let traffic = async {
        let mut v = 11;
        let mut sent = 0;
        while !done.load(Ordering::Relaxed) || sent == 0 {
            let batch: Vec<Document> = busy
                .iter()
                .map(|id| {
                    event(
                        id,
                        "User",
                        v,
                        "UserEmailUpdated",
                        doc! { "email": format!("{id}+{v}@x") },
                    )
                })
                .collect();
            env.insert_events(&batch).await;
            env.publish(&batch).await;
            sent += batch.len();
            v += 1;
        }
        sent
    };
    let rebuild = async {
        let r = run_admin(
            env,
            &ProjectorSection {
                projections_file: rules_path.to_path_buf(),
                ..tuning()
            },
            &["rebuild", "--projection", "users", "--allow-blocked"],
        )
        .await;
        done.store(true, Ordering::Relaxed);
        r
    };
    let (sent, (ok, out)) = tokio::join!(traffic, rebuild);
    assert!(ok, "{out}");
    assert!(sent > 0);
    assert!(out.contains("rebuilt users"), "{out}");
    assert!(
        out.contains("dropped stale shadow users_rebuild_1"),
        "{out}"
    );
    assert!(out.contains("blocked: bad-0 at v2"), "{out}");
}

/// One more event for every user: the quiet ones reach a worker whose cache predates the swap
/// and holds the rebuilt version.
async fn one_more_event_for_every_user(env: &Env, busy: &[&str], quiet: &[&str]) {
    let last: Vec<Document> = busy
        .iter()
        .chain(quiet.iter())
        .map(|id| {
            event(
                id,
                "User",
                100,
                "UserEmailUpdated",
                doc! { "email": format!("{id}+last@x") },
            )
        })
        .collect();
    // Versions must stay contiguous: fill each aggregate up to v99 in the events collection
    // only (the projector catches them up from there).
    let mut fill = Vec::new();
    for id in busy.iter().chain(quiet.iter()) {
        let top = env
            .events()
            .find_one(doc! { "aggregateId": id })
            .sort(doc! { "eventId": -1 })
            .await
            .unwrap()
            .unwrap();
        let top = ordo_projection::event_version(&top);
        for v in top + 1..100 {
            fill.push(event(
                id,
                "User",
                v,
                "UserEmailUpdated",
                doc! { "email": format!("{id}+{v}@x") },
            ));
        }
    }
    env.insert_events(&fill).await;
    env.insert_events(&last).await;
    env.publish(&last).await;
}

/// Waits until `users` (but bad-0) equals the fold of the events collection under `rules`, and
/// nothing is left on the subscription; panics with the users that differ otherwise. Returns
/// the fold.
async fn users_reach_the_fold_under(env: &Env, rules: &str) -> BTreeMap<String, Document> {
    let projections = compile(rules);
    let mut expected = env.fold(&projections, &["bad-0"]).await;
    let want = expected.remove("users").unwrap();
    let reached = tokio::time::timeout(CONVERGE, async {
        loop {
            if models(env, "users", &["bad-0"]).await == want && env.pending() == 0 {
                break;
            }
            tokio::time::sleep(ordo_testkit::wait::POLL_INTERVAL).await;
        }
    })
    .await;
    if reached.is_err() {
        let got = models(env, "users", &["bad-0"]).await;
        let wrong: Vec<_> = want
            .iter()
            .filter(|(id, d)| got.get(*id) != Some(*d))
            .map(|(id, d)| format!("{id}: want {d}, got {:?}", got.get(id)))
            .collect();
        panic!("users differ from the fold under the new rules: {wrong:#?}");
    }
    want
}

/// After the swap: bad-0 rebuilt up to the event before its invalid one and blocked at it, the
/// application's unique index kept, and no shadow collection left.
async fn the_invalid_aggregate_is_blocked_and_the_swap_kept_the_index(env: &Env) {
    let db = env.mongo.database();
    let users = db.collection::<Document>("users");
    let bad = users
        .find_one(doc! { "_id": "bad-0" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bad.get_i64("lastEventId").unwrap(), 1);
    let record = db
        .collection::<Document>("ordo_blocked")
        .find_one(doc! { "_id": "bad-0" })
        .await
        .unwrap()
        .expect("bad-0 blocked");
    assert_eq!(record.get_i64("blockedAtEventId").unwrap(), 2);
    assert!(
        record.get_str("description").unwrap().contains("payload"),
        "{record}"
    );
    let indexes = users.list_index_names().await.unwrap();
    assert!(indexes.contains(&"email_unique".to_string()), "{indexes:?}");
    let names = db.list_collection_names().await.unwrap();
    assert!(
        !names.iter().any(|n| n.contains("_rebuild_")),
        "shadow collection left behind: {names:?}"
    );
}
