//! An aggregate's events, read from the events collection for gap filling, repair and
//! rebuild. Every such read goes to the primary at majority read concern, so a replica's lag
//! cannot turn a gap into a block and an event later rolled back is never folded in.

use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::options::{CollectionOptions, ReadConcern, ReadPreference, SelectionCriteria};
use mongodb::Collection;

use ordo_core::envelope::{DecodeError, Envelope, InvalidEvent};
use ordo_projection::event_version;

use super::{id_text, Store, StoreError};

impl Store {
    /// The events collection for reading an aggregate's events: primary and majority, so a
    /// replica's lag cannot turn a gap into a block, and an event later rolled back is never
    /// folded in.
    pub(super) fn events_majority(&self) -> Collection<Document> {
        self.db.collection_with_options(
            &self.events_collection,
            CollectionOptions::builder()
                .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
                .read_concern(ReadConcern::majority())
                .build(),
        )
    }

    /// A raw source document as the event a projection folds, or why it is invalid.
    pub fn to_event(&self, id: &str, d: &Document) -> Result<Document, StoreError> {
        let bad = |reason: String| StoreError::BadEvent {
            aggregate_id: id.to_string(),
            source_id: id_text(d),
            reason,
        };
        Envelope::from_event(d, &self.fields, self.db.name(), &self.events_collection)
            .map_err(|e: InvalidEvent| bad(e.to_string()))?
            .to_event_document()
            .map_err(|e: DecodeError| bad(e.to_string()))
    }

    /// Events `from..=to` of `id`, sorted; fewer when some are not (yet) there. Every reader
    /// of an aggregate's events goes through here (gap filling, repair, reconcile), so each reads
    /// the primary at majority and none folds a duplicate version silently: two documents with
    /// the same version are a [`StoreError::DuplicateVersion`] naming both.
    pub async fn events_between(
        &self,
        id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<Document>, StoreError> {
        let f = &self.fields;
        let filter = doc! {
            &f.aggregate_id: id,
            &f.event_id: { "$gte": from, "$lte": to },
        };
        let found: Vec<Document> = self
            .events_majority()
            .find(filter)
            .sort(doc! { &f.event_id: 1 })
            .await?
            .try_collect()
            .await?;
        let events = found
            .iter()
            .map(|d| self.to_event(id, d))
            .collect::<Result<Vec<Document>, StoreError>>()?;
        for (i, pair) in events.windows(2).enumerate() {
            let version = event_version(&pair[0]);
            if version == event_version(&pair[1]) {
                return Err(StoreError::DuplicateVersion {
                    aggregate_id: id.to_string(),
                    version,
                    first: id_text(&found[i]),
                    second: id_text(&found[i + 1]),
                });
            }
        }
        Ok(events)
    }

    /// Every event of `id`, sorted.
    pub async fn history(&self, id: &str) -> Result<Vec<Document>, StoreError> {
        self.events_between(id, 1, i64::MAX).await
    }

    /// Waits until `from..=to` of `id` are all in the events collection, reading again for at
    /// most `timeout`. `None` when they did not all appear. A database error ends the wait:
    /// the caller retries the whole batch, so an outage never passes for a missing event.
    ///
    /// The reads again are a poll for events still in flight (a producer's insert not yet
    /// visible at majority), not a fault path: nothing failed, so nothing is counted in
    /// `ordo_retries_total` and no `ordo_core::retry::Retry` is used. The short 20 ms to 500 ms
    /// steps keep a gap that fills at once cheap, and `gap_timeout` bounds the wait.
    pub async fn wait_for_events(
        &self,
        id: &str,
        from: i64,
        to: i64,
        timeout: Duration,
    ) -> Result<Option<Vec<Document>>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut delay = Duration::from_millis(20);
        loop {
            let evs = self.events_between(id, from, to).await?;
            if evs.len() as i64 == to - from + 1 {
                return Ok(Some(evs));
            }
            if tokio::time::Instant::now() + delay > deadline {
                return Ok(None);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// Every source document of the events collection, raw, sorted by aggregate then version,
    /// for `rebuild` (which checks each one itself, so one invalid event cannot end the replay).
    pub async fn raw_events(&self) -> Result<mongodb::Cursor<Document>, StoreError> {
        let f = &self.fields;
        Ok(self
            .events_majority()
            .find(doc! {})
            .sort(doc! { &f.aggregate_id: 1, &f.event_id: 1 })
            .allow_disk_use(true)
            .await?)
    }
}
