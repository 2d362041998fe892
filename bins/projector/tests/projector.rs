//! The projector as real processes against SecantusDB and the embedded emulator.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::IndexOptions;
use mongodb::IndexModel;
use ordo_core::metrics as m;
use ordo_testkit::{wait_for, wait_until, Daemon};

const CONVERGE: Duration = Duration::from_secs(120);

/// Waits until every read model equals the fold and nothing is left on the subscription;
/// panics with a diff otherwise.
async fn converge(env: &Env, expected: &Expected, within: Duration) {
    let deadline = Instant::now() + within;
    while !(env.converged(expected).await && env.pending() == 0) {
        if Instant::now() >= deadline {
            panic!(
                "not converged within {within:?}; pending {}\n{}\n{:?}",
                env.pending(),
                env.diff(expected).await,
                env.emulator.stats()
            );
        }
        tokio::time::sleep(ordo_testkit::wait::POLL_INTERVAL).await;
    }
}

/// Publishes `events` before any projector runs and checks with the emulator that the
/// subscription holds exactly one message per event (resends removed by duplicate detection).
async fn publish_and_confirm(env: &Env, events: &[Document]) {
    env.publish(events).await;
    wait_until(Duration::from_secs(30), || async {
        env.active() >= events.len()
    })
    .await;
    assert_eq!(env.active(), events.len(), "one message per event");
}

async fn blocked(env: &Env) -> u64 {
    env.mongo
        .database()
        .collection::<Document>("ordo_blocked")
        .count_documents(doc! {})
        .await
        .unwrap()
}

async fn raw_snapshot(env: &Env, expected: &Expected) -> Expected {
    let mut out = BTreeMap::new();
    for coll in expected.keys() {
        out.insert(coll.clone(), raw_models(env, coll).await);
    }
    out
}

async fn stop_all(procs: &mut [Daemon]) {
    for p in procs.iter() {
        p.sigterm().unwrap();
    }
    for p in procs.iter_mut() {
        let status = p.wait_exit(Duration::from_secs(15)).await.unwrap();
        assert!(status.success(), "{status:?}\n{}", p.logs());
    }
}

/// Three projectors share N x 20 events (100 aggregates; 500 with `ORDO_TEST_SCALE=full`);
/// every read model equals the fold of the events collection. The whole stream sent again
/// under new MessageIds (a redelivery the broker's duplicate detection does not catch) changes
/// no document, not even `lastUpdatedAt`: a batch of duplicates writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_projectors_converge_to_the_fold_and_replayed_duplicates_change_nothing() {
    let env = start(Duration::from_secs(5)).await;
    let n = aggregates(100);
    let events = workload("a", n, 20);
    env.insert_events(&events).await;
    let expected = env.expected().await;
    publish_and_confirm(&env, &events).await;
    let mut procs = Vec::new();
    for _ in 0..3 {
        procs.push(env.spawn_projector("").await);
    }
    converge(&env, &expected, CONVERGE).await;
    let applied: f64 = sum(&procs, m::EVENTS_APPLIED).await;
    assert!(applied >= events.len() as f64, "applied {applied}");
    let before = raw_snapshot(&env, &expected).await;
    let dups_before = sum(&procs, m::DUPLICATES).await;

    env.publish_with(&events, ":replay").await;
    let procs_ref = &procs;
    let want = dups_before + events.len() as f64;
    let envr = &env;
    let wait = wait_until(CONVERGE, || async move {
        sum(procs_ref, m::DUPLICATES).await >= want && envr.pending() == 0
    });
    if tokio::time::timeout(CONVERGE + Duration::from_secs(5), wait)
        .await
        .is_err()
    {
        panic!(
            "duplicates {} of {want}, pending {}",
            sum(&procs, m::DUPLICATES).await,
            env.pending()
        );
    }
    assert_eq!(
        raw_snapshot(&env, &expected).await,
        before,
        "replayed duplicates changed a document"
    );
    assert_eq!(sum(&procs, m::EVENTS_APPLIED).await, applied);
    assert!(env.dead_letters().is_empty(), "{:?}", env.dead_letters());
    assert_eq!(blocked(&env).await, 0);
    stop_all(&mut procs).await;
}

async fn sum(procs: &[Daemon], name: &str) -> f64 {
    let mut total = 0.0;
    for p in procs {
        total += p.metric(name).await;
    }
    total
}

