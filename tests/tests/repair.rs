//! `ordo-projector repair` against a running deployment (producer and projector as real
//! processes, events inserted as the application would).

use std::time::{Duration, Instant};

use mongodb::bson::{doc, Bson, DateTime, Document};
use ordo_e2e::stack::Stack;
use ordo_testkit::wait_until;

fn user_event(id: &str, v: i64) -> Document {
    let (event_type, payload) = if v == 1 {
        (
            "UserRegistered",
            doc! { "email": format!("{id}@x"), "name": id },
        )
    } else {
        ("UserEmailUpdated", doc! { "email": format!("{id}+{v}@x") })
    };
    doc! {
        "aggregateId": id, "aggregateType": "User", "eventId": v, "eventType": event_type,
        "payload": payload, "timestamp": DateTime::now(),
    }
}

/// Whether a connection of application `app` has a `delete` command in progress (the server
/// reports each connection's current or last command).
async fn deleting(stack: &Stack, app: &str) -> bool {
    let reply = stack
        .mongo
        .client()
        .database("admin")
        .run_command(doc! { "currentOp": 1, "$all": true })
        .await
        .unwrap();
    reply
        .get_array("inprog")
        .unwrap()
        .iter()
        .filter_map(Bson::as_document)
        .any(|op| {
            let named = op
                .get_document("clientMetadata")
                .and_then(|m| m.get_document("application"))
                .and_then(|a| a.get_str("name"))
                .is_ok_and(|n| n == app);
            named
                && op
                    .get_document("command")
                    .is_ok_and(|c| c.contains_key("delete"))
        })
}

/// `repair` under live traffic closes the race of M1: an event that arrives while the repair is
/// running and the aggregate is still blocked is dead-lettered by the projector, yet ends up in
/// the read model, with no later event to heal it. The repair's delete from `ordo_blocked` is
/// held for 4 s by a fail point scoped to the repair's connections; the event is inserted
/// (and published by the producer) while that delete is held, and reaches the projector, which
/// dead-letters it as `AggregateBlocked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_under_live_traffic_applies_events_that_arrive_while_it_runs() {
    let mut stack = Stack::start(Duration::from_secs(5)).await.unwrap();
    stack.spawn_producer().await.unwrap();
    stack.spawn_projector(0).await.unwrap();
    let Ok(emulator) = stack.bus.emulator() else {
        eprintln!("skipped: needs the emulator's dead-letter view");
        return;
    };
    let events = stack.db().collection::<Document>("events");
    let id = "m1-user";
    events
        .insert_many((1..=3).map(|v| user_event(id, v)))
        .await
        .unwrap();
    user_reaches(&stack, doc! { "_id": id, "lastEventId": 3_i64 }).await;

    blocked_at_v4_once_its_session_is_released(&stack, id).await;
    let dead_letters = BlockedDeadLetters {
        emulator,
        topic: stack.bus.topic().to_string(),
        subscription: stack.bus.subscription().to_string(),
        id,
    };
    events.insert_one(user_event(id, 4)).await.unwrap();
    wait_until(Duration::from_secs(60), || dead_letters.at_least(1)).await;

    repair_while_v5_arrives_and_is_dead_lettered(&stack, &dead_letters).await;

    // No later event arrives: v5 must be in the read model through the repair itself.
    user_reaches(
        &stack,
        doc! { "_id": id, "lastEventId": 5_i64, "email": format!("{id}+5@x") },
    )
    .await;
    assert_eq!(stack.blocked().await.unwrap(), 0);
    let verdict = stack.verify().await.unwrap();
    assert!(verdict.ok(), "{:?}", verdict.mismatches);
}

/// Waits until a user read model matches `filter`.
async fn user_reaches(stack: &Stack, filter: Document) {
    let users = stack.db().collection::<Document>("users");
    let (users, filter) = (&users, &filter);
    wait_until(Duration::from_secs(60), || async move {
        users.find_one(filter.clone()).await.unwrap().is_some()
    })
    .await;
}

/// Blocks `id` at v4, as after a poison event the operator has since fixed, once no session
/// is held: a worker reads an aggregate's block once per session it holds, so a block written
/// behind a held session's back (as here, by the test) is seen by the next one only.
async fn blocked_at_v4_once_its_session_is_released(stack: &Stack, id: &str) {
    wait_until(Duration::from_secs(30), || async move {
        stack.metric(ordo_core::metrics::SESSIONS_HELD).await == 0.0
    })
    .await;
    stack
        .db()
        .collection::<Document>("ordo_blocked")
        .insert_one(doc! {
            "_id": id, "projection": "users", "blockedAtEventId": 4_i64,
            "reason": "ProjectionError", "description": "fixed since", "messageId": format!("{id}:4"),
        })
        .await
        .unwrap();
}

/// The messages of one aggregate the projector dead-lettered as `AggregateBlocked`.
struct BlockedDeadLetters<'a> {
    emulator: &'a ordo_servicebus_emulator::EmulatorHandle,
    topic: String,
    subscription: String,
    id: &'a str,
}

