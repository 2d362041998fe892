//! The check that matters in the end: every read model equals the fold of the events
//! collection (through the wire envelope, as the projector sees them), and the measures read
//! off the read models (how many caught up, end-to-end latencies, blocked aggregates).

use std::collections::BTreeMap;

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use ordo_core::envelope::{Envelope, EventFields};
use ordo_projection::event_version;
use ordo_projection::{Projection, ReadModel};
use ordo_testkit::oracle;

use super::Stack;

/// The outcome of [`Stack::verify`].
#[derive(Debug, Default)]
pub struct Verdict {
    /// Aggregates checked.
    pub aggregates: usize,
    /// Events folded.
    pub events: usize,
    /// Aggregates whose read model differs from the fold, with a description.
    pub mismatches: Vec<String>,
}

impl Verdict {
    /// True when every read model equals the fold.
    pub fn ok(&self) -> bool {
        self.mismatches.is_empty()
    }
}

impl Stack {
    /// Number of aggregates whose read model has reached the last version in the events
    /// collection, out of all aggregates.
    pub async fn caught_up(&self) -> anyhow::Result<(usize, usize)> {
        let db = self.db();
        let mut latest: BTreeMap<String, i64> = BTreeMap::new();
        let mut cur = db
            .collection::<Document>("events")
            .aggregate(vec![
                doc! {"$group": {"_id": "$aggregateId", "v": {"$max": "$eventId"}}},
            ])
            .await?;
        while let Some(d) = cur.try_next().await? {
            if let (Ok(id), Some(v)) = (d.get_str("_id"), d.get("v")) {
                latest.insert(
                    id.to_string(),
                    ordo_projection::event_version(&doc! {"eventId": v.clone()}),
                );
            }
        }
        let mut done = 0;
        for p in self.projections()? {
            let mut cur = db
                .collection::<Document>(p.collection())
                .find(doc! {})
                .projection(doc! {"lastEventId": 1})
                .await?;
            while let Some(d) = cur.try_next().await? {
                let id = d.get_str("_id").unwrap_or_default();
                let v = ReadModel::from_document(id, d.clone()).version;
                if latest.get(id) == Some(&v) {
                    done += 1;
                }
            }
        }
        Ok((done, latest.len()))
    }

    /// Folds every aggregate's events (through the wire envelope, exactly as the projector sees
    /// them) and compares with the stored read models.
    pub async fn verify(&self) -> anyhow::Result<Verdict> {
        let db = self.db();
        let fields = EventFields::default();
        let mut events = Vec::new();
        let mut cur = db
            .collection::<Document>("events")
            .find(doc! {})
            .sort(doc! {"aggregateId": 1, "eventId": 1})
            .await?;
        while let Some(raw) = cur.try_next().await? {
            let env = Envelope::from_event(&raw, &fields, self.mongo.db_name(), "events")?;
            events.push(env.to_event_document()?);
        }
        let projections = self.projections()?;
        let folded = oracle::fold(projections.iter().map(|p| p as &dyn Projection), events)?;
        let mut verdict = Verdict {
            events: folded.events,
            ..Verdict::default()
        };
        for p in &projections {
            let coll = db.collection::<Document>(p.collection());
            let want = &folded.expected[p.collection()];
            for id in &folded.aggregates {
                if let Some(hole) = folded
                    .holes
                    .iter()
                    .find(|h| h.collection == p.collection() && &h.id == id)
                {
                    verdict.mismatches.push(hole.to_string());
                    continue;
                }
                let expected = match want.get(id) {
                    Some(d) => ReadModel::from_document(id.clone(), d.clone()),
                    None => ReadModel::empty(id.clone()),
                };
                let stored = coll.find_one(doc! {"_id": id}).await?;
                let actual = stored.map(|d| ReadModel::from_document(id.clone(), d));
                let matches = match &actual {
                    None => expected.doc.is_none() && expected.version == 0,
                    // The rebuild epoch says who wrote the document, not what it holds.
                    Some(a) => a.version == expected.version && a.doc == expected.doc,
                };
                if expected.doc.is_some() || expected.version > 0 {
                    verdict.aggregates += 1;
                }
                if !matches {
                    verdict.mismatches.push(format!(
                        "{}/{id}: stored {:?} != fold {:?}",
                        p.name(),
                        actual,
                        expected
                    ));
                }
            }
        }
        Ok(verdict)
    }

    /// For every read model: its `lastUpdatedAt` minus the insert time of the event it last
    /// applied, in seconds — the end-to-end latency of each aggregate's newest event.
    pub async fn final_latencies(&self) -> anyhow::Result<Vec<f64>> {
        let db = self.db();
        let mut inserted: BTreeMap<(String, i64), i64> = BTreeMap::new();
        let mut cur = db.collection::<Document>("events").find(doc! {}).await?;
        while let Some(e) = cur.try_next().await? {
            if let (Ok(id), Ok(t)) = (e.get_str("aggregateId"), e.get_datetime("timestamp")) {
                inserted.insert((id.to_string(), event_version(&e)), t.timestamp_millis());
            }
        }
        let mut out = Vec::new();
        for p in self.projections()? {
            let mut cur = db
                .collection::<Document>(p.collection())
                .find(doc! {})
                .await?;
            while let Some(d) = cur.try_next().await? {
                let id = d.get_str("_id").unwrap_or_default().to_string();
                let v = ReadModel::from_document(id.clone(), d.clone()).version;
                if let (Some(t), Ok(at)) = (inserted.get(&(id, v)), d.get_datetime("lastUpdatedAt"))
                {
                    out.push((at.timestamp_millis() - t).max(0) as f64 / 1000.0);
                }
            }
        }
        Ok(out)
    }

    /// Aggregates recorded in `ordo_blocked`.
    pub async fn blocked(&self) -> anyhow::Result<u64> {
        Ok(self
            .db()
            .collection::<Document>("ordo_blocked")
            .count_documents(doc! {})
            .await?)
    }
}
