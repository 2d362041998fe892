//! A session receive against the emulator, over a real socket: a batch starts as soon as its
//! first message is there, holds what the session has in one round trip, ends when those
//! messages stop coming rather than at the batch window, and keeps order.

mod common;

use std::time::{Duration, Instant};

use common::{message, session_source, TopicSender};
use ordo_core::servicebus::receiver::{Accepted, Delivery, SessionReceiver, SessionSource};
use ordo_testkit::TestServiceBus;

/// Far longer than any answer takes, and under the client's 20 s per operation: a receive that
/// waits it out is the bug.
const WAIT: Duration = Duration::from_secs(15);
const BOUND: Duration = Duration::from_secs(10);

/// Sends `count` messages to session `session`, one send each (the test topic is partitioned
/// with duplicate detection, where a batch of distinct MessageIds is refused).
async fn send(sb: &TestServiceBus, session: &str, count: usize) {
    let mut topic = TopicSender::open(sb).await;
    for i in 1..=count {
        let m = message(session, format!("{session}:{i}"), format!("{i}"));
        topic.sender.send_message(m).await.unwrap();
    }
    topic.close().await;
}

async fn accept(sb: &TestServiceBus) -> ordo_core::servicebus::receiver::AzureSession {
    let mut source = session_source(sb, "receive-test").await;
    match source.accept_next(BOUND).await.unwrap() {
        Accepted::Session(s) => s,
        Accepted::Idle => panic!("a session with messages is accepted, not Idle"),
        Accepted::GaveUp => panic!("a session with messages is accepted, not GaveUp"),
        Accepted::Unclear => panic!("a session with messages is accepted, not Unclear"),
    }
}

