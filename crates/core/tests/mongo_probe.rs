//! The MongoDB readiness probe against a hung SecantusDB (SIGSTOP: connections stay open,
//! nothing answers): it says unreachable within seconds, waits for its ping instead of
//! dropping the connection under it, and says reachable again once the server answers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mongodb::event::cmap::CmapEvent;
use mongodb::event::EventHandler;
use mongodb::options::ClientOptions;
use mongodb::Client;
use tokio_util::sync::CancellationToken;

use ordo_core::mongo::{probe, PROBE_TIMEOUT};
use ordo_testkit::TestMongo;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_database_is_unreachable_within_seconds_and_the_ping_is_waited_for() {
    let mut mongo = TestMongo::start().await.unwrap();
    // The probe's own one-connection client, as `connect_probe` builds it, with the pool's
    // connections counted.
    let created = Arc::new(AtomicUsize::new(0));
    let mut options = ClientOptions::parse(mongo.uri()).await.unwrap();
    options.max_pool_size = Some(1);
    options.cmap_event_handler = Some(EventHandler::callback({
        let created = created.clone();
        move |e: CmapEvent| {
            if matches!(e, CmapEvent::ConnectionCreated(_)) {
                created.fetch_add(1, Ordering::SeqCst);
            }
        }
    }));
    let db = Client::with_options(options).unwrap().database("admin");

    let verdicts: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let probing = tokio::spawn(probe(db, cancel.clone(), {
        let verdicts = verdicts.clone();
        move |reachable| {
            verdicts.lock().unwrap().push((Instant::now(), reachable));
            let _ = tx.send(reachable);
        }
    }));
    assert!(next(&mut rx).await, "reachable before the hang");

    if let Err(unavailable) = mongo.hang_server(true) {
        cancel.cancel();
        return unavailable.skip();
    }
    let hung = Instant::now();
    while next(&mut rx).await {}
    let noticed = hung.elapsed();
    // Hung for longer than several timeouts: a probe that dropped its ping at each timeout
    // would open a new connection every interval.
    tokio::time::sleep(PROBE_TIMEOUT * 3).await;
    let during_hang = created.load(Ordering::SeqCst);
    mongo.hang_server(false).unwrap().unwrap();
    let resumed = Instant::now();
    while !next(&mut rx).await {}
    let recovered = resumed.elapsed();
    cancel.cancel();
    probing.await.unwrap();

    assert!(
        noticed < PROBE_TIMEOUT + Duration::from_secs(2),
        "unreachable after {noticed:?}"
    );
    assert_eq!(
        during_hang,
        1,
        "the probe's one connection, kept through the hang: {:?}",
        verdicts.lock().unwrap()
    );
    assert!(
        recovered < Duration::from_secs(3),
        "reachable again {recovered:?} after the server resumed"
    );
    // One `false` for the whole hang: the outstanding ping was waited for, not re-sent.
    let falses = verdicts.lock().unwrap().iter().filter(|(_, r)| !r).count();
    assert_eq!(falses, 1, "{:?}", verdicts.lock().unwrap());
}

async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<bool>) -> bool {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a verdict within 10 s")
        .expect("the probe runs")
}