/// One of three projectors is killed with SIGKILL while it holds sessions; once their locks
/// expire the others take them over, and every read model still equals the fold: nothing
/// blocked, nothing dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_killed_mid_run_loses_nothing() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("k", 30, 20);
    env.insert_events(&events).await;
    let expected = env.expected().await;
    publish_and_confirm(&env, &events).await;
    // Small batches with a pause each keep the run going long enough to kill it mid-way.
    let slow = "batch_size = 4\napply_delay = \"150ms\"";
    let mut procs = Vec::new();
    for _ in 0..3 {
        procs.push(env.spawn_projector(slow).await);
    }
    let procs_ref = &procs;
    let victim = wait_for(Duration::from_secs(60), || async move {
        for (i, p) in procs_ref.iter().enumerate() {
            if p.metric(m::SESSIONS_HELD).await > 0.0 && p.metric(m::EVENTS_APPLIED).await > 0.0 {
                return Some(i);
            }
        }
        None
    })
    .await;
    procs[victim].kill9().unwrap();
    let status = procs[victim]
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap();
    assert!(!status.success());
    assert!(
        !env.converged(&expected).await,
        "the kill came after the run had finished; nothing was tested"
    );
    converge(&env, &expected, CONVERGE).await;
    assert!(env.dead_letters().is_empty(), "{:?}", env.dead_letters());
    assert_eq!(blocked(&env).await, 0);
    let mut survivors: Vec<Daemon> = procs
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, p)| p)
        .collect();
    stop_all(&mut survivors).await;
}

/// SIGTERM while sessions are held and a batch is being applied: the batch finishes, the
/// sessions are released and the process exits 0 within the grace period (10 s); a fresh
/// projector then finishes the work, so nothing was settled that was not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_sessions_held_exits_zero_within_the_grace_period() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("t", 6, 5);
    env.insert_events(&events).await;
    let expected = env.expected().await;
    publish_and_confirm(&env, &events).await;
    let mut proj = env
        .spawn_projector("batch_size = 2\napply_delay = \"2s\"")
        .await;
    let p = &proj;
    wait_until(Duration::from_secs(30), || async move {
        p.metric(m::SESSIONS_HELD).await > 0.0
    })
    .await;
    let sent = Instant::now();
    proj.sigterm().unwrap();
    let status = proj.wait_exit(Duration::from_secs(15)).await.unwrap();
    let took = sent.elapsed();
    assert!(status.success(), "{status:?}\n{}", proj.logs());
    assert!(took < Duration::from_secs(10), "exit took {took:?}");
    assert!(
        !env.converged(&expected).await,
        "the run had finished before SIGTERM; nothing was tested"
    );

    let mut next = env.spawn_projector("").await;
    converge(&env, &expected, CONVERGE).await;
    assert!(env.dead_letters().is_empty(), "{:?}", env.dead_letters());
    stop(&mut next).await;
}

/// A process's sessions share `[projector] connections` AMQP connections however many it works
/// at once: 16 workers on 2 connections hold more sessions at a time than there are
/// connections, several on one connection, while the emulator never counts more than 2 plus
/// the readiness probe's; every read model equals the fold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_sessions_share_two_connections() {
    let env = start(Duration::from_secs(5)).await;
    let events = workload("c", 48, 3);
    env.insert_events(&events).await;
    let expected = env.expected().await;
    publish_and_confirm(&env, &events).await;
    // The test's own publisher has closed its connection: from here on, every connection is
    // the projector's.
    wait_until(Duration::from_secs(10), || async {
        env.emulator.stats().connections == 0
    })
    .await;
    let mut proj = env
        .spawn_projector("max_concurrent_sessions = 16\nconnections = 2\napply_delay = \"300ms\"")
        .await;
    let (mut most_connections, mut most_held, mut most_on_one) = (0, 0, 0);
    let deadline = Instant::now() + CONVERGE;
    while !(env.converged(&expected).await && env.pending() == 0) {
        assert!(
            Instant::now() < deadline,
            "not converged\n{}",
            env.diff(&expected).await
        );
        let stats = env.emulator.stats();
        most_connections = most_connections.max(stats.connections);
        let mut per_connection: BTreeMap<String, usize> = BTreeMap::new();
        let sub = stats
            .entity(&format!("{TOPIC}/Subscriptions/{SUB}"))
            .unwrap();
        for holder in sub.sessions.iter().filter_map(|s| s.holder.as_deref()) {
            // `container-id/link-name`, and azservicebus names a link `{container-id};…`: the
            // part before the `;` names the connection.
            let container = holder.split(';').next().unwrap_or(holder);
            *per_connection.entry(container.to_string()).or_default() += 1;
        }
        most_held = most_held.max(per_connection.values().sum::<usize>());
        most_on_one = most_on_one.max(per_connection.values().copied().max().unwrap_or(0));
        tokio::time::sleep(ordo_testkit::wait::POLL_INTERVAL).await;
    }
    assert!(
        most_connections <= 3,
        "{most_connections} connections at once; 2 for sessions and 1 for the probe expected"
    );
    assert!(
        most_held > 3 && most_on_one >= 2,
        "at most {most_held} sessions held at once, {most_on_one} on one connection: nothing was shared"
    );
    eprintln!("connections {most_connections}, sessions held at once {most_held}, on one connection {most_on_one}");
    assert!(env.dead_letters().is_empty(), "{:?}", env.dead_letters());
    stop(&mut proj).await;
}

