//! The replay: the events collection, in aggregate order, folded into fresh read models
//! carrying the rebuild's epoch and written into the shadow. An aggregate whose events cannot
//! be folded stops at the event before, and is reported.

use futures::TryStreamExt;
use mongodb::bson::{Bson, Document};
use mongodb::Database;

use ordo_projection::event_version;
use ordo_projection::{classify, Gap, Projection, ReadModel, Step};

use crate::Store;

/// Documents per `insert_many` into the shadow.
const WRITE_BATCH: usize = 500;

/// One aggregate's replay so far.
struct Folding {
    id: String,
    model: ReadModel,
    /// The last version seen (folded or skipped by `ignores`).
    seen: i64,
    /// The source `_id` of the event at `seen`, to name both documents of a duplicate version.
    seen_source: Bson,
    stopped: Option<(i64, String)>,
}

impl Folding {
    fn new(id: String, epoch: i64) -> Self {
        let mut model = ReadModel::empty(&id);
        model.epoch = Some(epoch);
        Self {
            id,
            model,
            seen: 0,
            seen_source: Bson::Null,
            stopped: None,
        }
    }

    fn push(&mut self, store: &Store, p: &dyn Projection, raw: &Document) {
        if self.stopped.is_some() {
            return;
        }
        let source = raw.get("_id").cloned().unwrap_or(Bson::Null);
        let event = match store.to_event(&self.id, raw) {
            Ok(e) => e,
            Err(e) => {
                let v = raw_version(store, raw).unwrap_or(self.seen + 1);
                self.stopped = Some((
                    v.max(self.seen + 1),
                    format!("source document {source}: {e}"),
                ));
                return;
            }
        };
        let v = event_version(&event);
        match classify(self.seen, v) {
            Step::Apply => {}
            Step::Duplicate => {
                self.stopped = Some((
                    v,
                    format!(
                        "two source documents hold v{v}: {} and {source}",
                        self.seen_source
                    ),
                ));
                return;
            }
            Step::Gap(gap @ Gap { from, .. }) => {
                self.stopped = Some((from, gap.to_string()));
                return;
            }
        }
        self.seen = v;
        self.seen_source = source;
        if self.model.ignores(p, &event) {
            return;
        }
        let mut next = self.model.clone();
        next.version = v - 1;
        match next.apply(p, &event) {
            Ok(()) => self.model = next,
            Err(e) => self.stopped = Some((v, e.to_string())),
        }
    }
}

fn raw_version(store: &Store, raw: &Document) -> Option<i64> {
    match raw.get(&store.fields().event_id)? {
        Bson::Int64(v) => Some(*v),
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Double(v) if v.is_finite() => Some(v.floor() as i64),
        _ => None,
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
) -> anyhow::Result<(u64, Vec<(String, i64, String)>)> {
    let shadow = db.collection::<Document>(shadow);
    let now = mongodb::bson::DateTime::now();
    let mut batch: Vec<Document> = Vec::new();
    let mut written = 0u64;
    let mut blocked = Vec::new();
    let mut current: Option<Folding> = None;
    let mut cursor = store.raw_events().await?;
    let id_field = store.fields().aggregate_id.clone();
    let mut finish = |f: Folding, batch: &mut Vec<Document>| {
        if let Some((v, why)) = f.stopped {
            blocked.push((f.id.clone(), v, why));
        }
        if f.model.version > 0 {
            batch.push(f.model.to_document(now));
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
