//! The fold's laws: the example rules compile, each operator does what it says, mistakes are
//! named, and any interleaving of duplicates and redeliveries folds to the same read model.

use mongodb::bson::{doc, Bson, Document};
use proptest::prelude::*;

use super::*;
use crate::fold::{classify, Step, DELETED_FIELD};

const EXAMPLE: &str = include_str!("../../../config/projections.toml");

fn example(name: &str) -> DeclarativeProjection {
    ProjectionsFile::load_str(EXAMPLE)
        .unwrap()
        .into_iter()
        .find(|p| p.name() == name)
        .unwrap()
}

fn order_event(v: i64, event_type: &str, payload: Document) -> Document {
    doc! {
        "aggregateId": "o-1", "aggregateType": "Order", "eventId": v,
        "eventType": event_type, "payload": payload,
        "timestamp": mongodb::bson::DateTime::from_millis(1_700_000_000_000 + v),
    }
}

fn order_history() -> Vec<Document> {
    vec![
        order_event(1, "OrderCreated", doc! { "customerId": "c-9" }),
        order_event(
            2,
            "ItemAddedToOrder",
            doc! { "sku": "a", "qty": 2, "price": 1.5 },
        ),
        order_event(
            3,
            "ItemAddedToOrder",
            doc! { "sku": "b", "qty": 1, "price": 4.0 },
        ),
        order_event(4, "OrderNoted", doc! {}),
        order_event(5, "ItemRemovedFromOrder", doc! { "sku": "a" }),
        order_event(6, "OrderCancelled", doc! { "reason": "late" }),
    ]
}

#[test]
fn example_rules_fold_an_order() {
    let p = example("orders");
    let mut m = ReadModel::empty("o-1");
    assert_eq!(fold_events(&p, &mut m, &order_history()).unwrap(), None);
    assert_eq!(m.version, 6, "an event without rules advances the version");
    let d = m.doc.unwrap();
    assert_eq!(d.get_str("status").unwrap(), "cancelled");
    assert_eq!(d.get_str("cancelReason").unwrap(), "late");
    assert_eq!(d.get_i64("itemCount").unwrap(), 1);
    assert_eq!(d.get_i64("quantity").unwrap(), 3);
    let items = d.get_array("items").unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].as_document().unwrap().get_str("sku").unwrap(), "b");
}

#[test]
fn other_aggregates_are_ignored_without_a_version() {
    let users = example("users");
    let mut m = ReadModel::empty("o-1");
    assert_eq!(fold_events(&users, &mut m, &order_history()).unwrap(), None);
    assert_eq!(m, ReadModel::empty("o-1"));
    assert!(!m.needs_write(0));
}

#[test]
fn an_event_without_rules_still_records_progress() {
    let orders = example("orders");
    let mut m = ReadModel::empty("o-1");
    let first = [order_event(1, "OrderNoted", doc! {})];
    assert_eq!(fold_events(&orders, &mut m, &first).unwrap(), None);
    assert_eq!(m.version, 1);
    assert!(m.needs_write(0), "the version is stored though no rule ran");
    assert_eq!(m, fold_history(&orders, "o-1", &first).unwrap());
}

#[test]
fn delete_leaves_a_tombstone_that_keeps_the_version() {
    let users = example("users");
    let ev = |v: i64, t: &str, p: Document| {
        doc! { "aggregateId": "u", "aggregateType": "User", "eventId": v, "eventType": t, "payload": p,
        "timestamp": mongodb::bson::DateTime::from_millis(1) }
    };
    let mut m = ReadModel::empty("u");
    let events = [
        ev(1, "UserRegistered", doc! { "email": "a@x", "name": "A" }),
        ev(2, "UserEmailUpdated", doc! { "email": "b@x" }),
        ev(3, "UserDeleted", doc! {}),
    ];
    fold_events(&users, &mut m, &events[..2]).unwrap();
    let d = m.doc.as_ref().unwrap();
    assert_eq!(d.get_str("email").unwrap(), "b@x");
    assert_eq!(d.get_i64("emailChanges").unwrap(), 1);
    fold_events(&users, &mut m, &events).unwrap();
    assert_eq!(m.doc, None);
    let stored = m.to_document(mongodb::bson::DateTime::from_millis(0));
    assert!(stored.get_bool(DELETED_FIELD).unwrap());
    assert_eq!(stored.get_i64("lastEventId").unwrap(), 3);
    let back = ReadModel::from_document("u", stored);
    assert_eq!(back, m);
}

