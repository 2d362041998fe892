//! `ordo-projector rebuild --projection NAME`: replay the events collection into a shadow
//! collection and swap it in, while projectors keep running.
//!
//! - The shadow is created with the read model's collection options (validator, collation) and
//!   its indexes before any document goes in, so the swap keeps what the application relies on.
//! - Every rebuilt document carries a new rebuild epoch (`_epoch`). Writers guard on
//!   `{_id, lastEventId, _epoch}`, so a worker holding a model cached before the swap fails its
//!   guard even when the rebuilt document has the same version, reloads, and continues from the
//!   rebuilt document.
//! - An event that cannot be folded (invalid in the events collection, a duplicate version, a
//!   hole, a projection error) does not end the replay: its aggregate is rebuilt up to the
//!   event before. When any aggregate stopped, nothing is swapped in (new rules that fail on
//!   old events would otherwise replace the live read models with fewer or none): the run
//!   fails naming them, and the live collection and `ordo_blocked` are untouched. With
//!   `--allow-blocked` the shadow is swapped in anyway and those aggregates are blocked there,
//!   reason `RebuildStopped`, for `repair`; blocks of an earlier rebuild of the projection are
//!   replaced by this run's.
//! - Writes workers made to the old collection during the replay go away with it; a full
//!   reconciliation pass over this projection after the swap heals every aggregate whose events
//!   collection holds a newer version than its rebuilt document.
//! - A shadow left by a failed rebuild is dropped when the failure is seen, and any leftover
//!   `<collection>_rebuild_*` is dropped when the next rebuild of the projection starts. One
//!   rebuild per projection at a time.

use std::fmt;
use std::sync::Arc;

use anyhow::Context as _;
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::Database;

use ordo_projection::event_version;
use ordo_projection::{classify, Gap, Projection, ReadModel, Step};

use crate::reconcile;
use crate::repair::pick;
use crate::store::{BlockRecord, REBUILD_STOPPED};
use crate::Store;

/// Prefix of ordo's own collections, which no projection may own.
pub const ORDO_PREFIX: &str = "ordo_";

/// Marks a shadow collection: `<collection>_rebuild_<epoch>`.
const SHADOW_MARK: &str = "_rebuild_";

/// Documents per `insert_many` into the shadow.
const WRITE_BATCH: usize = 500;

/// Why a projection may not own `collection`, if it may not: the events collection (a rebuild
/// would drop the source of truth), ordo's own collections, and shadow names.
pub fn forbidden_target(
    collection: &str,
    events_collection: &str,
    blocked_collection: &str,
) -> Option<String> {
    if collection == events_collection {
        Some("is the events collection (mongodb.events_collection)".into())
    } else if collection.starts_with(ORDO_PREFIX) || collection == blocked_collection {
        Some("is one of ordo's own collections".into())
    } else if collection.contains(SHADOW_MARK) {
        Some(format!(
            "contains {SHADOW_MARK:?}, which marks rebuild shadows"
        ))
    } else if collection.starts_with("system.") {
        Some("is a system collection".into())
    } else {
        None
    }
}

/// Checks every projection's collection at config load.
pub fn check_projections(
    projections: &[Arc<dyn Projection>],
    events_collection: &str,
    blocked_collection: &str,
) -> anyhow::Result<()> {
    let mut names = std::collections::BTreeSet::new();
    let mut collections = std::collections::BTreeSet::new();
    for p in projections {
        if !names.insert(p.name()) {
            anyhow::bail!(
                "two projections are named {:?}; names must be unique",
                p.name()
            );
        }
        if !collections.insert(p.collection()) {
            anyhow::bail!(
                "projection {:?}: collection {:?} belongs to another projection; a projection must own a collection of its own",
                p.name(),
                p.collection()
            );
        }
        if let Some(why) = forbidden_target(p.collection(), events_collection, blocked_collection) {
            anyhow::bail!(
                "projection {:?}: collection {:?} {why}; a projection must own a collection of its own",
                p.name(),
                p.collection()
            );
        }
    }
    Ok(())
}

/// What a rebuild did.
#[derive(Debug, Clone)]
pub struct Rebuilt {
    /// The read-model collection swapped in.
    pub collection: String,
    /// The epoch every rebuilt document carries.
    pub epoch: i64,
    /// Documents written into the shadow.
    pub documents: u64,
    /// Secondary indexes copied to the shadow.
    pub indexes: usize,
    /// Aggregates blocked because an event could not be folded: (aggregate, version, reason).
    pub blocked: Vec<(String, i64, String)>,
    /// Read models the catch-up after the swap healed.
    pub caught_up: u64,
    /// Stale shadows dropped at start.
    pub stale_dropped: Vec<String>,
}

