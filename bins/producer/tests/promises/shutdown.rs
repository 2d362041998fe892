//! SIGTERM while the database hangs: nothing the producer waits for at shutdown waits on it for
//! good.

use super::*;

/// SIGTERM while the database hangs: nothing the producer waits for at shutdown (the drain,
/// the checkpointer's and lease keeper's stop, the final save, the lease release, the client)
/// may wait on it for good; the process exits within its grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_database_hangs_exits_within_the_grace_period() {
    let mut world = World::start().await;
    let events = world.events();
    let mut writer = Writer::new(5, 37);
    let mut producer = world.spawn(ProducerSection {
        lease_ttl: Duration::from_secs(15),
        ..tuning()
    });
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.write(&events, 10, 10).await;
    if let Err(unavailable) = world.mongo.hang_server(true) {
        return unavailable.skip();
    }
    producer.sigterm().unwrap();
    // The tests set `[shutdown] grace_period = "10s"`.
    let exited = producer.wait_exit(Duration::from_secs(15)).await;
    world.mongo.hang_server(false).unwrap().unwrap();
    assert!(
        exited.is_ok(),
        "still running 15 s after SIGTERM\n{}",
        producer.logs()
    );
}

/// SIGTERM while the new term's checkpoint read hangs (the database holds the producer's one
/// `find` for a minute): the read is given up, the lease released and the process exits within
/// its grace period. A ready producer may still be loading its checkpoint (a standby is ready
/// too), so this is where SIGTERM lands when the database hangs right after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_checkpoint_read_hangs_exits_within_the_grace_period() {
    let world = World::start().await;
    // The only `find` the producer sends is the checkpoint read at the start of a term.
    world
        .mongo
        .configure_fail_point(
            "failCommand",
            doc! { "mode": { "times": 1 }, "data": {
                "failCommands": ["find"], "appName": "ordo-producer",
                "blockConnection": true, "blockTimeMS": 60_000,
            } },
        )
        .await
        .unwrap();
    let mut producer = world.spawn(tuning());
    let p = &producer;
    wait_until(Duration::from_secs(30), || async move {
        p.logs().contains("active: publishing")
    })
    .await;
    producer.sigterm().unwrap();
    // The tests set `[shutdown] grace_period = "10s"`.
    let exited = producer.wait_exit(Duration::from_secs(10)).await;
    assert!(
        exited.is_ok(),
        "still running 10 s after SIGTERM\n{}",
        producer.logs()
    );
    let logs = producer.logs();
    assert!(!logs.contains("no checkpoint: applying"), "{logs}");
    assert!(logs.contains("lease released"), "{logs}");
    // The fault fired: the one blocked `find` was the producer's, so one of the same
    // application's now answers at once.
    let mut options = mongodb::options::ClientOptions::parse(world.mongo.uri())
        .await
        .unwrap();
    options.app_name = Some("ordo-producer".into());
    let client = mongodb::Client::with_options(options).unwrap();
    let checkpoints = client
        .database(world.mongo.db_name())
        .collection::<Document>("ordo_checkpoints");
    let answered =
        tokio::time::timeout(Duration::from_secs(5), checkpoints.find_one(doc! {})).await;
    assert!(
        answered.is_ok(),
        "the fail point was not spent by the producer"
    );
}