#[test]
fn version_rule() {
    assert_eq!(classify(3, 2), Step::Duplicate);
    assert_eq!(classify(3, 3), Step::Duplicate);
    assert_eq!(classify(3, 4), Step::Apply);
    assert_eq!(classify(3, 7), Step::Gap(Gap { from: 4, to: 6 }));
    assert_eq!(classify(0, 1), Step::Apply);
}

#[test]
fn a_gap_stops_the_fold_before_the_hole() {
    let p = example("orders");
    let mut m = ReadModel::empty("o-1");
    let h = order_history();
    let with_hole = [h[0].clone(), h[1].clone(), h[4].clone()];
    assert_eq!(
        fold_events(&p, &mut m, &with_hole).unwrap(),
        Some(Gap { from: 3, to: 4 })
    );
    assert_eq!(m.version, 2);
    assert!(matches!(
        fold_history(&p, "o-1", &with_hole),
        Err(HistoryError::Gap(Gap { from: 3, to: 4 }))
    ));
}

/// A history holds every version once: a version seen twice stops the fold there (a message
/// seen twice is a redelivery, skipped by `fold_events`; two events in the history with one
/// version are a contract violation, and which one is the event is not the fold's to guess).
#[test]
fn a_duplicate_version_stops_a_history_fold() {
    let p = example("orders");
    let h = order_history();
    let twice = [h[0].clone(), h[1].clone(), h[1].clone(), h[2].clone()];
    assert_eq!(
        fold_history(&p, "o-1", &twice),
        Err(HistoryError::Duplicate(2))
    );
    let mut fold = HistoryFold::new(ReadModel::empty("o-1"));
    fold.push(&p, &twice[0]).unwrap();
    fold.push(&p, &twice[1]).unwrap();
    assert_eq!(fold.push(&p, &twice[2]), Err(HistoryError::Duplicate(2)));
    assert_eq!(fold.seen(), 2);
    assert_eq!(
        fold.into_model(),
        fold_history(&p, "o-1", &h[..2]).unwrap(),
        "the model holds what was folded before the duplicate"
    );
}

#[test]
fn a_version_is_an_integer_of_either_width_or_a_finite_double() {
    assert_eq!(version_of(Some(&Bson::Int64(7))), Some(7));
    assert_eq!(version_of(Some(&Bson::Int32(7))), Some(7));
    assert_eq!(version_of(Some(&Bson::Double(7.0))), Some(7));
    assert_eq!(version_of(Some(&Bson::Double(f64::INFINITY))), None);
    assert_eq!(version_of(Some(&Bson::String("7".into()))), None);
    assert_eq!(version_of(None), None);
    assert_eq!(event_version(&doc! {}), 0);
    assert_eq!(event_version(&doc! {"eventId": 7.0}), 7);
}

#[test]
fn apply_errors_are_poison_and_leave_the_model_unchanged() {
    let p = example("orders");
    let mut m = ReadModel::empty("o-1");
    fold_events(&p, &mut m, &order_history()[..1]).unwrap();
    let before = m.clone();
    let bad = order_event(2, "ItemAddedToOrder", doc! { "sku": "a", "price": 1.0 });
    let e = fold_events(&p, &mut m, [&bad]).unwrap_err();
    assert!(e.message.contains("$payload.qty"), "{e}");
    assert_eq!(m, before);
    let bad = order_event(
        2,
        "ItemAddedToOrder",
        doc! { "sku": "a", "qty": "two", "price": 1.0 },
    );
    let e = fold_events(&p, &mut m, [&bad]).unwrap_err();
    assert!(e.message.contains("not a number"), "{e}");
}

#[test]
fn configuration_mistakes_name_projection_event_and_key() {
    let cases = [
        (
            "[[projections]]\nname = \"p\"\ncollection = \"c\"\n[[projections.on.E]]\nsett = { a = 1 }\n",
            "projection `p`, event `E`: on.E[0].sett: unknown operator",
        ),
        (
            "[[projections]]\nname = \"p\"\ncollection = \"c\"\n[[projections.on.E]]\nset = { a = \"$paylod.x\" }\n",
            "projection `p`, event `E`: on.E[0].set.a:",
        ),
        (
            "[[projections]]\nname = \"p\"\ncollection = \"c\"\n[[projections.on.E]]\ninc = { a = \"x\" }\n",
            "projection `p`, event `E`: on.E[0].inc.a: inc needs a number",
        ),
        (
            "[[projections]]\nname = \"p\"\ncollection = \"c\"\n[[projections.on.E]]\nset = { lastEventId = 1 }\n",
            "on.E[0].set.lastEventId",
        ),
        (
            "[[projections]]\nname = \"p\"\ncollection = \"c\"\naggregate_types = [\"A\"]\n[[projections]]\nname = \"q\"\ncollection = \"c\"\naggregate_types = [\"B\"]\n",
            "projection `q`: collection:",
        ),
    ];
    for (text, expected) in cases {
        let e = ProjectionsFile::load_str(text).unwrap_err().to_string();
        assert!(
            e.starts_with(expected) || e.contains(expected),
            "{e}\n  expected: {expected}"
        );
    }
}