impl BlockedDeadLetters<'_> {
    async fn at_least(&self, n: usize) -> bool {
        self.emulator
            .subscription_dead_letters(&self.topic, &self.subscription)
            .unwrap()
            .iter()
            .filter(|d| {
                d.session_id.as_deref() == Some(self.id)
                    && d.reason.as_deref() == Some("AggregateBlocked")
            })
            .count()
            >= n
    }
}

/// Runs `repair --aggregate` with its delete from `ordo_blocked` held for 4 s by a fail point
/// scoped to its connections, and inserts v5 while the delete is held: the aggregate is still
/// blocked, so the projector dead-letters v5. The repair must succeed all the same.
async fn repair_while_v5_arrives_and_is_dead_lettered(
    stack: &Stack,
    dead_letters: &BlockedDeadLetters<'_>,
) {
    let id = dead_letters.id;
    let events = stack.db().collection::<Document>("events");
    let app = "ordo-repair-test";
    stack
        .mongo
        .configure_fail_point(
            "failCommand",
            doc! {"mode": {"times": 1}, "data": {
                "failCommands": ["delete"], "appName": app,
                "blockConnection": true, "blockTimeMS": 4000,
            }},
        )
        .await
        .unwrap();
    let started = Instant::now();
    let args = ["repair", "--aggregate", id];
    let repair = stack.projector_command(app, &args);
    let during = async {
        // The repair's delete from ordo_blocked is in progress, held by the fail point.
        wait_until(Duration::from_secs(30), || deleting(stack, app)).await;
        events.insert_one(user_event(id, 5)).await.unwrap();
        // Still blocked: the projector dead-letters v5.
        wait_until(Duration::from_secs(30), || dead_letters.at_least(2)).await;
    };
    let ((ok, out), ()) = tokio::join!(async { repair.await.unwrap() }, during);
    assert!(ok, "{out}");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "the fail point did not hold the repair's delete"
    );
    stack.mongo.disable_fail_point("failCommand").await.unwrap();
}

/// Whether the emulator holds a session state for session `id` of the stack's subscription.
fn has_state(stack: &Stack, emulator: &ordo_servicebus_emulator::EmulatorHandle, id: &str) -> bool {
    let path = format!(
        "{}/subscriptions/{}",
        stack.bus.topic(),
        stack.bus.subscription()
    );
    emulator
        .stats()
        .entities
        .iter()
        .filter(|e| e.path.eq_ignore_ascii_case(&path))
        .flat_map(|e| e.sessions.iter())
        .any(|s| s.id == id && s.has_state)
}

/// The session state of session `id`, read by locking the session.
async fn session_state(stack: &Stack, id: &str) -> Vec<u8> {
    use ordo_core::servicebus::receiver::{AzureSessionSource, SessionReceiver};
    let mut source = AzureSessionSource::connect(
        &ordo_core::secret::Secret::new(stack.bus.connection_string()),
        stack.bus.topic(),
        stack.bus.subscription(),
        "state-check",
        0,
    )
    .await
    .unwrap();
    let mut session = source
        .accept_session(id, Duration::from_secs(10))
        .await
        .unwrap();
    let state = session.state().await.unwrap();
    session.close().await;
    state
}

/// A block writes "blocked at vN" into the aggregate's session state; workers do not read it
/// when they accept a session, so `repair` clears it once the block is lifted, with no worker
/// holding the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_clears_the_session_state_the_block_wrote() {
    let mut stack = Stack::start(Duration::from_secs(5)).await.unwrap();
    stack.projector_settings.gap_timeout = Duration::from_millis(500);
    stack.spawn_producer().await.unwrap();
    stack.spawn_projector(0).await.unwrap();
    let Ok(emulator) = stack.bus.emulator() else {
        eprintln!("skipped: needs the emulator's session view");
        return;
    };
    let events = stack.db().collection::<Document>("events");
    let id = "state-user";
    // v2 is missing: the projector blocks the aggregate at v2 once the gap timeout passes.
    events
        .insert_many([user_event(id, 1), user_event(id, 3)])
        .await
        .unwrap();
    let s = &stack;
    wait_until(Duration::from_secs(60), || async move {
        s.blocked().await.unwrap() == 1 && has_state(s, emulator, id)
    })
    .await;
    events.insert_one(user_event(id, 2)).await.unwrap();
    // Wait until no worker holds the session, so the repair, not a worker, clears the state.
    wait_until(Duration::from_secs(30), || async move {
        s.metric(ordo_core::metrics::SESSIONS_HELD).await == 0.0
    })
    .await;

    let (ok, out) = stack
        .projector_command("ordo-repair-state", &["repair", "--aggregate", id])
        .await
        .unwrap();
    assert!(ok, "{out}");
    assert_eq!(
        String::from_utf8(session_state(&stack, id).await).unwrap(),
        "",
        "the repair cleared the session state: {out}"
    );
    assert_eq!(stack.blocked().await.unwrap(), 0);
    user_reaches(&stack, doc! { "_id": id, "lastEventId": 3_i64 }).await;
}
