//! The fold: one aggregate's events, in version order, into one read-model document.
//!
//! A worker holds a session (an exclusive lease on one aggregate), so it keeps the aggregate's
//! [`ReadModel`] in memory, folds a whole batch into it and writes once, guarded by the version
//! it read. Every message goes through [`classify`] first: the read model carries the version
//! it has applied (`lastEventId`), so redeliveries and duplicates are recognised by version
//! alone and applying any interleaving of duplicates gives the same document as applying each
//! event once (see the property test in `tests.rs`).

use mongodb::bson::{Bson, DateTime, Document};

use super::error::ApplyError;

/// Marks a tombstone: the aggregate was deleted by a `delete` rule. The document stays, with
/// `lastEventId`, so the version guard keeps working and a late duplicate of an earlier event
/// cannot resurrect the aggregate. Readers filter `{_deleted: {$ne: true}}`.
pub const DELETED_FIELD: &str = "_deleted";

/// Field holding the applied version.
pub const VERSION_FIELD: &str = "lastEventId";

/// Field holding the time of the last write.
pub const UPDATED_AT_FIELD: &str = "lastUpdatedAt";

/// Field holding the rebuild epoch of a document written by `rebuild` (absent otherwise).
/// Writers guard on it as well as on the version: a rebuilt document can hold the same version
/// as the one a worker cached before the swap, with different content, and only the epoch
/// tells them apart.
pub const EPOCH_FIELD: &str = "_epoch";

/// Fields the engine owns: a stored document's fields apart from the projection's. Rules may
/// not write them, and [`ReadModel::from_document`] takes them out.
pub const RESERVED_FIELDS: &[&str] = &[
    "_id",
    VERSION_FIELD,
    UPDATED_AT_FIELD,
    DELETED_FIELD,
    EPOCH_FIELD,
];

/// Custom projection logic; declarative rules implement it too, so both fold the same way.
pub trait Projection: Send + Sync + std::fmt::Debug {
    /// Unique name, used by `rebuild --projection` and in `ordo_blocked`.
    fn name(&self) -> &str;

    /// The collection the projection owns (one document per aggregate).
    fn collection(&self) -> &str;

    /// Whether this projection cares about the event. An event it does not select still
    /// advances the version of a document that already exists, so versions stay contiguous.
    fn selects(&self, aggregate_type: Option<&str>, event_type: &str) -> bool;

    /// Applies one event. `doc` is `None` while the aggregate has no document (never created or
    /// deleted); setting it to `None` deletes it. `event` is shaped like the source event
    /// (`Envelope::to_event_document`). An error is a poison event.
    fn apply(&self, doc: &mut Option<Document>, event: &Document) -> Result<(), ApplyError>;
}

/// Versions `from..=to` of an aggregate are missing before the event at hand: read them from
/// the events collection and apply them first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// First missing version.
    pub from: i64,
    /// Last missing version (the event's version minus one).
    pub to: i64,
}

impl std::fmt::Display for Gap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the events collection has no v{}..v{}",
            self.from, self.to
        )
    }
}

/// What the version rule says about an event of version `v` given the applied version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `v <= applied`: already applied; settle it without changes.
    Duplicate,
    /// `v == applied + 1`: apply it.
    Apply,
    /// `v > applied + 1`: the versions in between are missing.
    Gap(Gap),
}

/// The version rule.
pub fn classify(applied: i64, v: i64) -> Step {
    if v <= applied {
        Step::Duplicate
    } else if v == applied + 1 {
        Step::Apply
    } else {
        Step::Gap(Gap {
            from: applied + 1,
            to: v - 1,
        })
    }
}

/// Why a complete history does not fold into a read model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// The history has a hole.
    #[error("{0}")]
    Gap(Gap),
    /// The projection cannot apply one of its events.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// Two events hold this version. Which one is the event is not the fold's to guess, so
    /// it folds neither (the events collection's reader names both documents).
    #[error("two events hold v{0}")]
    Duplicate(i64),
}

