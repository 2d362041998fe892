//! Cost of reconciliation (`ordo-projector reconcile`) on a large events collection.
//!
//! `cargo bench -p ordo-projector --bench reconcile`. `ORDO_BENCH_EVENTS` events (default
//! 100,000) in aggregates of 10 events (half User, half Order) are inserted with no broker at
//! all, then three runs are timed:
//! 1. a full pass that finds every read model missing and catches all of them up (the worst case:
//!    every event lost upstream);
//! 2. a full pass with every read model current (what a full pass costs when nothing is
//!    wrong);
//! 3. after 1% more events on 1% of the aggregates, an incremental run (the periodic case).
//!
//! Uses the Rust SecantusDB server at `.ordo/tools/bin/secantusd-rs` when present, else the
//! Python one the test kit provisions, and says which; the database dominates the cost.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::*;
use mongodb::bson::doc;
use ordo_core::envelope::EventFields;
use ordo_projector::reconcile::{reconcile, Report};
use ordo_projector::Store;
use ordo_testkit::TestMongo;

const PER_AGGREGATE: i64 = 10;

fn main() {
    // Before any thread starts: the test kit reads the variable this sets.
    let server = ordo_testkit::bench::RustSecantus::start_if_available(None);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(bench(server.is_some()));
    drop(server);
}

fn line(what: &str, events: usize, r: &Report) {
    let s = r.elapsed.as_secs_f64();
    println!(
        "{what:<44} {:>8.2} s  {:>9.0} events/s  checked {:>7}  caught up {:>7}  ({:.0} s for 1M events at this rate)",
        s,
        events as f64 / s,
        r.checked,
        r.caught_up,
        s * 1_000_000.0 / events as f64
    );
}

async fn bench(rust_server: bool) {
    let events: usize = std::env::var("ORDO_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let aggregates = events / PER_AGGREGATE as usize;
    let mongo = TestMongo::start().await.expect("mongodb");
    println!(
        "reconcile bench: {events} events, {aggregates} aggregates of {PER_AGGREGATE}, server: {}, profile: {}",
        if rust_server {
            "secantusd-rs"
        } else {
            "secantusd-py (Python)"
        },
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let db = mongo.database();
    let coll = db.collection::<mongodb::bson::Document>("events");
    seed_events(&coll, aggregates).await;
    let store = Store::new(db, "events", "ordo_blocked", EventFields::default());
    let projections = projections();

    let catch_up_all = reconcile(&store, &projections, true).await.expect("run 1");
    line("full pass, every read model missing", events, &catch_up_all);
    let clean = reconcile(&store, &projections, true).await.expect("run 2");
    line("full pass, every read model current", events, &clean);

    let touched = aggregates / 100;
    let more = late_events(touched);
    coll.insert_many(more).await.expect("insert more");
    let incremental = reconcile(&store, &projections, false).await.expect("run 3");
    line(
        &format!("incremental, {touched} new events"),
        events,
        &incremental,
    );
    assert_eq!(catch_up_all.caught_up as usize, aggregates);
    assert_eq!(clean.caught_up, 0);
    assert_eq!(incremental.checked as usize, touched);
    assert_eq!(incremental.caught_up as usize, touched);
}

/// The events collection with its unique index and `aggregates` aggregates of
/// `PER_AGGREGATE` events each.
async fn seed_events(coll: &mongodb::Collection<mongodb::bson::Document>, aggregates: usize) {
    coll.create_index(
        mongodb::IndexModel::builder()
            .keys(doc! { "aggregateId": 1, "eventId": 1 })
            .options(
                mongodb::options::IndexOptions::builder()
                    .unique(true)
                    .build(),
            )
            .build(),
    )
    .await
    .expect("index");
    let started = Instant::now();
    let all = workload("b", aggregates, PER_AGGREGATE);
    for chunk in all.chunks(5_000) {
        coll.insert_many(chunk.to_vec()).await.expect("insert");
    }
    let took = started.elapsed().as_secs_f64();
    println!(
        "inserted {} events in {took:.1} s ({:.0}/s)",
        all.len(),
        all.len() as f64 / took
    );
}

/// One new event for every hundredth aggregate, for the incremental pass to find.
fn late_events(touched: usize) -> Vec<mongodb::bson::Document> {
    (0..touched)
        .map(|i| {
            let id = format!("b-{}", i * 100);
            if i * 100 % 2 == 0 {
                event(
                    &id,
                    "User",
                    PER_AGGREGATE + 1,
                    "UserEmailUpdated",
                    doc! { "email": format!("{id}+late@x") },
                )
            } else {
                event(
                    &id,
                    "Order",
                    PER_AGGREGATE + 1,
                    "OrderCreated",
                    doc! { "customerId": "late" },
                )
            }
        })
        .collect()
}
