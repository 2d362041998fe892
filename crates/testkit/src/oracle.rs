//! The expected-read-model oracle: what every read model must hold once the projector has seen
//! a set of events. Each aggregate's complete history is folded from scratch with the same
//! projections ([`fold_history`], what `repair` does), so the answer does not depend on the
//! order, batching, redelivery or faults the projector met. The projector's integration tests
//! and the end-to-end runs compare the stored read models with it.
//!
//! The events are documents as the projector sees them: a stored event goes through the wire
//! envelope first (`Envelope::from_event(..)?.to_event_document()`), which the caller does.
//! The envelope is ordo-core's, and ordo-core dev-depends on this crate; depending on it here
//! would make a cycle that builds a second ordo-core for ordo-core's own tests.

use std::collections::{BTreeMap, BTreeSet};

use mongodb::bson::{DateTime, Document};
use ordo_projection::UPDATED_AT_FIELD;
use ordo_projection::{fold_history, ApplyError, HistoryError, Projection};

/// Read models by collection, then by aggregate id, as stored but without `lastUpdatedAt` (the
/// time of the write, which no fold can know).
pub type Expected = BTreeMap<String, BTreeMap<String, Document>>;

/// An aggregate whose history has a hole or a version twice, so no read model can be expected
/// of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hole {
    /// The collection of the projection that folded it.
    pub collection: String,
    /// The aggregate.
    pub id: String,
    /// The missing versions ([`HistoryError::Gap`]) or the version held twice
    /// ([`HistoryError::Duplicate`]).
    pub why: HistoryError,
}

impl std::fmt::Display for Hole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.id, self.why)
    }
}

/// What a set of events leads to.
#[derive(Debug, Default)]
pub struct Folded {
    /// The read model of every aggregate a projection keeps one for (an aggregate it never
    /// selected has none). Every projection's collection is a key, even with no models.
    pub expected: Expected,
    /// Every aggregate the events name.
    pub aggregates: BTreeSet<String>,
    /// The histories with a hole or a version twice, left out of `expected`.
    pub holes: Vec<Hole>,
    /// How many events were folded.
    pub events: usize,
}

/// Folds `events` (documents as the projector sees them, any order) by aggregate under each of
/// `projections`. Fails only when a projection cannot apply one of its events.
pub fn fold<'p>(
    projections: impl IntoIterator<Item = &'p dyn Projection>,
    events: impl IntoIterator<Item = Document>,
) -> Result<Folded, ApplyError> {
    let mut by_aggregate: BTreeMap<String, Vec<Document>> = BTreeMap::new();
    let mut folded = Folded::default();
    for e in events {
        let id = e.get_str("aggregateId").unwrap_or_default().to_string();
        by_aggregate.entry(id).or_default().push(e);
        folded.events += 1;
    }
    folded.aggregates = by_aggregate.keys().cloned().collect();
    for p in projections {
        let collection = p.collection().to_string();
        let mut models = BTreeMap::new();
        for (id, history) in &by_aggregate {
            match fold_history(p, id, history) {
                Ok(m) if m.version > 0 => {
                    models.insert(id.clone(), as_expected(m.to_document(DateTime::now())));
                }
                Ok(_) => {}
                Err(HistoryError::Apply(e)) => return Err(e),
                Err(why) => folded.holes.push(Hole {
                    collection: collection.clone(),
                    id: id.clone(),
                    why,
                }),
            }
        }
        folded.expected.insert(collection, models);
    }
    Ok(folded)
}

/// A stored read model in the form [`Expected`] holds: without `lastUpdatedAt`.
pub fn as_expected(mut stored: Document) -> Document {
    stored.remove(UPDATED_AT_FIELD);
    stored
}