/// One aggregate's read model in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadModel {
    /// The aggregate id (`_id` of the document).
    pub id: String,
    /// Applied version; 0 when no document exists.
    pub version: i64,
    /// The projection's fields (without `_id`, `lastEventId`, `lastUpdatedAt`, `_epoch`);
    /// `None` when the aggregate has no document or was deleted.
    pub doc: Option<Document>,
    /// The rebuild epoch the stored document carried when it was read ([`EPOCH_FIELD`]);
    /// written back unchanged, so only a rebuild moves it.
    pub epoch: Option<i64>,
}

impl ReadModel {
    /// An aggregate with no document.
    pub fn empty(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            version: 0,
            doc: None,
            epoch: None,
        }
    }

    /// Reads a stored document (or a tombstone).
    pub fn from_document(id: impl Into<String>, mut stored: Document) -> Self {
        let version = version_of(stored.get(VERSION_FIELD)).unwrap_or(0);
        // The epoch is stored as a version is: an integer a rebuild wrote.
        let epoch = version_of(stored.get(EPOCH_FIELD));
        let deleted = stored.get_bool(DELETED_FIELD).unwrap_or(false);
        for f in RESERVED_FIELDS {
            stored.remove(*f);
        }
        Self {
            id: id.into(),
            version,
            doc: (!deleted).then_some(stored),
            epoch,
        }
    }

    /// The document to store: the fields (or a tombstone when deleted) plus `_id`,
    /// `lastEventId`, `lastUpdatedAt`, and `_epoch` for a document a rebuild wrote.
    pub fn to_document(&self, now: DateTime) -> Document {
        let mut out = Document::new();
        out.insert("_id", self.id.clone());
        match &self.doc {
            Some(d) => out.extend(d.clone()),
            None => {
                out.insert(DELETED_FIELD, true);
            }
        }
        out.insert(VERSION_FIELD, self.version);
        out.insert(UPDATED_AT_FIELD, now);
        if let Some(epoch) = self.epoch {
            out.insert(EPOCH_FIELD, epoch);
        }
        out
    }

    /// The guard of a write over the stored document this model was read from: its `_id`, the
    /// version it held (`expected`) and its epoch (null matches a document without one). Plain
    /// equality, so the `_id` index serves it.
    pub fn guard(&self, expected: i64) -> Document {
        let epoch = self.epoch.map_or(Bson::Null, Bson::Int64);
        mongodb::bson::doc! { "_id": &self.id, VERSION_FIELD: expected, EPOCH_FIELD: epoch }
    }

    /// Whether the projection ignores this event entirely: it does not select it and the
    /// aggregate has no document yet. Such events leave no version behind, so an aggregate the
    /// projection never selects costs no write; when a later event is selected, its version
    /// shows a gap and the missing events are read (and applied) from the events collection.
    pub fn ignores(&self, projection: &dyn Projection, event: &Document) -> bool {
        self.version == 0 && self.doc.is_none() && !selects(projection, event)
    }

    /// Applies the event whose version must be `version + 1` (the caller ran [`classify`]).
    /// An event the projection does not select only advances the version.
    pub fn apply(
        &mut self,
        projection: &dyn Projection,
        event: &Document,
    ) -> Result<(), ApplyError> {
        let v = event_version(event);
        debug_assert_eq!(v, self.version + 1, "classify before apply");
        if selects(projection, event) {
            projection.apply(&mut self.doc, event)?;
        }
        self.version = v;
        Ok(())
    }

    /// Whether there is anything to store: any version past the stored one. An aggregate the
    /// projection selects records its progress even while no rule has created its document
    /// (a tombstone-shaped `{_id, _deleted, lastEventId}`), so later events, `status` and
    /// `repair` find the version without reading the events collection; one it never selects
    /// has no version (see [`ReadModel::ignores`]) and costs no write.
    pub fn needs_write(&self, loaded_version: i64) -> bool {
        self.version > loaded_version
    }
}

/// Whether `projection` selects `event` (a document shaped like the source event), asked by its
/// `aggregateType` and `eventType`: the one reading of an event for [`Projection::selects`].
pub fn selects(projection: &dyn Projection, event: &Document) -> bool {
    projection.selects(
        event.get_str("aggregateType").ok(),
        event.get_str("eventType").unwrap_or_default(),
    )
}

