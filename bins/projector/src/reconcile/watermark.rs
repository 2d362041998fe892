//! The reconciliation watermark (`ordo_reconcile`): per events collection and set of
//! projections, the change-stream token the next incremental run resumes from, and the
//! aggregates this run could not catch up, which the next run checks again.

use std::sync::Arc;

use mongodb::bson::{doc, Document};
use mongodb::change_stream::event::ResumeToken;

use ordo_projection::Projection;

use super::{ReconcileError, Report};
use crate::Store;

/// Collection holding the reconciliation watermark, one document per events collection and
/// set of projections ([`watermark_key`]).
pub const WATERMARK_COLLECTION: &str = "ordo_reconcile";

/// The watermark's `_id`: the events collection and every projection with its collection.
/// Two sets of projections over one events collection (two pipelines side by side, or a
/// projection added) each have their own, so one set's run never makes the other's next run
/// skip aggregates it has not checked.
pub fn watermark_key(events_collection: &str, projections: &[Arc<dyn Projection>]) -> String {
    let mut set: Vec<String> = projections
        .iter()
        .map(|p| format!("{}={}", p.name(), p.collection()))
        .collect();
    set.sort();
    format!("{events_collection}:{}", set.join(","))
}

/// Aggregates kept for the next run at most; past it the next run is a full pass.
const MAX_RETRY_KEPT: usize = 10_000;

/// What the previous run left: where to resume, and what to check again.
pub(super) struct Saved {
    /// Absent before the first run, or after a run that kept too many to carry.
    pub(super) token: Option<ResumeToken>,
    /// Aggregates the previous run could not catch up.
    pub(super) retry: Vec<String>,
}

fn watermarks(store: &Store) -> mongodb::Collection<Document> {
    store
        .database()
        .collection::<Document>(WATERMARK_COLLECTION)
}

/// Reads the watermark saved under `key` (nothing saved: no token, nothing to retry).
pub(super) async fn load(store: &Store, key: &str) -> Result<Saved, ReconcileError> {
    let saved = watermarks(store).find_one(doc! { "_id": key }).await?;
    let token: Option<ResumeToken> = saved
        .as_ref()
        .and_then(|d| d.get_document("token").ok())
        .and_then(|t| mongodb::bson::from_document(t.clone()).ok());
    let retry: Vec<String> = saved
        .as_ref()
        .and_then(|d| d.get_array("retry").ok())
        .map(|a| {
            a.iter()
                .filter_map(|b| b.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok(Saved { token, retry })
}

/// Moves the watermark under `key` to `next_token`, keeping the aggregates `report` could
/// not catch up for the next run.
pub(super) async fn save(
    store: &Store,
    key: &str,
    report: &Report,
    next_token: &ResumeToken,
) -> Result<(), ReconcileError> {
    let keep: Vec<&String> = report.not_caught_up.iter().map(|(id, _)| id).collect();
    let mut set = doc! { "updatedAt": mongodb::bson::DateTime::now() };
    if keep.len() > MAX_RETRY_KEPT {
        // Too many to carry: the next run starts over with a full pass.
        set.insert("token", mongodb::bson::Bson::Null);
        set.insert("retry", Vec::<String>::new());
    } else {
        set.insert(
            "token",
            mongodb::bson::to_document(next_token).map_err(|e| {
                mongodb::error::Error::custom(format!("resume token not storable: {e}"))
            })?,
        );
        set.insert("retry", keep.into_iter().cloned().collect::<Vec<_>>());
    }
    watermarks(store)
        .update_one(doc! { "_id": key }, doc! { "$set": set })
        .upsert(true)
        .await?;
    Ok(())
}
