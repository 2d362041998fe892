//! The settlement rule: what happens to every message of a batch, decided from the batch, the
//! version the read models held before it, and how the apply ended. No I/O: the worker executes
//! the [`Decision`], and the property tests below try to break its invariants.
//!
//! - A message is completed only when its version is durable (`<= durable`): completing removes
//!   it from the broker for good, so anything not yet written must stay there or be dead-lettered.
//! - A poison (the event the apply stopped at, or the first undecodable body) is dead-lettered
//!   exactly once, with its own reason, and the aggregate is blocked at its version.
//! - Nothing is applied over a hole: no message at or after the block's version is completed;
//!   every later message is dead-lettered as `AggregateBlocked`. `repair` re-projects the
//!   aggregate from the events collection, which holds those events, so none is lost.
//! - A fault that is not the events' own (database down, a fail point, a timeout) decides
//!   nothing: the batch is retried in place, so the broker's delivery count never moves for it.

use std::collections::BTreeSet;

/// Dead-letter reason for later messages of a blocked aggregate.
pub const REASON_BLOCKED: &str = "AggregateBlocked";
/// Dead-letter reason for a body that is not an envelope.
pub const REASON_DECODE: &str = "UndecodableMessage";
/// Dead-letter reason for an envelope version this build does not read.
pub const REASON_VERSION: &str = "UnsupportedEnvelopeVersion";
/// Dead-letter reason for an event a projection cannot apply.
pub const REASON_PROJECTION: &str = "ProjectionError";
/// Dead-letter reason for missing events that did not appear within `gap_timeout`, so the gap
/// could not be filled. The value keeps the word "healed" it was published with, so alerts
/// and scripts on the dead-letter reason keep working.
pub const REASON_GAP: &str = "GapNotHealed";
/// Dead-letter reason for a source event, read to fill a gap, that breaks the contract.
pub const REASON_SOURCE: &str = "InvalidSourceEvent";
/// Dead-letter reason for two source documents with the same (aggregateId, eventId).
pub const REASON_DUPLICATE: &str = "DuplicateVersion";
/// Dead-letter reason for an event whose aggregate's session id is not the session it came in:
/// one session must carry one aggregate, and folding it would write it into the wrong model.
pub const REASON_FOREIGN: &str = "ForeignAggregate";
/// Dead-letter reason for a read model the server refuses to store (validator, 16 MB).
pub const REASON_REFUSED: &str = "ReadModelRefused";

/// Why a message is poison (the events' own fault, never the database's or the broker's), as
/// the dead-letter reason and `ordo_blocked` record it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poison {
    /// Short reason (the dead-letter reason).
    pub reason: &'static str,
    /// What went wrong, with the field, value or document that did it.
    pub description: String,
    /// The projection that failed, or `*` when no projection is involved.
    pub projection: String,
}

/// Where the apply stopped short of the batch, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    /// The first version not applied.
    pub version: i64,
    /// Why.
    pub poison: Poison,
}

/// A message of the batch, as the rule sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A decoded event of this version.
    Event(i64),
    /// A body that cannot be read: poison by itself.
    Undecodable(Poison),
}

/// How the apply of a batch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every version up to `durable` is in every read model; `stop` says why the apply ended
    /// before the batch's last version, if it did.
    Applied {
        /// Highest version durable in every read model.
        durable: i64,
        /// The poison the apply stopped at.
        stop: Option<Stop>,
    },
    /// The aggregate was already blocked at this version (`ordo_blocked`).
    Blocked {
        /// The first version not applied.
        at: i64,
    },
    /// A fault that is not the events' own (database down, a fail point, a timeout) cut the
    /// apply short: nothing is known about the batch.
    Interrupted,
}

/// What to do with one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Its effect is durable. `applied` is false for a version applied before (a duplicate).
    Complete {
        /// First time this version was applied (for the applied and duplicate metrics).
        applied: bool,
    },
    /// Moves it to the dead-letter queue.
    DeadLetter {
        /// The dead-letter reason.
        reason: &'static str,
        /// The dead-letter description.
        description: String,
    },
    /// Neither durable nor poison: returned to the broker. Only an outcome that contradicts
    /// its batch (a durable version below an event with no stop to explain it) leads here.
    Abandon,
}

