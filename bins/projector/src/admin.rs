//! `repair` and `rebuild`: re-project from the events collection, without the broker.

use std::sync::Arc;

use anyhow::Context as _;
use futures::TryStreamExt;
use mongodb::bson::{doc, Document};

use ordo_core::projection::{fold_history, Projection, ReadModel, Step};

use crate::Store;

fn pick<'a>(
    projections: &'a [Arc<dyn Projection>],
    name: Option<&str>,
) -> anyhow::Result<Vec<&'a Arc<dyn Projection>>> {
    let chosen: Vec<_> = projections
        .iter()
        .filter(|p| name.is_none_or(|n| p.name() == n))
        .collect();
    if chosen.is_empty() {
        anyhow::bail!(
            "no projection named {:?} (known: {})",
            name.unwrap_or_default(),
            projections
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(chosen)
}

fn folded(p: &dyn Projection, id: &str, history: &[Document]) -> anyhow::Result<ReadModel> {
    match fold_history(p, id, history) {
        Ok(Ok(model)) => Ok(model),
        Ok(Err(Step::Gap { from, to })) => anyhow::bail!(
            "aggregate {id}: the events collection has no v{from}..v{to}; cannot re-project"
        ),
        Ok(Err(_)) => unreachable!("fold_history only reports gaps"),
        Err(e) => Err(anyhow::anyhow!(e)).context(format!(
            "aggregate {id} still fails; fix the projection or the event, then repair again"
        )),
    }
}

/// Re-projects one aggregate from its full history (every selected projection, or the one
/// named), writes it (never over a newer document), and lifts its block. The session state
/// "blocked at vN" is cleared by the first worker that next accepts the session, because
/// `ordo_blocked` no longer names the aggregate.
pub async fn repair(
    store: &Store,
    projections: &[Arc<dyn Projection>],
    aggregate_id: &str,
    projection: Option<&str>,
) -> anyhow::Result<()> {
    let history = store.history(aggregate_id).await?;
    if history.is_empty() {
        anyhow::bail!("aggregate {aggregate_id} has no events in the events collection");
    }
    for p in pick(projections, projection)? {
        let model = folded(p.as_ref(), aggregate_id, &history)?;
        if model.version == 0 {
            continue;
        }
        store.write_folded(p.collection(), &model).await?;
        tracing::info!(
            aggregate = aggregate_id,
            projection = p.name(),
            version = model.version,
            "re-projected"
        );
    }
    let was_blocked = store.unblock(aggregate_id).await?;
    tracing::info!(aggregate = aggregate_id, was_blocked, "repair done");
    Ok(())
}

/// Replays the events collection into `<collection>_rebuild_<unix seconds>` and swaps it in
/// with `renameCollection … dropTarget`, while projectors keep running.
///
/// Each rebuilt document is at least as new as the events the rebuild read. Writes projectors
/// made to the old collection during the replay are dropped with it; to cover them, a
/// catch-up pass after the swap re-folds every aggregate whose events collection now holds a
/// newer version than the rebuilt document (guarded, never over a newer document). Projectors
/// holding a model in memory see their guard fail after the swap, reload and continue through
/// the version rule (healing from the events collection if the rebuilt document is older).
pub async fn rebuild(
    store: &Store,
    projections: &[Arc<dyn Projection>],
    name: &str,
) -> anyhow::Result<String> {
    let p = pick(projections, Some(name))?[0].clone();
    let db = store.database();
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let shadow = format!("{}_rebuild_{stamp}", p.collection());
    let shadow_coll = db.collection::<Document>(&shadow);
    let mut versions: std::collections::HashMap<String, i64> = Default::default();
    let mut batch: Vec<Document> = Vec::new();
    let mut current: Option<String> = None;
    let mut history: Vec<Document> = Vec::new();
    let now = mongodb::bson::DateTime::now();
    let mut flush_one =
        |id: &str, history: &[Document], batch: &mut Vec<Document>| -> anyhow::Result<()> {
            let model = folded(p.as_ref(), id, history)?;
            if model.version > 0 {
                versions.insert(id.to_string(), model.version);
                batch.push(model.to_document(now));
            }
            Ok(())
        };
    {
        let stream = store.all_events().await?;
        futures::pin_mut!(stream);
        while let Some((id, ev)) = stream.try_next().await? {
            if current.as_deref() != Some(id.as_str()) {
                if let Some(prev) = current.take() {
                    flush_one(&prev, &history, &mut batch)?;
                    history.clear();
                }
                current = Some(id.clone());
            }
            history.push(ev);
            if batch.len() >= 500 {
                shadow_coll.insert_many(std::mem::take(&mut batch)).await?;
            }
        }
        if let Some(prev) = current.take() {
            flush_one(&prev, &history, &mut batch)?;
        }
    }
    if !batch.is_empty() {
        shadow_coll.insert_many(batch).await?;
    }
    let db_name = db.name().to_string();
    db.client()
        .database("admin")
        .run_command(doc! {
            "renameCollection": format!("{db_name}.{shadow}"),
            "to": format!("{db_name}.{}", p.collection()),
            "dropTarget": true,
        })
        .await
        .context("renameCollection")?;
    tracing::info!(
        projection = name,
        aggregates = versions.len(),
        "rebuilt collection swapped in"
    );
    // Catch-up: events appended while the replay ran.
    let mut caught_up = 0;
    let stream = store.all_events().await?;
    futures::pin_mut!(stream);
    let mut latest: std::collections::HashMap<String, i64> = Default::default();
    while let Some((id, ev)) = stream.try_next().await? {
        let v = ordo_core::projection::fold::event_version(&ev);
        latest.insert(id, v);
    }
    for (id, v) in latest {
        if versions.get(&id).copied().unwrap_or(0) < v {
            let history = store.history(&id).await?;
            let model = folded(p.as_ref(), &id, &history)?;
            if model.version > 0 {
                store.write_folded(p.collection(), &model).await?;
                caught_up += 1;
            }
        }
    }
    tracing::info!(projection = name, caught_up, "catch-up after the swap done");
    Ok(p.collection().to_string())
}
