//! The shadow collection a rebuild replays into: leftovers dropped, a new one created with the
//! target's options and indexes, and the swap that puts it in the target's place.

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::Database;

use super::SHADOW_MARK;
use crate::ProjectorError;

/// A failed `step` on the shadow.
fn shadow_step(step: String) -> impl FnOnce(mongodb::error::Error) -> ProjectorError {
    move |source| ProjectorError::Shadow { step, source }
}

/// Drops every `<target>_rebuild_*` collection (left by a rebuild that died).
pub(super) async fn drop_shadows(
    db: &Database,
    target: &str,
) -> Result<Vec<String>, ProjectorError> {
    let prefix = format!("{target}{SHADOW_MARK}");
    let mut dropped = Vec::new();
    for n in db.list_collection_names().await? {
        if n.starts_with(&prefix) {
            db.collection::<Document>(&n).drop().await?;
            tracing::warn!(shadow = %n, "dropped a stale rebuild shadow");
            dropped.push(n);
        }
    }
    Ok(dropped)
}

/// Creates the shadow with the target's options and secondary indexes; returns how many
/// indexes were copied.
pub(super) async fn prepare_shadow(
    db: &Database,
    target: &str,
    shadow: &str,
) -> Result<usize, ProjectorError> {
    let info: Vec<Document> = db
        .run_cursor_command(doc! { "listCollections": 1, "filter": { "name": target } })
        .await?
        .try_collect()
        .await?;
    let mut create = doc! { "create": shadow };
    if let Some(options) = info.first().and_then(|i| i.get_document("options").ok()) {
        for key in [
            "validator",
            "validationLevel",
            "validationAction",
            "collation",
        ] {
            if let Some(v) = options.get(key) {
                create.insert(key, v.clone());
            }
        }
    }
    db.run_command(create)
        .await
        .map_err(shadow_step(format!("creating the shadow {shadow}")))?;
    if info.is_empty() {
        return Ok(0);
    }
    let specs: Vec<Document> = db
        .run_cursor_command(doc! { "listIndexes": target })
        .await?
        .try_collect()
        .await?;
    let specs: Vec<Bson> = specs
        .into_iter()
        .filter(|s| s.get_str("name").ok() != Some("_id_"))
        .map(|mut s| {
            s.remove("v");
            s.remove("ns");
            Bson::Document(s)
        })
        .collect();
    let n = specs.len();
    if n > 0 {
        db.run_command(doc! { "createIndexes": shadow, "indexes": specs })
            .await
            .map_err(shadow_step(format!(
                "copying the indexes of {target} to {shadow}"
            )))?;
    }
    Ok(n)
}

/// Puts `shadow` in `target`'s place (`renameCollection` with `dropTarget`), atomically for
/// readers of `target`.
pub(super) async fn swap_in(
    db: &Database,
    shadow: &str,
    target: &str,
) -> Result<(), ProjectorError> {
    let db_name = db.name().to_string();
    db.client()
        .database("admin")
        .run_command(doc! {
            "renameCollection": format!("{db_name}.{shadow}"),
            "to": format!("{db_name}.{target}"),
            "dropTarget": true,
        })
        .await
        .map_err(shadow_step("renameCollection".to_string()))?;
    Ok(())
}