/// The settlement of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Keep the messages locked and apply the batch again after a backoff.
    Retry,
    /// Settle every message, in order; record `block` first when there is one.
    Settle {
        /// One action per message, in the batch's order.
        actions: Vec<Action>,
        /// A new poison: block the aggregate at this version.
        block: Option<Stop>,
    },
}

/// The rule. `stored` is the highest version the read models held before the batch.
pub fn decide(batch: &[Item], stored: i64, outcome: &Outcome) -> Decision {
    let (durable, mut stop, already_blocked) = match outcome {
        Outcome::Interrupted => return Decision::Retry,
        Outcome::Applied { durable, stop } => (*durable, stop.clone(), false),
        Outcome::Blocked { at } => (at - 1, None, true),
    };
    let mut block: Option<Stop> = None;
    let mut seen = BTreeSet::new();
    let mut actions = Vec::with_capacity(batch.len());
    for item in batch {
        let action = match item {
            Item::Event(v) if *v <= durable => Action::Complete {
                applied: *v > stored && seen.insert(*v),
            },
            _ if block.is_some() || already_blocked => blocked(durable + 1),
            Item::Event(_) => match stop.take() {
                Some(s) => poison(&mut block, s),
                None => Action::Abandon,
            },
            Item::Undecodable(why) => {
                let s = stop.take().unwrap_or_else(|| Stop {
                    version: durable + 1,
                    poison: why.clone(),
                });
                poison(&mut block, s)
            }
        };
        actions.push(action);
    }
    Decision::Settle { actions, block }
}

fn poison(block: &mut Option<Stop>, s: Stop) -> Action {
    let action = Action::DeadLetter {
        reason: s.poison.reason,
        description: s.poison.description.clone(),
    };
    *block = Some(s);
    action
}

