//! MongoDB: read models with version-guarded writes, the events collection (gap healing,
//! repair, rebuild) and `ordo_blocked`.

use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::{
    CollectionOptions, ReadConcern, ReadPreference, ReplaceOptions, SelectionCriteria,
};
use mongodb::{Collection, Database};

use ordo_core::envelope::{DecodeError, Envelope, EventFields, InvalidEvent};
use ordo_core::mongo::{is_duplicate_key, is_transient, server_code};
use ordo_projection::fold::{event_version, VERSION_FIELD};
use ordo_projection::{Projection, ReadModel};

/// A database failure, classified once for the retry loop and the dead-letter decision.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The driver or the server failed.
    #[error("mongodb: {0}")]
    Mongo(#[from] mongodb::error::Error),
    /// A source event in the events collection breaks the contract.
    #[error("source event {source_id} of {aggregate_id} is invalid: {reason}")]
    BadEvent {
        /// The aggregate.
        aggregate_id: String,
        /// The source document's `_id`, as relaxed Extended JSON.
        source_id: String,
        /// What is wrong.
        reason: String,
    },
    /// Two source documents hold the same (aggregateId, eventId): which one is the event is
    /// not ordo's to guess.
    #[error("events {first} and {second} of {aggregate_id} both have eventId {version}")]
    DuplicateVersion {
        /// The aggregate.
        aggregate_id: String,
        /// The version both claim.
        version: i64,
        /// `_id` of the first document, as relaxed Extended JSON.
        first: String,
        /// `_id` of the second.
        second: String,
    },
}

/// Server codes that refuse a write for what the document holds: the same write fails the
/// same way however often it is retried. DocumentValidationFailure, BSONObjectTooLarge,
/// document-too-large variants, and field names the server does not store.
const REFUSAL_CODES: &[i32] = &[121, 10334, 17419, 17420, 52, 56, 57];

impl StoreError {
    /// Network errors, transient server codes and injected transient failures are retried;
    /// everything else is not.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Mongo(e) => is_transient(e),
            StoreError::BadEvent { .. } | StoreError::DuplicateVersion { .. } => false,
        }
    }

    /// Whether a read-model write was refused for its content (a validator, the 16 MB limit):
    /// a fault of the events folded into it, not of the database. The driver checks an
    /// insert's size itself and answers `InvalidArgument`; the server answers a replace.
    pub fn is_refusal(&self) -> bool {
        match self {
            StoreError::Mongo(e) => {
                matches!(
                    e.kind.as_ref(),
                    mongodb::error::ErrorKind::InvalidArgument { .. }
                ) || (!is_transient(e)
                    && server_code(e).is_some_and(|c| REFUSAL_CODES.contains(&c)))
            }
            _ => false,
        }
    }
}

fn id_text(d: &Document) -> String {
    d.get("_id")
        .map(|id| id.clone().into_relaxed_extjson().to_string())
        .unwrap_or_else(|| "(no _id)".into())
}

/// Whether a stored read model carries a numeric `lastEventId`. One that does not (left by
/// another writer) is not ordo's: it is replaced by the fold from version 1.
fn is_versioned(d: &Document) -> bool {
    matches!(
        d.get(VERSION_FIELD),
        Some(Bson::Int64(_) | Bson::Int32(_) | Bson::Double(_))
    )
}

/// What a guarded write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The document now holds the new version.
    Ok,
    /// Someone else moved the document (or created it first): reload and fold again.
    Conflict,
}

/// A blocked aggregate, as stored in `ordo_blocked`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockRecord {
    /// The aggregate.
    pub aggregate_id: String,
    /// The projection that failed (or `*` when the message could not be decoded).
    pub projection: String,
    /// The first version not applied.
    pub blocked_at_event_id: i64,
    /// Short reason (also the dead-letter reason).
    pub reason: String,
    /// What went wrong.
    pub description: String,
    /// The poison message's id.
    pub message_id: String,
}

/// Guarded attempts of [`Store::write_folded`] before it gives up.
const FOLDED_WRITE_ATTEMPTS: u32 = 10;

/// The projector's view of the database.
#[derive(Debug, Clone)]
pub struct Store {
    db: Database,
    events: Collection<Document>,
    blocked: Collection<Document>,
    fields: EventFields,
    events_collection: String,
}

impl Store {
    /// A store over `db`.
    pub fn new(db: Database, events_collection: &str, blocked: &str, fields: EventFields) -> Self {
        Self {
            events: db.collection(events_collection),
            blocked: db.collection(blocked),
            db,
            fields,
            events_collection: events_collection.to_string(),
        }
    }