fn bodies<M: Delivery>(msgs: &[M]) -> Vec<String> {
    msgs.iter()
        .map(|m| String::from_utf8(m.body().unwrap().to_vec()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_smaller_than_its_size_is_handed_out_without_waiting_the_receive_out() {
    let sb = TestServiceBus::start().await.unwrap();
    send(&sb, "two-events", 2).await;
    let mut session = accept(&sb).await;
    assert_eq!(session.session_id(), "two-events");

    let started = Instant::now();
    let first = session.receive(100, WAIT).await.unwrap();
    let took = started.elapsed();
    assert!(!first.is_empty(), "the first receive gets a message");
    assert!(
        took < BOUND,
        "two waiting messages are handed out in {took:?}, not after the {WAIT:?} wait"
    );
    let mut got = bodies(&first);
    if got.len() < 2 {
        // Under load the second message may miss the batch window; it is the next batch's.
        let started = Instant::now();
        got.extend(bodies(&session.receive(100, WAIT).await.unwrap()));
        assert!(
            started.elapsed() < BOUND,
            "the second message is not waited out either"
        );
    }
    assert_eq!(got, ["1", "2"], "both messages, in order");
    for m in first {
        session.complete(&m).await.unwrap();
    }
    session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_holds_at_most_its_size_and_every_message_arrives_once_in_order() {
    let sb = TestServiceBus::start().await.unwrap();
    send(&sb, "many-events", 25).await;
    let mut session = accept(&sb).await;
    let mut got = Vec::new();
    let deadline = Instant::now() + 3 * BOUND;
    while got.len() < 25 {
        assert!(Instant::now() < deadline, "all 25 arrive; got {got:?}");
        let batch = session.receive(10, WAIT).await.unwrap();
        assert!(
            (1..=10).contains(&batch.len()),
            "a batch holds 1 to 10 messages: {}",
            batch.len()
        );
        got.extend(bodies(&batch));
        for m in batch {
            session.complete(&m).await.unwrap();
        }
    }
    let want: Vec<String> = (1..=25).map(|i| i.to_string()).collect();
    assert_eq!(got, want, "every message once, in order");
    session.close().await;
}

/// The broker's round trip in the next test, and the gap and window it receives with: the gap
/// far shorter than a round trip, the window far longer than the test.
const ROUND_TRIP: Duration = Duration::from_millis(200);
const GAP: Duration = Duration::from_millis(60);
const WINDOW: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_messages_come_in_one_round_trip_and_the_batch_ends_when_they_stop() {
    let Some(sb) = common::bus_with_round_trip(ROUND_TRIP).await else {
        return;
    };
    let mut topic = TopicSender::open(&sb).await;
    for i in 1..=6 {
        let m = message("burst", format!("burst:{i}"), format!("{i}"));
        topic.sender.send_message(m).await.unwrap();
    }
    // Dropped, not closed: at this round trip the sender's close may give up waiting for the
    // broker's.
    drop(topic);
    let mut session = accept(&sb).await;

    let started = Instant::now();
    let batch = session.receive_burst(100, WAIT, GAP, WINDOW).await.unwrap();
    let took = started.elapsed();
    assert_eq!(
        bodies(&batch),
        ["1", "2", "3", "4", "5", "6"],
        "the session's six messages in one batch, in order"
    );
    // One round trip for the credit and the burst, one gap to see it end: credit for one
    // message first and the rest after takes two round trips, and waiting for the batch to fill
    // takes the whole window.
    assert!(
        took < 2 * ROUND_TRIP,
        "the batch is handed out one round trip ({ROUND_TRIP:?}) and one gap ({GAP:?}) after the receive, not {took:?}"
    );
    for m in &batch {
        session.complete(m).await.unwrap();
    }

    // Nothing more: the receive waits out `wait` (here short), and a message sent after the
    // drained credit is received by the next receive.
    let empty = session
        .receive_burst(100, Duration::from_millis(300), GAP, WINDOW)
        .await
        .unwrap();
    assert!(empty.is_empty(), "no seventh message yet");
    let mut topic = TopicSender::open(&sb).await;
    let m = message("burst", "burst:7".into(), "7".into());
    topic.sender.send_message(m).await.unwrap();
    drop(topic);
    let next = session.receive_burst(100, WAIT, GAP, WINDOW).await.unwrap();
    assert_eq!(bodies(&next), ["7"], "the late message, once");
    session.complete(&next[0]).await.unwrap();
}

fn session(
    answer: Accepted<ordo_core::servicebus::receiver::AzureSession>,
) -> ordo_core::servicebus::receiver::AzureSession {
    match answer {
        Accepted::Session(s) => s,
        _ => panic!("a session with messages is accepted"),
    }
}

/// A session that is only received from and settled needs no `$management` link: accepting it
/// takes the round trips of its AMQP session and its receiver link, not two more for that
/// link. The link is attached at the first request that needs it (here the session state),
/// and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_management_link_is_attached_at_its_first_request_only() {
    let Some(sb) = common::bus_with_round_trip(ROUND_TRIP).await else {
        return;
    };
    let mut topic = TopicSender::open(&sb).await;
    for id in ["lazy-1", "lazy-2"] {
        let m = message(id, format!("{id}:1"), "1".into());
        topic.sender.send_message(m).await.unwrap();
    }
    drop(topic);
    let mut source = session_source(&sb, "lazy-test").await;
    // The first accept also opens the connection and puts its token.
    let first = session(source.accept_next(BOUND).await.unwrap());

    let started = Instant::now();
    let mut second = session(source.accept_next(BOUND).await.unwrap());
    let took = started.elapsed();
    assert!(
        took < 3 * ROUND_TRIP,
        "an accept is its AMQP session's begin and its link's attach, two round trips of \
         {ROUND_TRIP:?}; attaching the $management link too takes four: {took:?}"
    );
    let batch = second.receive(10, WAIT).await.unwrap();
    assert_eq!(bodies(&batch), ["1"]);
    second.complete(&batch[0]).await.unwrap();

    assert_eq!(
        second.state().await.unwrap(),
        Vec::<u8>::new(),
        "no state yet"
    );
    second.set_state(b"blocked at v2".to_vec()).await.unwrap();
    assert_eq!(second.state().await.unwrap(), b"blocked at v2".to_vec());
    second.set_state(Vec::new()).await.unwrap();
    second.close().await;
    first.close().await;
}

/// An accepted session knows how long its lock has left, as the broker said in the accept's
/// answer (`com.microsoft:locked-until-utc`, .NET ticks in a long), and again after a renewal.
/// The projector renews sooner than `lock_renewal_interval` from it when the lock is short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_session_knows_when_its_lock_expires() {
    let sb = TestServiceBus::start().await.unwrap();
    // The emulator's lock duration for ordo's subscription; a namespace has its own.
    let lock = match sb.emulator() {
        Ok(_) => Duration::from_secs(30),
        Err(_) => Duration::from_secs(300),
    };
    send(&sb, "locked", 1).await;
    let mut session = accept(&sb).await;
    let left = session
        .lock_left()
        .expect("the accept's answer says when the lock expires");
    assert!(
        left <= lock && left > lock / 2,
        "lock left {left:?} right after the accept, of {lock:?}"
    );
    let _ = session.receive(1, WAIT).await.unwrap();
    // Time for the expiry to move by more than the clock's rounding.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let before = session.lock_left().unwrap();
    session.renew_lock().await.unwrap();
    let after = session.lock_left().unwrap();
    assert!(
        after > before + Duration::from_secs(1),
        "a renewal moves the expiry: {before:?} left before, {after:?} after"
    );
    session.close().await;
}

/// Clearing a session's state sends a null state, which Service Bus drops: an empty binary
/// would stay stored as a present, empty state for as long as the entity lives (the emulator
/// keeps it so, as Service Bus does). `repair` clears the state a block wrote this way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_session_state_is_dropped_not_kept_empty() {
    let sb = TestServiceBus::start().await.unwrap();
    if sb.is_external() {
        eprintln!("skipped: the stored state is read from the emulator");
        return;
    }
    let has_state = |id: &str| {
        sb.emulator()
            .unwrap()
            .stats()
            .entities
            .iter()
            .flat_map(|e| e.sessions.iter())
            .find(|s| s.id == id)
            .is_some_and(|s| s.has_state)
    };
    send(&sb, "stateful", 1).await;
    let mut session = accept(&sb).await;
    session.set_state(b"blocked at v2".to_vec()).await.unwrap();
    assert!(has_state("stateful"), "the state is stored");
    session.set_state(Vec::new()).await.unwrap();
    assert!(!has_state("stateful"), "the emptied state is dropped");
    assert!(session.state().await.unwrap().is_empty());
    session.close().await;
}
