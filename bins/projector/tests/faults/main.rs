//! Faults, one module per behaviour: messages that cannot be applied as they come (poison,
//! withheld), database faults, sessions under slow work and cut accepts, and readiness that
//! follows each dependency.

#[path = "../common/mod.rs"]
mod common;

mod database;
mod messages;
mod readiness;
mod sessions;

use std::time::Duration;

use common::*;
use mongodb::bson::{doc, Document};
use ordo_testkit::{wait_until, wait_until_ok, Daemon};

/// Waits until every read model equals the fold and nothing is left on the subscription;
/// panics with a diff otherwise.
async fn converge(env: &Env) {
    let expected = env.expected().await;
    let e = &expected;
    let wait = wait_until(Duration::from_secs(90), || async move {
        env.converged(e).await && env.pending() == 0
    });
    if tokio::time::timeout(Duration::from_secs(95), wait)
        .await
        .is_err()
    {
        panic!("{}", env.diff(&expected).await);
    }
}
