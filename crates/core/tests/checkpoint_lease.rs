//! Checkpoint and lease stores against a live server (SecantusDB, or `ORDO_TEST_MONGODB_URI`).

use std::time::Duration;

use mongodb::bson::{doc, DateTime, Timestamp};
use ordo_core::checkpoint::{self, Checkpoint, CheckpointError, CheckpointStore};
use ordo_core::lease::{self, LeaseError, LeaseStore};
use ordo_testkit::{wait_for, TestMongo};

const STREAM: &str = "events";
const SHORT_TTL: Duration = Duration::from_millis(300);
const LONG_TTL: Duration = Duration::from_secs(60);

fn stores(mongo: &TestMongo) -> (LeaseStore, CheckpointStore) {
    let db = mongo.database();
    (
        LeaseStore::new(&db, lease::DEFAULT_COLLECTION),
        CheckpointStore::new(&db, checkpoint::DEFAULT_COLLECTION),
    )
}

fn position(token: &str, time: u32) -> Checkpoint {
    Checkpoint {
        resume_token: Some(doc! { "_data": token }),
        cluster_time: Some(Timestamp { time, increment: 1 }),
        wall_time: Some(DateTime::from_millis(i64::from(time) * 1000)),
        events: u64::from(time),
        ..Checkpoint::new(STREAM)
    }
}

/// The stream's stored checkpoint, which must exist.
async fn stored(checkpoints: &CheckpointStore) -> Checkpoint {
    checkpoints
        .load(STREAM)
        .await
        .unwrap()
        .expect("a stored checkpoint")
}

/// Fails unless `result` is the refusal of a write from a deposed epoch.
fn assert_fenced<T: std::fmt::Debug>(result: Result<T, CheckpointError>) {
    assert!(
        matches!(result, Err(CheckpointError::Fenced { .. })),
        "{result:?}"
    );
}

/// Acquires the lease for `holder`; it must be free, expired, or `holder`'s own.
async fn acquire(leases: &LeaseStore, holder: &str, ttl: Duration) -> lease::Lease {
    leases
        .try_acquire(STREAM, holder, ttl)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{holder} was refused the lease"))
}

/// Whether `holder` is refused the lease because another holds it.
async fn refused(leases: &LeaseStore, holder: &str, ttl: Duration) -> bool {
    leases
        .try_acquire(STREAM, holder, ttl)
        .await
        .unwrap()
        .is_none()
}

/// An old leader that saved position `old-1` under a short lease, and the new leader that took
/// the lease over once it expired: `(old, new)`.
async fn deposed_leader(
    leases: &LeaseStore,
    checkpoints: &CheckpointStore,
) -> (lease::Lease, lease::Lease) {
    let old = acquire(leases, "old", SHORT_TTL).await;
    checkpoints
        .save(&position("old-1", 10), old.epoch)
        .await
        .unwrap();
    let new = take_over_after_expiry(leases, "new").await;
    (old, new)
}

/// Waits for `lease`'s expiry to pass and returns the takeover by `holder`.
async fn take_over_after_expiry(leases: &LeaseStore, holder: &str) -> lease::Lease {
    wait_for(Duration::from_secs(10), || async {
        leases.try_acquire(STREAM, holder, LONG_TTL).await.unwrap()
    })
    .await
}

#[tokio::test]
async fn checkpoint_round_trip() {
    let mongo = TestMongo::start().await.unwrap();
    let (_, checkpoints) = stores(&mongo);
    assert_eq!(checkpoints.load(STREAM).await.unwrap(), None);

    let saved = position("8263A1", 42);
    checkpoints.save(&saved, 1).await.unwrap();
    let loaded = stored(&checkpoints).await;
    assert_eq!(loaded.resume_token, saved.resume_token);
    assert_eq!(loaded.cluster_time, saved.cluster_time);
    assert_eq!(loaded.wall_time, saved.wall_time);
    assert_eq!(loaded.events, 42);
    assert_eq!(loaded.epoch, 1);

    // A later position overwrites it; other streams are independent.
    checkpoints.save(&position("8263A2", 43), 1).await.unwrap();
    let loaded = stored(&checkpoints).await;
    assert_eq!(loaded.resume_token, Some(doc! { "_data": "8263A2" }));
    assert_eq!(checkpoints.load("other").await.unwrap(), None);
}