/// Runs a one-shot subcommand (`reconcile`, `rebuild`, ...) with the test configuration plus
/// `extra`; returns whether it exited 0 and its output.
async fn run_admin(env: &Env, extra: &str, args: &[&str]) -> (bool, String) {
    let health = ordo_testkit::free_health_addr();
    let mut d = Daemon::spawn_with_args(
        &bin(),
        &env.projector_toml(health, extra),
        health,
        &[],
        args,
    )
    .unwrap();
    let status = d.wait_exit(Duration::from_secs(120)).await.unwrap();
    (status.success(), d.logs())
}

/// Writes a projections file to a fresh temporary path.
fn projections_file(text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "ordo-projections-{}-{}.toml",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

/// A collection's read models without the write time and the rebuild epoch, minus `skip`.
async fn models(env: &Env, collection: &str, skip: &[&str]) -> BTreeMap<String, Document> {
    let mut out = env.read_models(collection).await;
    out.retain(|id, _| !skip.contains(&id.as_str()));
    for d in out.values_mut() {
        d.remove("_epoch");
    }
    out
}

async fn block(env: &Env, id: &str, at: i64) {
    env.mongo
        .database()
        .collection::<Document>("ordo_blocked")
        .insert_one(doc! {
            "_id": id, "projection": "*", "blockedAtEventId": at, "reason": "ProjectionError",
            "description": "set by the test", "messageId": format!("{id}:{at}"),
        })
        .await
        .unwrap();
}

/// Events inserted while no producer runs never reach the broker; `ordo-projector reconcile`
/// heals every read model from the events collection, reports the blocked aggregate and leaves
/// it alone. A second run is incremental: it checks only the aggregates with new events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_heals_events_that_never_reached_the_broker_and_leaves_blocked_aggregates_alone()
{
    let env = start(Duration::from_secs(5)).await;
    let events = workload("n", 10, 5);
    env.insert_events(&events).await;
    block(&env, "n-3", 1).await;

    let (ok, out) = run_admin(&env, "", &["reconcile"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("reconcile (full: no watermark yet): 10 aggregates checked, 10 behind, 9 read models healed, 1 blocked (left alone), 0 not healed"),
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
    let (ok, out) = run_admin(&env, "", &["reconcile"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("reconcile (incremental): 2 aggregates checked, 2 behind, 2 read models healed, 0 blocked (left alone), 0 not healed"),
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
    let (ok, out) = run_admin(&env, "", &["reconcile"]).await;
    assert!(ok, "{out}");
    let rules = std::fs::read_to_string(projections_path()).unwrap();
    let second = rules
        .replace("collection = \"users\"", "collection = \"users_b\"")
        .replace("collection = \"orders\"", "collection = \"orders_b\"");
    assert_ne!(second, rules);
    let extra = format!(
        "projections_file = {:?}",
        projections_file(&second).display().to_string()
    );
    let (ok, out) = run_admin(&env, &extra, &["reconcile"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("reconcile (full: no watermark yet): 6 aggregates checked, 6 behind, 6 read models healed"),
        "{out}"
    );
    assert_eq!(env.read_models("users_b").await.len(), 3);
    assert_eq!(env.read_models("orders_b").await.len(), 3);
    // The first set's watermark is its own: its next run is incremental and finds nothing.
    let (ok, out) = run_admin(&env, "", &["reconcile"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("reconcile (incremental): 0 aggregates checked"),
        "{out}"
    );
}

/// With `reconcile_interval`, the daemon heals events that never reached the broker by itself,
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
    let mut proj = env.spawn_projector("reconcile_interval = \"300ms\"").await;

    let events = workload("p", 6, 4);
    env.insert_events(&events).await;
    converge(&env, &env.expected().await, CONVERGE).await;
    let p = &proj;
    wait_until(Duration::from_secs(30), || async move {
        p.metric(m::RECONCILE_HEALED).await >= 6.0
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
    assert!(proj.metric(m::RECONCILE_HEALED).await >= 7.0);
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
    let db = env.mongo.database();
    let events = workload("r", 16, 10);
    env.insert_events(&events).await;
    env.publish(&events).await;
    let mut proj = env
        .spawn_projector("max_concurrent_sessions = 16\nsession_idle_timeout = \"300s\"")
        .await;
    converge(&env, &env.expected().await, CONVERGE).await;
    let p = &proj;
    wait_until(Duration::from_secs(30), || async move {
        p.metric(m::SESSIONS_HELD).await == 16.0
    })
    .await;

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
    let conflicts_before = proj.metric(m::GUARD_CONFLICTS).await;

    // Live traffic on half of the users during the rebuild; the other half stays quiet.
    let busy = ["r-0", "r-4", "r-8", "r-12"];
    let quiet = ["r-2", "r-6", "r-10", "r-14"];
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
            &env,
            &format!("projections_file = {:?}", rules_path.display().to_string()),
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

    // One more event for every user: the quiet ones reach a worker whose cache predates the
    // swap and holds the rebuilt version.
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
    // only (the projector heals them from there).
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

    let projections = compile(&new_rules);
    let expected = env.fold(&projections, &["bad-0"]).await;
    let want = &expected["users"];
    let envr = &env;
    let reached = tokio::time::timeout(CONVERGE, async move {
        loop {
            if &models(envr, "users", &["bad-0"]).await == want && envr.pending() == 0 {
                break;
            }
            tokio::time::sleep(ordo_testkit::wait::POLL_INTERVAL).await;
        }
    })
    .await;
    if reached.is_err() {
        let got = models(&env, "users", &["bad-0"]).await;
        let wrong: Vec<_> = want
            .iter()
            .filter(|(id, d)| got.get(*id) != Some(*d))
            .map(|(id, d)| format!("{id}: want {d}, got {:?}", got.get(id)))
            .collect();
        panic!("users differ from the fold under the new rules: {wrong:#?}");
    }
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
    assert!(env.dead_letters().is_empty(), "{:?}", env.dead_letters());
    stop(&mut proj).await;
}

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
        let extra = format!("projections_file = {:?}", path.display().to_string());
        let (ok, out) = run_admin(&env, &extra, &["rebuild", "--projection", "users"]).await;
        assert!(!ok, "{out}");
        assert!(
            out.contains(&format!("\"{coll}\"")) && out.contains(why),
            "{out}"
        );
        let health = ordo_testkit::free_health_addr();
        let mut daemon =
            Daemon::spawn(&bin(), &env.projector_toml(health, &extra), health, &[]).unwrap();
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
    let (ok, out) = run_admin(&env, "", &["reconcile"]).await;
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
    let (ok, out) = run_admin(&env, "", &["rebuild", "--projection", "users"]).await;
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
    let (ok, out) = run_admin(&env, "", &["reconcile"]).await;
    assert!(ok, "{out}");
    let live = raw_models(&env, "users").await;
    assert_eq!(live.len(), 2);
    let rules = std::fs::read_to_string(projections_path()).unwrap();
    let failing = rules.replacen("\"$payload.email\"", "\"$payload.currency\"", 1);
    assert_ne!(failing, rules);
    let extra = format!(
        "projections_file = {:?}",
        projections_file(&failing).display().to_string()
    );
    let blocked = env.mongo.database().collection::<Document>("ordo_blocked");

    let (ok, out) = run_admin(&env, &extra, &["rebuild", "--projection", "users"]).await;
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
        &extra,
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

    let (ok, out) = run_admin(&env, "", &["rebuild", "--projection", "users"]).await;
    assert!(ok, "{out}");
    assert_eq!(blocked.count_documents(doc! {}).await.unwrap(), 0, "{out}");
    let rebuilt = raw_models(&env, "users").await;
    assert_eq!(
        rebuilt.keys().collect::<Vec<_>>(),
        live.keys().collect::<Vec<_>>()
    );
    assert!(rebuilt.values().all(|d| d.get_i64("lastEventId") == Ok(3)));
}

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

    let (ok, out) = run_admin(&env, "", &["repair"]).await;
    assert!(
        !ok && out.contains("--aggregate") && out.contains("--all-blocked"),
        "{out}"
    );

    let (ok, out) = run_admin(&env, "", &["repair", "--all-blocked"]).await;
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
/// read an aggregate's events the way healing does, so neither folds one of them silently;
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

    let (ok, out) = run_admin(&env, "", &["repair", "--aggregate", "w-0"]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("twin-of-v2") && out.contains(&v2_id) && out.contains("eventId 2"),
        "names both documents: {out}"
    );
    assert_eq!(users.find_one(doc! {"_id": "w-0"}).await.unwrap(), None);

    let (ok, out) = run_admin(&env, "", &["reconcile", "--full"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("not healed: w-0") && out.contains("twin-of-v2"),
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
    let (ok, out) = run_admin(&env, "", &["repair", "--aggregate", "v-0"]).await;
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

/// A periodic reconciliation run that fails (its aggregate commands refused by a fail point
/// scoped to the daemon's connections) is counted as a retry and logged; a later run heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reconcile_run_is_counted_and_the_next_run_heals() {
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
    let mut proj = env.spawn_projector("reconcile_interval = \"300ms\"").await;
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