/// A version as BSON stores it: an integer of either width, or a finite double from a client
/// that writes every number as one (JavaScript), its fraction dropped; `None` when absent or
/// of another type. The one reading of a version, for events (`eventId`), read models
/// (`lastEventId`) and the rebuild epoch (`_epoch`). (An event reaches a fold through the
/// envelope, which refuses an `eventId` that is not an integer or an integral double.)
pub fn version_of(value: Option<&Bson>) -> Option<i64> {
    match value? {
        Bson::Int64(v) => Some(*v),
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Double(d) if d.is_finite() => Some(*d as i64),
        _ => None,
    }
}

/// The `eventId` of an event document ([`version_of`]), 0 when it has none, which never
/// applies.
pub fn event_version(event: &Document) -> i64 {
    version_of(event.get("eventId")).unwrap_or(0)
}

/// Folds `events` (any order, duplicates allowed) into `model` by the version rule, as if
/// every event were delivered once and in order. Stops at the first gap and returns it so the
/// caller can fetch the missing events.
pub fn fold_events<'a>(
    projection: &dyn Projection,
    model: &mut ReadModel,
    events: impl IntoIterator<Item = &'a Document>,
) -> Result<Option<Gap>, ApplyError> {
    let mut sorted: Vec<&Document> = events.into_iter().collect();
    sorted.sort_by_key(|e| event_version(e));
    for e in sorted {
        match classify(model.version, event_version(e)) {
            Step::Duplicate => {}
            _ if model.ignores(projection, e) => {}
            Step::Apply => model.apply(projection, e)?,
            Step::Gap(gap) => return Ok(Some(gap)),
        }
    }
    Ok(None)
}

/// Folds an aggregate's complete history (versions 1..=n from the events collection) from
/// scratch, as `repair` does; see [`HistoryFold`] for the rule.
pub fn fold_history<'a>(
    projection: &dyn Projection,
    id: &str,
    events: impl IntoIterator<Item = &'a Document>,
) -> Result<ReadModel, HistoryError> {
    let mut sorted: Vec<&Document> = events.into_iter().collect();
    sorted.sort_by_key(|e| event_version(e));
    let mut fold = HistoryFold::new(ReadModel::empty(id));
    for e in sorted {
        fold.push(projection, e)?;
    }
    Ok(fold.into_model())
}

/// A complete history folded one event at a time, in version order from v1: [`fold_history`]
/// over a whole history, `rebuild` over the events collection as its cursor reads it. Unlike
/// messages ([`fold_events`]), a history holds every version exactly once, so a version
/// already seen is [`HistoryError::Duplicate`], not a redelivery, and a missing one is
/// [`HistoryError::Gap`]. After an error the model stays as it was before that event.
#[derive(Debug, Clone)]
pub struct HistoryFold {
    model: ReadModel,
    /// The last version folded or ignored ([`ReadModel::ignores`]).
    seen: i64,
}

impl HistoryFold {
    /// Starts a fold from `model`, which holds no version (a rebuild sets its epoch first).
    pub fn new(model: ReadModel) -> Self {
        debug_assert_eq!(model.version, 0, "a history folds from scratch");
        Self { model, seen: 0 }
    }

    /// Folds the next event of the history.
    pub fn push(
        &mut self,
        projection: &dyn Projection,
        event: &Document,
    ) -> Result<(), HistoryError> {
        let v = event_version(event);
        match classify(self.seen, v) {
            Step::Duplicate => return Err(HistoryError::Duplicate(v)),
            Step::Gap(gap) => return Err(HistoryError::Gap(gap)),
            Step::Apply => {}
        }
        if !self.model.ignores(projection, event) {
            let mut next = self.model.clone();
            next.version = v - 1;
            next.apply(projection, event)?;
            self.model = next;
        }
        self.seen = v;
        Ok(())
    }

    /// The last version folded or ignored; 0 before the first event.
    pub fn seen(&self) -> i64 {
        self.seen
    }

    /// The read model so far.
    pub fn into_model(self) -> ReadModel {
        self.model
    }
}
