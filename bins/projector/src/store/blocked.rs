//! `ordo_blocked`: the aggregates that wait for `repair`, one document each.

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};

use ordo_core::mongo::is_duplicate_key;

use super::{Store, StoreError};

/// The reason of a block recorded by `rebuild`.
pub const REBUILD_STOPPED: &str = "RebuildStopped";

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

impl Store {
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

    /// Removes the blocks an earlier rebuild of `projection` recorded (reason `RebuildStopped`):
    /// a rebuild that has folded those aggregates since replaces them with its own.
    pub async fn lift_rebuild_blocks(&self, projection: &str) -> Result<u64, StoreError> {
        Ok(self
            .blocked
            .delete_many(doc! { "projection": projection, "reason": REBUILD_STOPPED })
            .await?
            .deleted_count)
    }

    /// Number of blocked aggregates (the gauge).
    pub async fn blocked_count(&self) -> Result<u64, StoreError> {
        Ok(self.blocked.count_documents(doc! {}).await?)
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
}