    /// The database.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// A read-model collection read from the primary whatever the URI says: a load from a
    /// lagging secondary would only fail its version guard, again and again.
    fn models(&self, p: &dyn Projection) -> Collection<Document> {
        self.db.collection_with_options(
            p.collection(),
            CollectionOptions::builder()
                .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
                .build(),
        )
    }

    /// The events collection for reading an aggregate's events: primary and majority, so a
    /// replica's lag cannot turn a gap into a block, and an event later rolled back is never
    /// folded in.
    fn events_majority(&self) -> Collection<Document> {
        self.db.collection_with_options(
            &self.events_collection,
            CollectionOptions::builder()
                .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
                .read_concern(ReadConcern::majority())
                .build(),
        )
    }

    /// The read model of `id`, or an empty one (also for a document without a numeric
    /// `lastEventId`, which [`Store::write`] then replaces).
    pub async fn load(&self, p: &dyn Projection, id: &str) -> Result<ReadModel, StoreError> {
        Ok(match self.models(p).find_one(doc! { "_id": id }).await? {
            Some(d) if is_versioned(&d) => ReadModel::from_document(id, d),
            Some(_) | None => ReadModel::empty(id),
        })
    }

    /// Writes `model` if the stored version is still `expected`: an insert when nothing was
    /// stored (duplicate key: someone else created it, or a document without a version is in
    /// the way, which is replaced), otherwise a replace filtered on
    /// `{_id, lastEventId: expected, _epoch: the epoch it was read with}` (plain equality, so
    /// the `_id` index serves it; the epoch makes a model cached before a rebuild's swap fail
    /// its guard even when the rebuilt document holds the same version).
    pub async fn write(
        &self,
        p: &dyn Projection,
        model: &ReadModel,
        expected: i64,
    ) -> Result<Written, StoreError> {
        let coll = self.models(p);
        let doc = model.to_document(mongodb::bson::DateTime::now());
        if expected == 0 {
            return match coll.insert_one(doc.clone()).await {
                Ok(_) => Ok(Written::Ok),
                Err(e) if is_duplicate_key(&e) => {
                    let unversioned = doc! {
                        "_id": &model.id,
                        VERSION_FIELD: { "$not": { "$type": "number" } },
                    };
                    let r = coll.replace_one(unversioned, doc).await?;
                    Ok(if r.matched_count == 1 {
                        Written::Ok
                    } else {
                        Written::Conflict
                    })
                }
                Err(e) => Err(e.into()),
            };
        }
        let r = coll
            .replace_one(model.guard(expected), doc)
            .with_options(ReplaceOptions::builder().upsert(false).build())
            .await?;
        Ok(if r.matched_count == 1 {
            Written::Ok
        } else {
            Written::Conflict
        })
    }

