//! The MongoDB fixture works: SecantusDB starts and answers, fixtures are isolated, kill and
//! restart do what fault tests rely on.

use std::time::Duration;

use mongodb::bson::{doc, Document};
use mongodb::error::ErrorKind;
use ordo_testkit::{wait_until_ok, SecantusDb, SecantusOptions, TestMongo};

#[tokio::test]
async fn fixture_answers_and_round_trips_a_document() {
    let mongo = TestMongo::start().await.unwrap();
    let hello = mongo
        .client()
        .database("admin")
        .run_command(doc! { "hello": 1 })
        .await
        .unwrap();
    assert_eq!(
        hello.get_bool("isWritablePrimary").ok(),
        Some(true),
        "{hello}"
    );

    let coll = mongo.database().collection::<Document>("things");
    coll.insert_one(doc! { "_id": 1, "name": "a" })
        .await
        .unwrap();
    let found = coll.find_one(doc! { "_id": 1 }).await.unwrap().unwrap();
    assert_eq!(found.get_str("name").unwrap(), "a");
    assert!(mongo.db_name().starts_with("ordo_test_"));
}

#[tokio::test]
async fn parallel_fixtures_do_not_collide() {
    let (a, b) = tokio::join!(TestMongo::start(), TestMongo::start());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.db_name(), b.db_name());
    if !a.is_external() {
        assert_ne!(a.uri(), b.uri(), "each fixture gets its own server");
    }
    a.database()
        .collection::<Document>("c")
        .insert_one(doc! { "_id": "only-in-a" })
        .await
        .unwrap();
    let in_b = b
        .database()
        .collection::<Document>("c")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(in_b, 0);
}

#[tokio::test]
async fn kill_stops_the_process_and_restart_brings_it_back() {
    let mut mongo = TestMongo::start_with(SecantusOptions::new().persistent())
        .await
        .unwrap();
    let server = match mongo.secantus() {
        Ok(s) => s,
        Err(unavailable) => return unavailable.skip(),
    };
    let pid = server.pid().unwrap();
    assert!(process_exists(pid));
    mongo
        .database()
        .collection::<Document>("c")
        .insert_one(doc! { "_id": "kept" })
        .await
        .unwrap();

    mongo.kill_server().unwrap();
    assert!(
        !process_exists(pid),
        "process {pid} still exists after kill"
    );
    assert!(!mongo.secantus().unwrap().is_running());
    let port = mongo.secantus().unwrap().port();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still accepts connections"
    );

    mongo.restart_server().await.unwrap().unwrap();
    assert_eq!(mongo.secantus().unwrap().port(), port);
    // The driver reconnects on its own; persistent storage kept the document.
    let db = mongo.database();
    let found = wait_until_ok(Duration::from_secs(20), || {
        let db = db.clone();
        async move {
            db.collection::<Document>("c")
                .find_one(doc! { "_id": "kept" })
                .await
        }
    })
    .await;
    assert!(found.is_some(), "document lost across restart");
}

#[tokio::test]
async fn dropping_the_server_kills_it() {
    let server = SecantusDb::start(SecantusOptions::new()).await.unwrap();
    let pid = server.pid().unwrap();
    assert!(process_exists(pid));
    drop(server);
    assert!(!process_exists(pid));
}

#[tokio::test]
async fn fail_points_work() {
    let mongo = TestMongo::start().await.unwrap();
    mongo
        .configure_fail_point(
            "failCommand",
            doc! { "mode": { "times": 1 }, "data": { "failCommands": ["find"], "errorCode": 2 } },
        )
        .await
        .unwrap();
    let coll = mongo.database().collection::<Document>("c");
    let err = coll.find_one(doc! {}).await.unwrap_err();
    assert!(
        matches!(&*err.kind, ErrorKind::Command(c) if c.code == 2),
        "expected the fail point's error code 2, got {err}"
    );
    // times: 1 — the next find succeeds.
    coll.find_one(doc! {}).await.unwrap();
    mongo.disable_fail_point("failCommand").await.unwrap();
}

/// A reaped process has no /proc entry (a zombie would still have one).
fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}