#[derive(Debug)]
struct Counter;

impl Projection for Counter {
    fn name(&self) -> &str {
        "counter"
    }
    fn collection(&self) -> &str {
        "counters"
    }
    fn selects(&self, _: Option<&str>, _: &str) -> bool {
        true
    }
    fn apply(&self, doc: &mut Option<Document>, event: &Document) -> Result<(), ApplyError> {
        let d = doc.get_or_insert_with(Document::new);
        let seen = d.get_array("seen").cloned().unwrap_or_default();
        let mut seen = seen;
        seen.push(event.get("eventId").cloned().unwrap_or(Bson::Null));
        d.insert("seen", seen);
        Ok(())
    }
}

#[test]
fn custom_projections_fold_the_same_way() {
    let mut m = ReadModel::empty("x");
    let evs: Vec<Document> = (1..=3)
        .map(|v| doc! { "eventId": v as i64, "eventType": "T" })
        .collect();
    fold_events(&Counter, &mut m, &evs).unwrap();
    fold_events(&Counter, &mut m, &evs).unwrap();
    assert_eq!(m.doc.unwrap().get_array("seen").unwrap().len(), 3);
}

fn random_order_history(n: usize, seed: u64) -> Vec<Document> {
    let mut out = vec![order_event(1, "OrderCreated", doc! { "customerId": "c" })];
    let mut live: Vec<String> = Vec::new();
    let mut s = seed;
    for v in 2..=n as i64 {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let pick = (s >> 33) % 4;
        let e = if pick == 0 && !live.is_empty() {
            let sku = live.remove((s >> 40) as usize % live.len());
            order_event(v, "ItemRemovedFromOrder", doc! { "sku": sku })
        } else if pick == 1 {
            order_event(v, "OrderNoted", doc! {})
        } else {
            let sku = format!("s{v}");
            live.push(sku.clone());
            order_event(
                v,
                "ItemAddedToOrder",
                doc! { "sku": sku, "qty": (v % 5) + 1, "price": 2.5 },
            )
        };
        out.push(e);
    }
    out
}

proptest! {
    /// Any delivery of a contiguous sequence where every event arrives at least once, in order
    /// of first arrival, with duplicates and redeliveries anywhere after it, and split into any
    /// batches, folds to what applying each event once gives.
    #[test]
    fn duplicates_and_redeliveries_do_not_change_the_fold(
        n in 1usize..30,
        seed in any::<u64>(),
        extra in proptest::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..40),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let history = random_order_history(n, seed);
        let p = example("orders");
        let mut once = ReadModel::empty("o-1");
        for e in &history {
            prop_assert_eq!(fold_events(&p, &mut once, [e]).unwrap(), None);
        }
        // Deliveries: the sequence in order, with redeliveries of already delivered events
        // inserted after their first delivery.
        let mut delivery: Vec<&Document> = history.iter().collect();
        for (at, which) in &extra {
            let pos = at.index(delivery.len() + 1);
            let max_v = delivery[..pos].iter().map(|e| fold::event_version(e)).max().unwrap_or(0);
            if max_v == 0 { continue; }
            let v = which.index(max_v as usize) as i64 + 1;
            delivery.insert(pos, &history[(v - 1) as usize]);
        }
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c.index(delivery.len() + 1)).collect();
        bounds.push(0);
        bounds.push(delivery.len());
        bounds.sort_unstable();
        let mut model = ReadModel::empty("o-1");
        for w in bounds.windows(2) {
            prop_assert_eq!(fold_events(&p, &mut model, delivery[w[0]..w[1]].iter().copied()).unwrap(), None);
        }
        prop_assert_eq!(&model, &once);
        let full = fold_history(&p, "o-1", &history).unwrap();
        prop_assert_eq!(&full, &once);
    }
}
