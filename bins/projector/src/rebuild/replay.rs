//! The replay: the events collection, in aggregate order, folded into fresh read models
//! carrying the rebuild's epoch and written into the shadow. An aggregate whose events cannot
//! be folded stops at the event before, and is reported.
//!
//! Each aggregate is folded by [`HistoryFold`], the fold `repair` uses too, one event at a
//! time as the cursor reads them. A duplicate version stops the aggregate, as it does
//! wherever ordo reads the events collection (`Store::events_between`).

use futures::TryStreamExt;
use mongodb::bson::{Bson, Document};
use mongodb::Database;

use ordo_projection::{event_version, version_of, HistoryError, HistoryFold};
use ordo_projection::{Projection, ReadModel};

use crate::{ProjectorError, Store};

/// Documents per `insert_many` into the shadow.
const WRITE_BATCH: usize = 500;

/// One aggregate's replay so far.
struct Folding {
    id: String,
    fold: HistoryFold,
    /// The source `_id` of the event at the fold's last version, to name both documents of a
    /// duplicate version.
    seen_source: Bson,
    stopped: Option<(i64, String)>,
}

impl Folding {
    fn new(id: String, epoch: i64) -> Self {
        let mut model = ReadModel::empty(&id);
        model.epoch = Some(epoch);
        Self {
            id,
            fold: HistoryFold::new(model),
            seen_source: Bson::Null,
            stopped: None,
        }
    }

    fn push(&mut self, store: &Store, p: &dyn Projection, raw: &Document) {
        if self.stopped.is_some() {
            return;
        }
        let source = raw.get("_id").cloned().unwrap_or(Bson::Null);
        let next = self.fold.seen() + 1;
        let event = match store.to_event(&self.id, raw) {
            Ok(e) => e,
            Err(e) => {
                let v = version_of(raw.get(&store.fields().event_id)).unwrap_or(next);
                self.stopped = Some((v.max(next), format!("source document {source}: {e}")));
                return;
            }
        };
        let v = event_version(&event);
        self.stopped = match self.fold.push(p, &event) {
            Ok(()) => {
                self.seen_source = source;
                return;
            }
            Err(HistoryError::Duplicate(v)) => Some((
                v,
                format!(
                    "two source documents hold v{v}: {} and {source}",
                    self.seen_source
                ),
            )),
            Err(HistoryError::Gap(gap)) => Some((gap.from, gap.to_string())),
            Err(e @ HistoryError::Apply(_)) => Some((v, e.to_string())),
        };
    }

    /// The aggregate's replay: its read model, and where it stopped and why, if it did.
    fn finish(self) -> (String, ReadModel, Option<(i64, String)>) {
        (self.id, self.fold.into_model(), self.stopped)
    }
}

/// Replays the events collection into `shadow`; returns the documents written and the
/// aggregates that stopped short (aggregate, first version not folded, reason).
pub(super) async fn replay(
    store: &Store,
    p: &dyn Projection,
    db: &Database,
    shadow: &str,
    epoch: i64,
) -> Result<(u64, Vec<(String, i64, String)>), ProjectorError> {
    let shadow = db.collection::<Document>(shadow);
    let now = mongodb::bson::DateTime::now();
    let mut batch: Vec<Document> = Vec::new();
    let mut written = 0u64;
    let mut blocked = Vec::new();
    let mut current: Option<Folding> = None;
    let mut cursor = store.raw_events().await?;
    let id_field = store.fields().aggregate_id.clone();
    let mut finish = |f: Folding, batch: &mut Vec<Document>| {
        let (id, model, stopped) = f.finish();
        if model.version > 0 {
            batch.push(model.to_document(now));
        }
        if let Some((v, why)) = stopped {
            blocked.push((id, v, why));
        }
    };
    while let Some(raw) = cursor.try_next().await? {
        // An aggregate id that is not a string never reaches a read model (the producer parks it).
        let Ok(id) = raw.get_str(&id_field) else {
            continue;
        };
        if current.as_ref().is_none_or(|c| c.id != id) {
            if let Some(done) = current.take() {
                finish(done, &mut batch);
            }
            current = Some(Folding::new(id.to_string(), epoch));
        }
        current.as_mut().expect("set above").push(store, p, &raw);
        if batch.len() >= WRITE_BATCH {
            written += batch.len() as u64;
            shadow.insert_many(std::mem::take(&mut batch)).await?;
        }
    }
    if let Some(done) = current.take() {
        finish(done, &mut batch);
    }
    if !batch.is_empty() {
        written += batch.len() as u64;
        shadow.insert_many(batch).await?;
    }
    Ok((written, blocked))
}