fn blocked(at: i64) -> Action {
    Action::DeadLetter {
        reason: REASON_BLOCKED,
        description: format!(
            "the aggregate is blocked at v{at}; repair re-projects it from the events collection"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn poison(reason: &'static str) -> Poison {
        Poison {
            reason,
            description: reason.to_lowercase(),
            projection: "*".into(),
        }
    }

    fn item() -> impl Strategy<Value = Item> {
        prop_oneof![
            8 => (1i64..12).prop_map(Item::Event),
            1 => Just(Item::Undecodable(poison("UndecodableMessage"))),
        ]
    }

    /// An outcome the apply can produce for `batch`: it folds the decodable prefix from
    /// `stored` and stops at a poison (a projection error or a gap not filled) or not at all.
    fn consistent(batch: &[Item], stored: i64, stop_at: Option<i64>) -> Outcome {
        let cut = batch
            .iter()
            .position(|i| matches!(i, Item::Undecodable(_)))
            .unwrap_or(batch.len());
        let top = batch[..cut]
            .iter()
            .filter_map(|i| match i {
                Item::Event(v) => Some(*v),
                Item::Undecodable(_) => None,
            })
            .max()
            .unwrap_or(stored)
            .max(stored);
        match stop_at.filter(|s| *s > stored && *s <= top) {
            Some(s) => Outcome::Applied {
                durable: s - 1,
                stop: Some(Stop {
                    version: s,
                    poison: poison("ProjectionError"),
                }),
            },
            None => Outcome::Applied {
                durable: top,
                stop: None,
            },
        }
    }

    fn settle(batch: &[Item], stored: i64, outcome: &Outcome) -> (Vec<Action>, Option<Stop>) {
        match decide(batch, stored, outcome) {
            Decision::Settle { actions, block } => (actions, block),
            Decision::Retry => panic!("{outcome:?} is not Interrupted"),
        }
    }

    fn is_blocked(a: &Action) -> bool {
        matches!(a, Action::DeadLetter { reason, .. } if *reason == REASON_BLOCKED)
    }

    fn is_poison(a: &Action) -> bool {
        matches!(a, Action::DeadLetter { reason, .. } if *reason != REASON_BLOCKED)
    }

    proptest! {
        #[test]
        fn never_completes_above_the_durable_version(
            batch in prop::collection::vec(item(), 1..12),
            stored in 0i64..6,
            stop_at in prop::option::of(1i64..12),
        ) {
            let outcome = consistent(&batch, stored, stop_at);
            let Outcome::Applied { durable, .. } = outcome else { unreachable!() };
            let (actions, _) = settle(&batch, stored, &outcome);
            prop_assert_eq!(actions.len(), batch.len());
            for (item, action) in batch.iter().zip(&actions) {
                if matches!(action, Action::Complete { .. }) {
                    prop_assert!(matches!(item, Item::Event(v) if *v <= durable), "{item:?} {action:?}");
                }
            }
        }

        #[test]
        fn exactly_one_dead_letter_per_poison(
            batch in prop::collection::vec(item(), 1..12),
            stored in 0i64..6,
            stop_at in prop::option::of(1i64..12),
        ) {
            let outcome = consistent(&batch, stored, stop_at);
            let (actions, block) = settle(&batch, stored, &outcome);
            let poisons = actions.iter().filter(|a| is_poison(a)).count();
            let has_poison = matches!(&outcome, Outcome::Applied { stop: Some(_), .. })
                || batch.iter().any(|i| matches!(i, Item::Undecodable(_)));
            prop_assert_eq!(poisons, usize::from(has_poison), "{:?}", actions);
            prop_assert_eq!(block.is_some(), has_poison);
            prop_assert!(!actions.contains(&Action::Abandon), "{:?}", actions);
            // Everything after the poison is blocked, or a durable duplicate.
            if let Some(first) = actions.iter().position(is_poison) {
                for a in &actions[first + 1..] {
                    prop_assert!(!is_poison(a), "{:?}", actions);
                }
            }
        }

        #[test]
        fn never_applies_over_a_hole(
            batch in prop::collection::vec(item(), 1..12),
            stored in 0i64..6,
            stop_at in prop::option::of(1i64..12),
        ) {
            let outcome = consistent(&batch, stored, stop_at);
            let (actions, block) = settle(&batch, stored, &outcome);
            if let Some(b) = block {
                for (item, action) in batch.iter().zip(&actions) {
                    if let Item::Event(v) = item {
                        if *v >= b.version {
                            prop_assert!(!matches!(action, Action::Complete { .. }), "{item:?} {action:?}");
                        }
                    }
                }
            }
        }

        #[test]
        fn a_blocked_aggregate_completes_only_what_came_before_the_block(
            batch in prop::collection::vec(item(), 1..12),
            at in 1i64..12,
        ) {
            let (actions, block) = settle(&batch, at - 1, &Outcome::Blocked { at });
            prop_assert!(block.is_none(), "blocked once, not again");
            for (item, action) in batch.iter().zip(&actions) {
                match item {
                    Item::Event(v) if *v < at => prop_assert_eq!(action, &Action::Complete { applied: false }),
                    _ => prop_assert!(is_blocked(action), "{action:?}"),
                }
            }
        }

        #[test]
        fn each_version_is_counted_applied_once(
            batch in prop::collection::vec(item(), 1..12),
            stored in 0i64..6,
        ) {
            let outcome = consistent(&batch, stored, None);
            let (actions, _) = settle(&batch, stored, &outcome);
            let mut applied: Vec<i64> = batch.iter().zip(&actions).filter_map(|(i, a)| match (i, a) {
                (Item::Event(v), Action::Complete { applied: true }) => Some(*v),
                _ => None,
            }).collect();
            let n = applied.len();
            applied.sort();
            applied.dedup();
            prop_assert_eq!(applied.len(), n);
            prop_assert!(applied.iter().all(|v| *v > stored));
        }
    }

    #[test]
    fn a_fault_that_is_not_the_events_retries_the_batch() {
        let batch = [Item::Event(1), Item::Event(2)];
        assert_eq!(decide(&batch, 0, &Outcome::Interrupted), Decision::Retry);
    }

    #[test]
    fn the_message_after_the_durable_prefix_carries_the_poison() {
        let batch = [Item::Event(3), Item::Event(4), Item::Event(5)];
        let stop = Stop {
            version: 4,
            poison: poison("GapNotHealed"),
        };
        let outcome = Outcome::Applied {
            durable: 3,
            stop: Some(stop.clone()),
        };
        let Decision::Settle { actions, block } = decide(&batch, 2, &outcome) else {
            panic!()
        };
        assert_eq!(block, Some(stop));
        assert_eq!(actions[0], Action::Complete { applied: true });
        assert!(
            matches!(&actions[1], Action::DeadLetter { reason, .. } if *reason == "GapNotHealed")
        );
        assert!(
            matches!(&actions[2], Action::DeadLetter { reason, .. } if *reason == REASON_BLOCKED)
        );
    }
}
