//! The read models as stored, and what they must be: the fold of the events collection with
//! the same projections.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use ordo_core::envelope::{Envelope, EventFields};
use ordo_projection::Projection;
use ordo_testkit::oracle;

use super::{projections, Env, Expected};

impl Env {
    /// Read models of a projection's collection, by id, without `lastUpdatedAt`.
    pub async fn read_models(&self, collection: &str) -> BTreeMap<String, Document> {
        let models = raw_models(self, collection).await;
        models
            .into_iter()
            .map(|(id, d)| (id, oracle::as_expected(d)))
            .collect()
    }

    /// What every read model must be: the fold of the events collection.
    pub async fn expected(&self) -> Expected {
        self.fold(&projections(), &[]).await
    }

    /// The fold of the events collection under `projections`, without the aggregates in `skip`
    /// (whose events need not be valid).
    pub async fn fold(&self, projections: &[Arc<dyn Projection>], skip: &[&str]) -> Expected {
        let all: Vec<Document> = self
            .events()
            .find(doc! {})
            .sort(doc! { "aggregateId": 1, "eventId": 1 })
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let events = all
            .iter()
            .filter(|d| !skip.contains(&d.get_str("aggregateId").unwrap()))
            .map(as_projected);
        expected_of(projections, events)
    }

    /// True when every collection equals its expected fold.
    pub async fn converged(&self, expected: &Expected) -> bool {
        for (coll, models) in expected {
            if &self.read_models(coll).await != models {
                return false;
            }
        }
        true
    }

    /// A short diff for failure messages.
    pub async fn diff(&self, expected: &Expected) -> String {
        let mut out = String::new();
        for (coll, models) in expected {
            let actual = self.read_models(coll).await;
            let wrong: Vec<_> = models
                .iter()
                .filter(|(id, d)| actual.get(*id) != Some(*d))
                .take(3)
                .map(|(id, d)| format!("{coll}/{id}: expected {d}, got {:?}", actual.get(id)))
                .collect();
            out.push_str(&format!(
                "{coll}: {} expected, {} present, {} wrong: {wrong:?}\n",
                models.len(),
                actual.len(),
                models
                    .iter()
                    .filter(|(id, d)| actual.get(*id) != Some(*d))
                    .count()
            ));
        }
        out
    }
}

/// A stored event as the projector sees it: through the wire envelope.
pub fn as_projected(event: &Document) -> Document {
    Envelope::from_event(event, &EventFields::default(), "db", "events")
        .unwrap()
        .to_event_document()
        .unwrap()
}

/// The read models `events` (as the projector sees them) lead to under `projections`; every
/// history must be whole.
pub fn expected_of(
    projections: &[Arc<dyn Projection>],
    events: impl IntoIterator<Item = Document>,
) -> Expected {
    let folded = oracle::fold(projections.iter().map(|p| p.as_ref()), events).unwrap();
    assert!(folded.holes.is_empty(), "{:?}", folded.holes);
    folded.expected
}

/// Read models of a projection's collection, by id, exactly as stored.
pub async fn raw_models(env: &Env, collection: &str) -> BTreeMap<String, Document> {
    let models = env.mongo.database().collection::<Document>(collection);
    all_documents(&models)
        .await
        .into_iter()
        .map(|d| (d.get_str("_id").unwrap().to_string(), d))
        .collect()
}

/// Every document of `collection`.
pub async fn all_documents(collection: &mongodb::Collection<Document>) -> Vec<Document> {
    collection
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}