impl fmt::Display for Rebuilt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "rebuilt {} (epoch {}): {} documents, {} indexes kept, {} caught up after the swap, {} blocked",
            self.collection,
            self.epoch,
            self.documents,
            self.indexes,
            self.caught_up,
            self.blocked.len()
        )?;
        for s in &self.stale_dropped {
            writeln!(f, "  dropped stale shadow {s}")?;
        }
        for (id, v, why) in &self.blocked {
            writeln!(f, "  blocked: {id} at v{v}: {why}")?;
        }
        Ok(())
    }
}

/// Rebuilds projection `name` (see the module doc).
pub async fn rebuild(
    store: &Store,
    projections: &[Arc<dyn Projection>],
    name: &str,
    blocked_collection: &str,
    allow_blocked: bool,
) -> anyhow::Result<Rebuilt> {
    let p = pick(projections, Some(name))?[0].clone();
    let target = p.collection().to_string();
    if let Some(why) = forbidden_target(&target, store.events_collection_name(), blocked_collection)
    {
        anyhow::bail!("refusing to rebuild into {target:?}: it {why}");
    }
    let db = store.database().clone();
    let stale_dropped = drop_shadows(&db, &target).await?;
    let epoch = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000;
    let shadow = format!("{target}{SHADOW_MARK}{epoch}");
    let built = async {
        let indexes = prepare_shadow(&db, &target, &shadow).await?;
        let (documents, blocked) = replay(store, p.as_ref(), &db, &shadow, epoch).await?;
        if !blocked.is_empty() && !allow_blocked {
            anyhow::bail!(
                "{} aggregates could not be folded, so the live collection {target} is left as it \
                 is (nothing swapped in, nothing blocked). Fix the projection's rules or the \
                 events, or run again with --allow-blocked to swap in the rest and block these \
                 for `repair --all-blocked`.{}",
                blocked.len(),
                blocked
                    .iter()
                    .take(10)
                    .map(|(id, v, why)| format!("\n  {id} at v{v}: {why}"))
                    .collect::<String>()
            );
        }
        let db_name = db.name().to_string();
        db.client()
            .database("admin")
            .run_command(doc! {
                "renameCollection": format!("{db_name}.{shadow}"),
                "to": format!("{db_name}.{target}"),
                "dropTarget": true,
            })
            .await
            .context("renameCollection")?;
        anyhow::Ok((indexes, documents, blocked))
    }
    .await;
    let (indexes, documents, blocked) = match built {
        Ok(b) => b,
        Err(e) => {
            if let Err(drop) = db.collection::<Document>(&shadow).drop().await {
                tracing::warn!(shadow = %shadow, error = %drop, "could not drop the failed rebuild's shadow; the next rebuild drops it");
            }
            return Err(e.context(format!("rebuild of {name} failed; shadow {shadow} dropped")));
        }
    };
    tracing::info!(
        projection = name,
        documents,
        indexes,
        epoch,
        "rebuilt collection swapped in"
    );
    let lifted = store.lift_rebuild_blocks(p.name()).await?;
    if lifted > 0 {
        tracing::info!(
            projection = name,
            lifted,
            "blocks of an earlier rebuild lifted"
        );
    }
    for (id, v, reason) in &blocked {
        store
            .block(&BlockRecord {
                aggregate_id: id.clone(),
                projection: p.name().to_string(),
                blocked_at_event_id: *v,
                reason: REBUILD_STOPPED.into(),
                description: reason.clone(),
                message_id: String::new(),
            })
            .await?;
        tracing::error!(aggregate = %id, blocked_at = v, reason = %reason, "rebuild blocked an aggregate");
    }
    let catch_up = reconcile::full_pass(store, std::slice::from_ref(&p)).await?;
    tracing::info!(
        projection = name,
        caught_up = catch_up.healed,
        "catch-up after the swap done"
    );
    Ok(Rebuilt {
        collection: target,
        epoch,
        documents,
        indexes,
        blocked,
        caught_up: catch_up.healed,
        stale_dropped,
    })
}

/// Drops every `<target>_rebuild_*` collection (left by a rebuild that died).
async fn drop_shadows(db: &Database, target: &str) -> anyhow::Result<Vec<String>> {
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
async fn prepare_shadow(db: &Database, target: &str, shadow: &str) -> anyhow::Result<usize> {
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
        .with_context(|| format!("creating the shadow {shadow}"))?;
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
            .with_context(|| format!("copying the indexes of {target} to {shadow}"))?;
    }
    Ok(n)
}

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
        let event = match store.event_of(&self.id, raw) {
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
async fn replay(
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
