//! The projector as real processes against SecantusDB and the embedded emulator.

mod common;

use std::time::Duration;

use common::*;
use ordo_testkit::wait_until;

const CONVERGE: Duration = Duration::from_secs(120);

/// Three projectors share 500 x 20 events (scaled down by default); every read model equals
/// the fold of the events collection, and SIGTERM exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_projectors_converge_to_the_fold_and_stop_cleanly() {
    let env = start(Duration::from_secs(5)).await;
    let n = aggregates(100);
    let events = workload("a", n, 20);
    env.insert_events(&events).await;
    let expected = env.expected().await;
    env.publish(&events).await;
    let mut procs = Vec::new();
    for _ in 0..3 {
        procs.push(env.spawn_projector("").await);
    }
    let e = &expected;
    let envr = &env;
    let wait = wait_until(CONVERGE, || async move {
        envr.converged(e).await && envr.pending() == 0
    });
    if tokio::time::timeout(CONVERGE + Duration::from_secs(5), wait)
        .await
        .is_err()
    {
        panic!("{}", env.diff(&expected).await);
    }
    // Replayed duplicates change nothing.
    env.publish_with(&events[..events.len() / 2], ":replay")
        .await;
    wait_until(Duration::from_secs(60), || async { env.pending() == 0 }).await;
    assert!(
        env.converged(&expected).await,
        "{}",
        env.diff(&expected).await
    );
    assert!(env.dead_letters().is_empty(), "{:?}", env.dead_letters());
    for p in &procs {
        p.sigterm().unwrap();
    }
    for p in &mut procs {
        let status = p.wait_exit(Duration::from_secs(15)).await.unwrap();
        assert!(status.success(), "{status:?}\n{}", p.logs());
    }
}