    /// Writes a model folded from the full history (repair): replaces whatever is stored
    /// unless it is newer, so a running projector that moved further is not undone. Guarded
    /// like [`Store::write`] on the stored version and epoch (the epoch is kept); a failed guard
    /// means someone moved the document meanwhile: read it again and decide again.
    pub async fn write_folded(
        &self,
        collection: &str,
        model: &ReadModel,
    ) -> Result<(), StoreError> {
        let coll: Collection<Document> = self.db.collection(collection);
        for _ in 0..FOLDED_WRITE_ATTEMPTS {
            let current = coll
                .find_one(doc! { "_id": &model.id })
                .await?
                .map(|d| ReadModel::from_document(&model.id, d));
            let (stored, epoch) = current.map_or((0, None), |c| (c.version, c.epoch));
            if stored > model.version {
                return Ok(());
            }
            let mut next = model.clone();
            next.epoch = epoch;
            let doc = next.to_document(mongodb::bson::DateTime::now());
            if stored == 0 {
                match coll.insert_one(doc).await {
                    Ok(_) => return Ok(()),
                    Err(e) if is_duplicate_key(&e) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            let r = coll.replace_one(next.guard(stored), doc).await?;
            if r.matched_count == 1 {
                return Ok(());
            }
        }
        // A document that keeps moving, or one without a numeric lastEventId that no guard
        // can match: say so rather than loop.
        Err(StoreError::Mongo(mongodb::error::Error::custom(format!(
            "{collection}/{}: the stored document changed under {FOLDED_WRITE_ATTEMPTS} guarded writes in a row (or has no numeric lastEventId); not written",
            model.id
        ))))
    }

    fn to_event(&self, id: &str, d: &Document) -> Result<Document, StoreError> {
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

    /// Every event of `id`, sorted.
    pub async fn history(&self, id: &str) -> Result<Vec<Document>, StoreError> {
        self.events_between(id, 1, i64::MAX).await
    }

    /// Every event in the collection, sorted by aggregate then version, for `rebuild`.
    pub async fn all_events(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<(String, Document), StoreError>> + '_, StoreError>
    {
        let f = self.fields.clone();
        let cursor = self
            .events_majority()
            .find(doc! {})
            .sort(doc! { &f.aggregate_id: 1, &f.event_id: 1 })
            .await?;
        Ok(cursor.map_err(StoreError::from).and_then(move |d| {
            let f = f.clone();
            async move {
                let id = d.get_str(&f.aggregate_id).unwrap_or_default().to_string();
                let ev = self.to_event(&id, &d)?;
                Ok((id, ev))
            }
        }))
    }

    /// Records a blocked aggregate (idempotent: the first block wins).
    pub async fn block(&self, r: &BlockRecord) -> Result<(), StoreError> {
        let res = self
            .blocked
            .insert_one(doc! {
                "_id": &r.aggregate_id,
                "projection": &r.projection,
                "blockedAtEventId": r.blocked_at_event_id,
                "reason": &r.reason,
                "description": &r.description,
                "messageId": &r.message_id,
                "blockedAt": mongodb::bson::DateTime::now(),
            })
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if is_duplicate_key(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The version an aggregate is blocked at, if it is.
    pub async fn blocked_at(&self, id: &str) -> Result<Option<i64>, StoreError> {
        Ok(self
            .blocked
            .find_one(doc! { "_id": id })
            .await?
            .and_then(|d| d.get_i64("blockedAtEventId").ok()))
    }

    /// Removes the block of an aggregate.
    pub async fn unblock(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .blocked
            .delete_one(doc! { "_id": id })
            .await?
            .deleted_count
            > 0)
    }

    /// Number of blocked aggregates (the gauge).
    pub async fn blocked_count(&self) -> Result<u64, StoreError> {
        Ok(self.blocked.count_documents(doc! {}).await?)
    }

    /// Events `from..=to` of `id`, sorted; fewer when some are not (yet) there. Every reader
    /// of an aggregate's events goes through here (healing, repair, reconcile), so each reads
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

    /// Waits until `from..=to` of `id` are all in the events collection, reading again for at
    /// most `timeout`. `None` when they did not all appear. A database error ends the wait:
    /// the caller retries the whole batch, so an outage never passes for a missing event.
    pub async fn heal(
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
}

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
    let version = match d.get("v") {
        Some(Bson::Int64(v)) => *v,
        Some(Bson::Int32(v)) => i64::from(*v),
        Some(Bson::Double(v)) if v.is_finite() => v.floor() as i64,
        _ => 0,
    };
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

/// Reconciliation, repair and rebuild: reads over the whole events collection and the read
/// models, never on the worker's path.
impl Store {
    /// The name of the events collection.
    pub fn events_collection_name(&self) -> &str {
        &self.events_collection
    }

    /// The source event field names.
    pub fn fields(&self) -> &EventFields {
        &self.fields
    }

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

    /// The stored `lastEventId` of the read models `ids` in `collection` (absent: no document).
    pub async fn stored_versions(
        &self,
        collection: &str,
        ids: &[String],
    ) -> Result<std::collections::HashMap<String, i64>, StoreError> {
        use ordo_projection::fold::VERSION_FIELD;
        let docs: Vec<Document> = self
            .db
            .collection::<Document>(collection)
            .find(doc! { "_id": { "$in": ids } })
            .projection(doc! { VERSION_FIELD: 1 })
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .into_iter()
            .filter_map(|d| {
                let id = d.get_str("_id").ok()?.to_string();
                let v = ReadModel::from_document(&id, d).version;
                Some((id, v))
            })
            .collect())
    }

    /// Every aggregate recorded in `ordo_blocked`.
    pub async fn blocked_ids(&self) -> Result<Vec<String>, StoreError> {
        let docs: Vec<Document> = self
            .blocked
            .find(doc! {})
            .projection(doc! { "_id": 1 })
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| d.get_str("_id").ok().map(str::to_string))
            .collect())
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

    /// Every source document of the events collection, raw, sorted by aggregate then version,
    /// for `rebuild` (which checks each one itself, so one invalid event cannot end the replay).
    pub async fn raw_events(&self) -> Result<mongodb::Cursor<Document>, StoreError> {
        let f = &self.fields;
        Ok(self
            .events
            .find(doc! {})
            .sort(doc! { &f.aggregate_id: 1, &f.event_id: 1 })
            .allow_disk_use(true)
            .await?)
    }

    /// A raw source document as the event a projection folds, or why it is invalid.
    pub fn event_of(&self, id: &str, raw: &Document) -> Result<Document, StoreError> {
        self.to_event(id, raw)
    }
}
