//! The workers against a fake publisher: order per session, parking, restarts.

use super::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use mongodb::bson::doc;
use ordo_core::envelope::{Envelope, EventFields};
use ordo_core::readiness::Readiness;
use ordo_core::retry::Backoff;
use ordo_core::servicebus::sender::{PublishError, Publisher, PublisherFactory};

use crate::acks::{Acks, Position};
use crate::park::{ParkError, ParkMessage};

/// Records what was sent; fails the first `fail_first` publishes; refuses the messages in
/// `reject`; panics once on a batch holding a message of `panic_on`.
#[derive(Debug, Default)]
struct Log {
    sent: Mutex<Vec<(String, i64)>>,
    batches: Mutex<Vec<Vec<String>>>,
    fail_first: AtomicUsize,
    reject: Mutex<HashSet<String>>,
    panic_on: Mutex<HashSet<String>>,
    panics: AtomicUsize,
    parked: Mutex<Vec<(String, String)>>,
}

struct FakeFactory(Arc<Log>);
struct FakePublisher(Arc<Log>);

impl Publisher for FakePublisher {
    async fn publish(&mut self, messages: &[WireMessage]) -> Result<(), PublishError> {
        if self
            .0
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(PublishError::Send("broker down".into()));
        }
        for m in messages {
            if self.0.panic_on.lock().unwrap().remove(&m.message_id) {
                self.0.panics.fetch_add(1, Ordering::SeqCst);
                panic!("publisher bug on {}", m.message_id);
            }
            if self.0.reject.lock().unwrap().contains(&m.message_id) {
                return Err(PublishError::Message {
                    message_id: m.message_id.clone(),
                    reason: "too large".into(),
                });
            }
        }
        let delay = (messages[0].body.len() % 3) as u64;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        self.0
            .batches
            .lock()
            .unwrap()
            .push(messages.iter().map(|m| m.session_id.clone()).collect());
        let mut sent = self.0.sent.lock().unwrap();
        for m in messages {
            let (agg, id) = m.message_id.rsplit_once(':').unwrap();
            sent.push((agg.to_string(), id.parse().unwrap()));
        }
        Ok(())
    }
}

impl PublisherFactory for FakeFactory {
    type Publisher = FakePublisher;
    async fn open(&self) -> Result<FakePublisher, PublishError> {
        Ok(FakePublisher(self.0.clone()))
    }
}

#[derive(Debug)]
struct FakePark(Arc<Log>);

impl ParkMessage for FakePark {
    fn park_message<'a>(
        &'a self,
        message: &'a WireMessage,
        reason: &'static str,
        error: String,
    ) -> BoxFuture<'a, Result<bool, ParkError>> {
        self.0
            .parked
            .lock()
            .unwrap()
            .push((message.message_id.clone(), format!("{reason}: {error}")));
        Box::pin(async { Ok(true) })
    }
}

fn message(agg: &str, id: i64) -> WireMessage {
    let ev = doc! {"_id": 1, "aggregateId": agg, "eventId": id, "eventType": "T", "payload": {"pad": "x".repeat(id as usize % 7)}};
    Envelope::from_event(&ev, &EventFields::default(), "db", "events")
        .unwrap()
        .to_message()
}

fn context(log: &Arc<Log>, dispatcher: &Arc<Dispatcher>, acks: &Acks) -> WorkerContext {
    WorkerContext {
        dispatcher: dispatcher.clone(),
        acks: acks.clone(),
        readiness: Readiness::new(),
        parking: Arc::new(FakePark(log.clone())),
        backoff: Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(2),
        },
        abandon: CancellationToken::new(),
        restarts: Arc::default(),
    }
}