#[tokio::test]
async fn lease_is_exclusive_until_it_expires_then_taken_over_with_a_higher_epoch() {
    let mongo = TestMongo::start().await.unwrap();
    let (leases, _) = stores(&mongo);

    let a = acquire(&leases, "a", SHORT_TTL).await;
    assert_eq!(a.epoch, 1);
    // Re-acquiring one's own live lease keeps the epoch.
    let again = acquire(&leases, "a", SHORT_TTL).await;
    assert_eq!(again.epoch, 1);

    // While live, b cannot take it; once expired, b can, under the next epoch.
    // (If b did win here, a's lease must have lapsed in the meantime.)
    let attempt = leases.try_acquire(STREAM, "b", SHORT_TTL).await.unwrap();
    assert!(
        attempt.is_none() || a.is_expired(),
        "b took a live lease: {attempt:?}"
    );
    let b = take_over_after_expiry(&leases, "b").await;
    assert_eq!(b.holder, "b");
    assert_eq!(b.epoch, 2);
    assert!(a.is_expired(), "b must not win before a's lease expired");
    assert!(refused(&leases, "a", SHORT_TTL).await);
}

#[tokio::test]
async fn renew_extends_a_held_lease_and_fails_after_loss() {
    let mongo = TestMongo::start().await.unwrap();
    let (leases, _) = stores(&mongo);

    let a = acquire(&leases, "a", SHORT_TTL).await;
    let renewed = leases.renew(&a).await.unwrap();
    assert_eq!(renewed.epoch, a.epoch);
    assert!(renewed.expires_at >= a.expires_at);

    let b = take_over_after_expiry(&leases, "b").await;
    assert!(b.epoch > a.epoch);
    match leases.renew(&renewed).await {
        Err(LeaseError::Lost { holder, epoch, .. }) => {
            assert_eq!((holder.as_str(), epoch), ("a", a.epoch))
        }
        other => panic!("expected Lost, got {other:?}"),
    }
    // b is unaffected, and a's release of the lost lease does nothing.
    assert!(!leases.release(&renewed).await.unwrap());
    leases.renew(&b).await.unwrap();
}

#[tokio::test]
async fn release_hands_over_at_once_and_epochs_keep_growing() {
    let mongo = TestMongo::start().await.unwrap();
    let (leases, _) = stores(&mongo);

    let a = acquire(&leases, "a", LONG_TTL).await;
    assert!(refused(&leases, "b", LONG_TTL).await);
    assert!(leases.release(&a).await.unwrap());
    let b = acquire(&leases, "b", LONG_TTL).await;
    assert_eq!(b.epoch, a.epoch + 1, "release keeps the epoch history");
}

#[tokio::test]
async fn a_deposed_leader_cannot_overwrite_the_new_leaders_checkpoint() {
    let mongo = TestMongo::start().await.unwrap();
    let (leases, checkpoints) = stores(&mongo);

    let (old, new) = deposed_leader(&leases, &checkpoints).await;
    checkpoints
        .save(&position("new-1", 11), new.epoch)
        .await
        .unwrap();

    // The old leader, unaware, saves a later position: refused.
    match checkpoints.save(&position("old-2", 20), old.epoch).await {
        Err(e @ CheckpointError::Fenced { .. }) => {
            assert!(!e.is_retryable());
            let CheckpointError::Fenced { epoch, current, .. } = e else {
                unreachable!()
            };
            assert_eq!((epoch, current), (old.epoch, new.epoch));
        }
        other => panic!("expected Fenced, got {other:?}"),
    }
    let saved = stored(&checkpoints).await;
    assert_eq!(saved.resume_token, Some(doc! { "_data": "new-1" }));
    assert_eq!(saved.epoch, new.epoch);
}

