//! What reconciliation reads over the whole events collection: each aggregate's highest
//! version, and the aggregates with events since a change-stream position.

use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};

use ordo_projection::version_of;

use super::{Store, StoreError};

/// One aggregate as the events collection sees it: its highest version and the kinds of its
/// events, so reconciliation knows which projections must hold a document for it.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateLatest {
    /// The aggregate.
    pub id: String,
    /// The highest `eventId`.
    pub version: i64,
    /// Distinct (aggregateType, eventType) pairs of its events.
    pub kinds: Vec<(Option<String>, String)>,
}

/// Streams [`AggregateLatest`] records from the events collection.
#[derive(Debug)]
pub struct LatestCursor {
    cursor: mongodb::Cursor<Document>,
}

impl LatestCursor {
    /// The next aggregate, or `None` at the end.
    pub async fn next_latest(&mut self) -> Result<Option<AggregateLatest>, StoreError> {
        use futures::StreamExt;
        loop {
            let Some(d) = self.cursor.next().await.transpose()? else {
                return Ok(None);
            };
            if let Some(l) = latest_from(&d) {
                return Ok(Some(l));
            }
        }
    }
}

/// Reads one `$group` result; `None` for an aggregate id that is not a string (the producer
/// parks such events: no read model can exist for them).
fn latest_from(d: &Document) -> Option<AggregateLatest> {
    use mongodb::bson::Bson;
    let id = d.get_str("_id").ok()?.to_string();
    let version = version_of(d.get("v")).unwrap_or(0);
    let kinds = d
        .get_array("k")
        .map(|a| {
            a.iter()
                .filter_map(Bson::as_document)
                .map(|k| {
                    (
                        k.get_str("a").ok().map(str::to_string),
                        k.get_str("e").unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Some(AggregateLatest { id, version, kinds })
}

impl Store {
    fn latest_pipeline(&self, filter: Option<Document>) -> Vec<Document> {
        let f = &self.fields;
        let mut pipeline = Vec::new();
        let mut matched = doc! { &f.event_id: { "$type": "number" } };
        if let Some(extra) = filter {
            matched.extend(extra);
        }
        pipeline.push(doc! { "$match": matched });
        pipeline.push(doc! { "$group": {
            "_id": format!("${}", f.aggregate_id),
            "v": { "$max": format!("${}", f.event_id) },
            "k": { "$addToSet": {
                "a": format!("${}", f.aggregate_type),
                "e": format!("${}", f.event_type),
            } },
        } });
        pipeline
    }

    /// Every aggregate of the events collection with its highest version (one `$group` pass
    /// over the collection; the server may spill it to disk).
    pub async fn latest_all(&self) -> Result<LatestCursor, StoreError> {
        let cursor = self
            .events
            .aggregate(self.latest_pipeline(None))
            .allow_disk_use(true)
            .await?;
        Ok(LatestCursor { cursor })
    }

    /// The aggregates `ids` with their highest versions (absent ones are left out).
    pub async fn latest_of(&self, ids: &[String]) -> Result<Vec<AggregateLatest>, StoreError> {
        let filter = doc! { &self.fields.aggregate_id: { "$in": ids } };
        let docs: Vec<Document> = self
            .events
            .aggregate(self.latest_pipeline(Some(filter)))
            .await?
            .try_collect()
            .await?;
        Ok(docs.iter().filter_map(latest_from).collect())
    }

    /// A change-stream position on the events collection taken now: every insert after this
    /// call comes after it.
    pub async fn current_token(
        &self,
    ) -> Result<mongodb::change_stream::event::ResumeToken, StoreError> {
        let mut stream = self.events.watch().await?;
        if let Some(t) = stream.resume_token() {
            return Ok(t);
        }
        // No post-batch token on the first reply: one getMore provides it.
        let _ = stream.next_if_any().await?;
        stream.resume_token().ok_or_else(|| {
            StoreError::Mongo(mongodb::error::Error::custom(
                "the server gave no change-stream resume token",
            ))
        })
    }

    /// The aggregate ids of the events inserted after `token`, read until the stream is caught
    /// up (or `max` events), and the position after the last one read.
    pub async fn inserted_since(
        &self,
        token: mongodb::change_stream::event::ResumeToken,
        max: usize,
    ) -> Result<
        (
            std::collections::BTreeSet<String>,
            mongodb::change_stream::event::ResumeToken,
        ),
        mongodb::error::Error,
    > {
        let f = &self.fields;
        let mut stream = self
            .events
            .watch()
            .pipeline([doc! { "$match": { "operationType": "insert" } }])
            .max_await_time(Duration::from_millis(50))
            .start_after(token.clone())
            .await?;
        let mut ids = std::collections::BTreeSet::new();
        let mut read = 0;
        while read < max {
            let Some(change) = stream.next_if_any().await? else {
                break;
            };
            read += 1;
            if let Some(id) = change
                .full_document
                .as_ref()
                .and_then(|d| d.get_str(&f.aggregate_id).ok())
            {
                ids.insert(id.to_string());
            }
        }
        let next = stream.resume_token().unwrap_or(token);
        Ok((ids, next))
    }
}