/// Submits 2000 events of 37 aggregates (eventIds 1.. per aggregate), closes, and runs
/// four supervised workers to the end; returns the context for inspection.
async fn run(log: &Arc<Log>) -> (WorkerContext, Acks) {
    let dispatcher = Dispatcher::new(50, 1 << 20, 8);
    let acks: Acks = Arc::default();
    let ctx = context(log, &dispatcher, &acks);
    let factory = Arc::new(FakeFactory(log.clone()));
    let workers = tokio::spawn(supervise(4, factory, ctx.clone()));
    let cancel = CancellationToken::new();
    let mut next = HashMap::<String, i64>::new();
    for i in 0..2000u64 {
        let agg = format!("a{}", (i * 7919) % 37);
        let id = next.entry(agg.clone()).or_insert(0);
        *id += 1;
        let seq = acks.lock().unwrap().push(Some(Position::test(i)));
        assert!(dispatcher.submit(seq, message(&agg, *id), &cancel).await);
    }
    dispatcher.close();
    workers.await.unwrap().unwrap();
    (ctx, acks)
}

/// Every (aggregate, id) sent, in order per aggregate; `skipped` never sent.
fn check_order(log: &Log, skipped: &[(&str, i64)]) {
    let sent = log.sent.lock().unwrap().clone();
    let distinct: HashSet<_> = sent.iter().cloned().collect();
    assert_eq!(distinct.len(), 2000 - skipped.len());
    let mut seen = HashMap::<String, i64>::new();
    for (agg, id) in sent {
        let last = seen.entry(agg.clone()).or_insert(0);
        let mut want = *last + 1;
        while skipped.contains(&(agg.as_str(), want)) {
            want += 1;
        }
        assert!(
            id == want || id <= *last,
            "per-session order: {agg} {id} after {last}"
        );
        *last = (*last).max(id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_stay_in_order_batches_stay_in_one_session_and_all_are_acked() {
    let log = Arc::new(Log::default());
    log.fail_first.store(3, Ordering::SeqCst);
    let (ctx, acks) = run(&log).await;
    check_order(&log, &[]);
    assert!(log
        .batches
        .lock()
        .unwrap()
        .iter()
        .all(|b| b.iter().all(|s| s == &b[0])));
    let mut acks = acks.lock().unwrap();
    assert_eq!(acks.outstanding(), 0);
    assert_eq!(
        acks.take()
            .map(|(p, n)| (p.wall_time.timestamp_millis(), n)),
        Some((1999, 2000))
    );
    assert!(
        ctx.readiness.failing().is_empty(),
        "recovered sends clear readiness"
    );
}

/// The client refuses one message: it is parked with the client's reason, acknowledged
/// as parked (not counted as published), and the rest of its session is still published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_is_parked_and_its_session_goes_on() {
    let log = Arc::new(Log::default());
    log.reject.lock().unwrap().insert("a3:5".into());
    let (ctx, acks) = run(&log).await;
    check_order(&log, &[("a3", 5)]);
    let parked = log.parked.lock().unwrap().clone();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].0, "a3:5");
    assert!(parked[0].1.contains("rejected") && parked[0].1.contains("too large"));
    let sent = log.sent.lock().unwrap();
    assert!(sent.contains(&("a3".into(), 6)), "the session went on");
    let mut acks = acks.lock().unwrap();
    assert_eq!(
        acks.outstanding(),
        0,
        "the checkpoint passes the parked message"
    );
    assert_eq!(
        acks.take()
            .map(|(p, n)| (p.wall_time.timestamp_millis(), n)),
        Some((1999, 1999))
    );
    assert_eq!(ctx.restarts.load(Ordering::SeqCst), 0, "no worker died");
}

/// A publisher panics in the middle of a session: the worker's messages go back to the
/// front of their queue, the worker is restarted, and every event still arrives in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_worker_is_restarted_and_loses_nothing() {
    let log = Arc::new(Log::default());
    log.panic_on
        .lock()
        .unwrap()
        .extend(["a3:5".to_string(), "a7:9".to_string()]);
    let (ctx, acks) = run(&log).await;
    assert_eq!(log.panics.load(Ordering::SeqCst), 2, "the fault fired");
    assert_eq!(ctx.restarts.load(Ordering::SeqCst), 2);
    check_order(&log, &[]);
    assert_eq!(acks.lock().unwrap().outstanding(), 0);
}
