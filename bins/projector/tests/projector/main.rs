//! The projector as real processes against SecantusDB and the embedded emulator.

#[path = "../common/mod.rs"]
mod common;

mod rebuild;
mod rebuild_duplicate;
mod rebuild_refused;
mod reconcile;
mod repair;

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
                env.emulator().stats()
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
    let n = ordo_testkit::scale().of(100);
    let events = workload("a", n, 20);
    env.insert_events(&events).await;
    let expected = env.expected().await;
    publish_and_confirm(&env, &events).await;
    let mut procs = Vec::new();
    for _ in 0..3 {
        procs.push(env.spawn_projector(tuning()).await);
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
    let slow = ProjectorSection {
        batch_size: 4,
        apply_delay: Duration::from_millis(150),
        ..tuning()
    };
    let mut procs = Vec::new();
    for _ in 0..3 {
        procs.push(env.spawn_projector(slow.clone()).await);
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
        .spawn_projector(ProjectorSection {
            batch_size: 2,
            apply_delay: Duration::from_secs(2),
            ..tuning()
        })
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

    let mut next = env.spawn_projector(tuning()).await;
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
        env.emulator().stats().connections == 0
    })
    .await;
    let mut proj = env
        .spawn_projector(ProjectorSection {
            max_concurrent_sessions: 16,
            connections: 2,
            apply_delay: Duration::from_millis(300),
            ..tuning()
        })
        .await;
    let (mut most_connections, mut most_held, mut most_on_one) = (0, 0, 0);
    let deadline = Instant::now() + CONVERGE;
    while !(env.converged(&expected).await && env.pending() == 0) {
        assert!(
            Instant::now() < deadline,
            "not converged\n{}",
            env.diff(&expected).await
        );
        let stats = env.emulator().stats();
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
/// `projector` as its `[projector]`; returns whether it exited 0 and its output.
async fn run_admin(env: &Env, projector: &ProjectorSection, args: &[&str]) -> (bool, String) {
    let health = ordo_testkit::free_health_addr();
    let mut d = Daemon::spawn_with_args(
        &bin(),
        &env.projector_toml(health, projector),
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
