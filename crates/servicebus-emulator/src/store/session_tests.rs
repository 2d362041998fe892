//! Tests of [`super`]: the ordering invariant of the sessions available to an accept, as a
//! property over random operations.

use std::sync::Arc;

use proptest::prelude::*;

use super::super::{Entity, EntitySettings, Holder, LinkId, Next, Part, Release, Settle, Stored};

const SESSIONS: u8 = 6;

#[derive(Debug, Clone)]
enum Op {
    Enqueue { session: u8, short_ttl: bool },
    AcquireNext,
    AcquireNamed(u8),
    Take(usize),
    Complete(usize),
    Close { link: usize, lost: bool },
    Renew(usize),
    Advance(i64),
    Sweep,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..SESSIONS, any::<bool>())
            .prop_map(|(session, short_ttl)| Op::Enqueue { session, short_ttl }),
        3 => Just(Op::AcquireNext),
        1 => (0..SESSIONS).prop_map(Op::AcquireNamed),
        3 => any::<usize>().prop_map(Op::Take),
        2 => any::<usize>().prop_map(Op::Complete),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(link, lost)| Op::Close { link, lost }),
        1 => any::<usize>().prop_map(Op::Renew),
        2 => (1i64..80).prop_map(Op::Advance),
        1 => Just(Op::Sweep),
    ]
}

/// A receiver holding (or having held) a session: its link and the tokens it received.
struct Held {
    holder: Holder,
    session: Arc<str>,
    tokens: Vec<u128>,
}

fn holder(link: LinkId) -> Holder {
    Holder {
        link,
        connection: link,
        link_name: Arc::from(format!("link-{link}")),
        container: Arc::from("test"),
    }
}

fn message(seq: i64, session: &str, expires_ms: i64) -> Stored {
    let message = fe2o3_amqp_types::messaging::Message::builder()
        .body(fe2o3_amqp_types::messaging::Body::Value(
            fe2o3_amqp_types::messaging::AmqpValue(fe2o3_amqp_types::primitives::Value::Null),
        ))
        .build();
    Stored::new(seq, Arc::new(message), 0, expires_ms, Arc::from(session))
}

/// What accepting the next session must grant, found by looking at every session: the one
/// whose oldest message available to a new holder is the oldest, counting the messages of
/// an expired lock as available (they go back first; no dead-lettering with this many
/// deliveries allowed).
fn expected_next(entity: &Entity, now: i64) -> Option<Arc<str>> {
    let guard = entity.lock();
    guard
        .main
        .sessions
        .iter()
        .filter_map(|(key, queue)| {
            let first = match &queue.lock {
                Some(lock) if lock.until_ms > now => None,
                Some(_) => queue.messages.keys().next().copied(),
                None => queue.first_available(),
            };
            first.map(|seq| (seq, key.clone()))
        })
        .min()
        .map(|(_, key)| key)
}

/// The index agrees with the sessions: every unlocked session with a message to hand out is
/// filed once, under its first available message (or a stale, earlier one after a time to
/// live ran out); every session lock is filed under its expiry.
fn check_index(entity: &Entity) -> Result<(), TestCaseError> {
    let guard = entity.lock();
    let store = &guard.main;
    let filed = store
        .sessions
        .values()
        .filter(|q| q.indexed.is_some())
        .count();
    prop_assert_eq!(store.available.len(), filed);
    let locked = store.sessions.values().filter(|q| q.lock.is_some()).count();
    prop_assert_eq!(store.lock_expiry.len(), locked);
    for (key, queue) in &store.sessions {
        if let Some(lock) = &queue.lock {
            prop_assert!(store.lock_expiry.contains(&(lock.until_ms, key.clone())));
        } else if let Some(first) = queue.first_available() {
            let Some(seq) = queue.indexed else {
                return Err(TestCaseError::fail(format!(
                    "{key} is available but not filed"
                )));
            };
            prop_assert!(
                seq <= first,
                "{key} filed under {seq}, after its first {first}"
            );
            prop_assert!(store.available.contains(&(seq, key.clone())));
        }
    }
    Ok(())
}

proptest! {
    /// Whatever the interleaving of arrivals, accepts, receives, settlements, closes,
    /// renewals, expiries and sweeps, accepting the next session grants what a scan of
    /// every session would (the one with the oldest available message), and the index
    /// behind it stays consistent.
    #[test]
    fn the_next_session_is_the_one_a_full_scan_finds(
        ops in prop::collection::vec(op(), 1..250),
    ) {
        let entity = Entity::new(
            "topic/Subscriptions/s".to_owned(),
            EntitySettings {
                requires_session: true,
                lock_ms: 50,
                max_delivery_count: 1_000,
                dead_letter_on_expiry: false,
            },
        );
        let (mut now, mut next_seq, mut next_link) = (1_000i64, 1i64, 1u64);
        let mut held: Vec<Held> = Vec::new();
        for op in ops {
            match op {
                Op::Enqueue { session, short_ttl } => {
                    let expires = if short_ttl { now + 30 } else { i64::MAX };
                    entity.enqueue([message(next_seq, &format!("s{session}"), expires)]);
                    next_seq += 1;
                }
                Op::AcquireNext => {
                    let expected = expected_next(&entity, now);
                    let h = holder(next_link);
                    next_link += 1;
                    let got = entity.acquire_session(None, &h, now).ok().map(|(k, _)| k);
                    prop_assert_eq!(&got, &expected);
                    if let Some(session) = got {
                        held.push(Held { holder: h, session, tokens: Vec::new() });
                    }
                }
                Op::AcquireNamed(session) => {
                    let h = holder(next_link);
                    next_link += 1;
                    if let Ok((session, _)) =
                        entity.acquire_session(Some(&format!("s{session}")), &h, now)
                    {
                        held.push(Held { holder: h, session, tokens: Vec::new() });
                    }
                }
                Op::Take(i) if !held.is_empty() => {
                    let n = held.len();
                    let r = &mut held[i % n];
                    let next = entity.next_delivery(
                        Part::Main,
                        Some(&r.session),
                        r.holder.link,
                        false,
                        now,
                    );
                    if let Next::Deliver(d) = next {
                        r.tokens.push(d.token);
                    }
                }
                Op::Complete(i) if !held.is_empty() => {
                    let n = held.len();
                    if let Some(token) = held[i % n].tokens.pop() {
                        entity.settle(Part::Main, token, Settle::Complete, now);
                    }
                }
                Op::Close { link, lost } if !held.is_empty() => {
                    let n = held.len();
                    let r = held.swap_remove(link % n);
                    let release = if lost { Release::Lost } else { Release::Closed };
                    entity.release_link(
                        Part::Main,
                        r.tokens,
                        Some(&r.session),
                        r.holder.link,
                        release,
                    );
                }
                Op::Renew(i) if !held.is_empty() => {
                    let r = &held[i % held.len()];
                    let _ = entity.renew_session_lock(
                        &r.session,
                        r.holder.connection,
                        Some(&r.holder.link_name),
                        now,
                    );
                }
                Op::Advance(ms) => now += ms,
                Op::Sweep => entity.sweep(now),
                _ => {}
            }
            check_index(&entity)?;
        }
    }
}
