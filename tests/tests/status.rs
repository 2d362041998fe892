//! `ordo-projector status` against a running deployment.

use std::time::Duration;

use mongodb::bson::Document;
use ordo_e2e::sample::{insert, Generator, Workload};
use ordo_e2e::stack::Stack;
use ordo_testkit::{bin_path, free_health_addr, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_running_deployment() {
    let mut stack = Stack::start(Duration::from_secs(10)).await.unwrap();
    stack.spawn_producer().await.unwrap();
    stack.spawn_projector(0).await.unwrap();
    let w = Workload {
        users: 5,
        orders: 5,
        events_per_aggregate: 3,
        seed: 3,
    };
    let mut g = Generator::new(w, "");
    insert(
        &stack.db().collection::<Document>("events"),
        g.next_batch(30),
    )
    .await
    .unwrap();
    wait_until(Duration::from_secs(60), || async {
        matches!(stack.caught_up().await, Ok((10, 10)))
    })
    .await;

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("projector.toml");
    std::fs::write(&cfg, stack.projector_config(free_health_addr())).unwrap();
    let status = || {
        let out = std::process::Command::new(bin_path("ordo-projector"))
            .arg("--config")
            .arg(&cfg)
            .args(["status", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // The producer saves its checkpoint within its interval and the projector beats every few
    // seconds: wait for both to be visible.
    wait_until(Duration::from_secs(30), || async {
        let r = status();
        r["streams"]
            .as_array()
            .is_some_and(|s| s.len() == 1 && s[0]["checkpoint_age_s"].as_f64().is_some())
            && r["projectors"].as_array().is_some_and(|p| p.len() == 1)
    })
    .await;
    let r = status();
    assert_eq!(r["blocked_aggregates"], 0);
    assert_eq!(r["parked_events"], 0);
    assert!(r["streams"][0]["lease_holder"].is_string(), "{r}");
    if !stack.bus.is_external() {
        assert_eq!(r["dead_letter_depth"][0], 0, "{r}");
    }

    let text = std::process::Command::new(bin_path("ordo-projector"))
        .arg("--config")
        .arg(&cfg)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("projectors: 1 alive") && text.contains("dead-letter queue: 0 messages"),
        "{text}"
    );
}