#[tokio::test]
async fn claim_fences_the_old_leader_before_the_new_leaders_first_save() {
    let mongo = TestMongo::start().await.unwrap();
    let (leases, checkpoints) = stores(&mongo);

    let (old, new) = deposed_leader(&leases, &checkpoints).await;
    checkpoints.claim(STREAM, new.epoch).await.unwrap();

    assert_fenced(checkpoints.save(&position("old-2", 20), old.epoch).await);
    // The claim kept the position; the new leader resumes from it.
    let saved = stored(&checkpoints).await;
    assert_eq!(saved.resume_token, Some(doc! { "_data": "old-1" }));
    assert_eq!(saved.epoch, new.epoch);
    // An older epoch cannot claim back.
    assert_fenced(checkpoints.claim(STREAM, old.epoch).await);
}

#[tokio::test]
async fn claim_alone_is_not_a_position() {
    let mongo = TestMongo::start().await.unwrap();
    let (_, checkpoints) = stores(&mongo);
    checkpoints.claim(STREAM, 1).await.unwrap();
    assert_eq!(
        checkpoints.load(STREAM).await.unwrap(),
        None,
        "start mode must still apply"
    );
    checkpoints.save(&position("t", 1), 1).await.unwrap();
    assert!(checkpoints.load(STREAM).await.unwrap().is_some());
}

#[tokio::test]
async fn checkpoint_never_moves_backwards_within_an_epoch() {
    let mongo = TestMongo::start().await.unwrap();
    let (_, checkpoints) = stores(&mongo);

    checkpoints.save(&position("t20", 20), 1).await.unwrap();
    // Saving the same position again is fine (idle streams re-save).
    checkpoints.save(&position("t20", 20), 1).await.unwrap();
    match checkpoints.save(&position("t10", 10), 1).await {
        Err(CheckpointError::Backwards {
            stored, attempted, ..
        }) => {
            assert_eq!((stored.time, attempted.time), (20, 10));
        }
        other => panic!("expected Backwards, got {other:?}"),
    }
    assert_eq!(
        stored(&checkpoints).await.cluster_time,
        Some(Timestamp {
            time: 20,
            increment: 1
        })
    );

    // A newer epoch may move it back (a new leader resumes from where it starts).
    checkpoints.save(&position("t5", 5), 2).await.unwrap();
    assert_eq!(
        stored(&checkpoints).await.resume_token,
        Some(doc! { "_data": "t5" })
    );
}

#[tokio::test]
async fn concurrent_acquirers_of_a_new_lease_exactly_one_wins() {
    let mongo = TestMongo::start().await.unwrap();
    let (leases, _) = stores(&mongo);
    let holders: Vec<String> = (0..8).map(|i| format!("h{i}")).collect();
    let attempts = holders
        .iter()
        .map(|h| leases.try_acquire(STREAM, h, LONG_TTL));
    let results = futures::future::join_all(attempts).await;
    let winners: Vec<_> = results.into_iter().filter_map(|r| r.unwrap()).collect();
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert_eq!(winners[0].epoch, 1);
    let current = leases.current(STREAM).await.unwrap().unwrap();
    assert_eq!(current.holder, winners[0].holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_takeovers_of_an_expired_lease_exactly_one_wins() {
    let mongo = TestMongo::start().await.unwrap();
    let (leases, _) = stores(&mongo);
    let old = acquire(&leases, "old", SHORT_TTL).await;
    ordo_testkit::wait_until(Duration::from_secs(5), || async { old.is_expired() }).await;

    // Separate clients on separate tasks, so the attempts really race on the server.
    let mut tasks = Vec::new();
    for i in 0..6 {
        let uri = mongo.uri().to_owned();
        let db = mongo.db_name().to_owned();
        tasks.push(tokio::spawn(async move {
            let client = mongodb::Client::with_uri_str(uri).await.unwrap();
            let store = LeaseStore::new(&client.database(&db), lease::DEFAULT_COLLECTION);
            store.try_acquire(STREAM, &format!("h{i}"), LONG_TTL).await
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        if let Some(lease) = task.await.unwrap().unwrap() {
            winners.push(lease);
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert_eq!(winners[0].epoch, old.epoch + 1);
}
