//! Read models: loaded from the primary, written under a version (and epoch) guard.

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::options::{CollectionOptions, ReadPreference, ReplaceOptions, SelectionCriteria};
use mongodb::Collection;

use ordo_core::mongo::is_duplicate_key;
use ordo_projection::{version_of, Projection, ReadModel, VERSION_FIELD};

use super::{Store, StoreError};

/// Whether a stored read model carries a numeric `lastEventId`. One that does not (left by
/// another writer) is not ordo's: it is replaced by the fold from version 1.
fn is_versioned(d: &Document) -> bool {
    version_of(d.get(VERSION_FIELD)).is_some()
}

/// What a guarded write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The document now holds the new version.
    Ok,
    /// Someone else moved the document (or created it first): reload and fold again.
    Conflict,
}

/// Guarded attempts of [`Store::write_folded`] before it gives up.
const FOLDED_WRITE_ATTEMPTS: u32 = 10;

impl Store {
    /// A read-model collection read from the primary whatever the URI says: a load from a
    /// lagging secondary would only fail its version guard, again and again.
    pub(super) fn models(&self, p: &dyn Projection) -> Collection<Document> {
        self.models_in(p.collection())
    }

    /// [`Store::models`] by collection name.
    fn models_in(&self, collection: &str) -> Collection<Document> {
        self.db.collection_with_options(
            collection,
            CollectionOptions::builder()
                .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
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
        let coll = self.models_in(collection);
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

    /// The stored `lastEventId` of the read models `ids` in `collection` (absent: no document).
    pub async fn stored_versions(
        &self,
        collection: &str,
        ids: &[String],
    ) -> Result<std::collections::HashMap<String, i64>, StoreError> {
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
}
