//! The operator's status report, read from a live server.

use std::time::Duration;

use mongodb::bson::{doc, oid::ObjectId, DateTime, Document, Timestamp};
use ordo_core::checkpoint::{self, Checkpoint, CheckpointStore};
use ordo_core::envelope::EventFields;
use ordo_core::lease::{self, LeaseStore};
use ordo_core::status::{self, ProjectorHeartbeat};
use ordo_testkit::TestMongo;

#[tokio::test]
async fn report_reads_checkpoints_leases_heartbeats_blocked_and_parked() {
    let mongo = TestMongo::start().await.unwrap();
    let db = mongo.database();
    let now = DateTime::now().timestamp_millis();

    let lease_epoch = a_leased_stream_checkpointed_30_s_behind(&db, now).await;
    one_live_one_retired_and_one_dead_projector(&db, now).await;
    two_blocked_aggregates_and_one_parked_event(&db).await;

    let report = status::gather(&db, "events", &EventFields::default(), "ordo_blocked")
        .await
        .unwrap();
    assert_eq!(report.streams.len(), 1);
    let s = &report.streams[0];
    assert_eq!(s.stream, "app.events");
    assert_eq!(s.events, 42);
    assert_eq!(s.lease_holder.as_deref(), Some("producer-a"));
    assert_eq!(s.lease_epoch, Some(lease_epoch));
    assert!(s.lease_expires_in_s.unwrap() > 50.0, "{s:?}");
    assert!(s.checkpoint_age_s.unwrap() < 30.0, "{s:?}");
    let lag = s.producer_lag_s.unwrap();
    assert!(
        (25.0..40.0).contains(&lag),
        "lag measures newest event vs checkpoint: {lag}"
    );
    assert_eq!(
        report.projectors.len(),
        1,
        "retired and stale heartbeats are not alive: {:?}",
        report.projectors
    );
    assert_eq!(report.sessions_held, 7);
    assert_eq!(report.blocked_aggregates, 2);
    assert_eq!(report.parked_events, 1);
    let text = report.to_string();
    assert!(
        text.contains("blocked aggregates: 2") && text.contains("order-1: ProjectionFailed"),
        "{text}"
    );
    assert!(text.contains("1 alive, 7 sessions held"), "{text}");
}

/// Stream `app.events` leased by `producer-a` for 60 s, its checkpoint (42 events) covering
/// events up to 30 s before the newest event; returns the lease's epoch.
async fn a_leased_stream_checkpointed_30_s_behind(db: &mongodb::Database, now: i64) -> i64 {
    let lease = LeaseStore::new(db, lease::DEFAULT_COLLECTION)
        .try_acquire("app.events", "producer-a", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    // The checkpoint covers events up to 30 s before the newest event.
    CheckpointStore::new(db, checkpoint::DEFAULT_COLLECTION)
        .save(
            &Checkpoint {
                resume_token: Some(doc! {"_data": "00"}),
                cluster_time: Some(Timestamp {
                    time: 1,
                    increment: 1,
                }),
                wall_time: Some(DateTime::from_millis(now - 30_000)),
                events: 42,
                ..Checkpoint::new("app.events")
            },
            lease.epoch,
        )
        .await
        .unwrap();
    db.collection::<Document>("events")
        .insert_one(doc! {"_id": ObjectId::new(), "aggregateId": "a", "eventId": 1})
        .await
        .unwrap();
    lease.epoch
}

/// Heartbeats: one live projector holding 7 sessions, one that retired, and one from a
/// process that died long ago.
async fn one_live_one_retired_and_one_dead_projector(db: &mongodb::Database, now: i64) {
    let live = ProjectorHeartbeat {
        instance: "host-1:10:1".into(),
        host: "host-1".into(),
        sessions_held: 7,
        applied: 100,
        started_at_ms: now,
        updated_at_ms: now,
    };
    status::beat(db, &live).await.unwrap();
    status::beat(
        db,
        &ProjectorHeartbeat {
            instance: "host-2:11:1".into(),
            sessions_held: 3,
            ..live.clone()
        },
    )
    .await
    .unwrap();
    // A heartbeat from a process that died long ago does not count.
    db.collection::<Document>(status::PROJECTORS_COLLECTION)
        .insert_one(doc! {"_id": "dead:1:1", "host": "dead", "sessionsHeld": 99_i64, "updatedAt": DateTime::from_millis(now - 600_000)})
        .await
        .unwrap();
    status::retire(db, "host-2:11:1").await.unwrap();
}

async fn two_blocked_aggregates_and_one_parked_event(db: &mongodb::Database) {
    db.collection::<Document>("ordo_blocked")
        .insert_many([
            doc! {"_id": "order-1", "reason": "ProjectionFailed"},
            doc! {"_id": "order-2", "reason": "UndecodableBody"},
        ])
        .await
        .unwrap();
    db.collection::<Document>("ordo_parked")
        .insert_one(doc! {"reason": "missing_field"})
        .await
        .unwrap();
}

/// A projector killed with SIGKILL never retires its heartbeat; the next beat of any live
/// projector deletes it once it is older than the expiry, and leaves fresh ones alone.
#[tokio::test]
async fn a_beat_deletes_the_heartbeats_of_dead_processes() {
    let mongo = TestMongo::start().await.unwrap();
    let db = mongo.database();
    let coll = db.collection::<Document>(status::PROJECTORS_COLLECTION);
    let now = DateTime::now().timestamp_millis();
    let expiry = status::HEARTBEAT_EXPIRY.as_millis() as i64;
    coll.insert_many([
        doc! {"_id": "dead:1:1", "updatedAt": DateTime::from_millis(now - expiry - 5_000)},
        doc! {"_id": "dead:2:1", "updatedAt": DateTime::from_millis(now - 10 * expiry)},
        doc! {"_id": "quiet:3:1", "updatedAt": DateTime::from_millis(now - expiry / 2)},
    ])
    .await
    .unwrap();
    let live = ProjectorHeartbeat {
        instance: "live:4:1".into(),
        host: "live".into(),
        sessions_held: 1,
        applied: 1,
        started_at_ms: now,
        updated_at_ms: now,
    };
    let deleted = status::beat(&db, &live).await.unwrap();
    assert_eq!(deleted, 2);
    let mut left: Vec<String> = coll
        .distinct("_id", doc! {})
        .await
        .unwrap()
        .into_iter()
        .filter_map(|b| b.as_str().map(str::to_string))
        .collect();
    left.sort();
    assert_eq!(left, vec!["live:4:1".to_string(), "quiet:3:1".to_string()]);
}
