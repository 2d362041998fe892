//! The producer's resume position per stream (`ordo_checkpoints`), fenced by the lease epoch.
//!
//! One document per stream:
//! `{_id: stream, resumeToken, clusterTime, wallTime, events, epoch, updatedAt}`.
//!
//! Rules, each enforced by a single atomic conditional write:
//!
//! - **Fencing.** A save carries the writer's lease epoch ([`crate::lease::Lease::epoch`]) and the
//!   document remembers it. A save with an epoch lower than the stored one is refused with
//!   [`CheckpointError::Fenced`], so a deposed leader can never overwrite its successor's
//!   position. A new leader calls [`CheckpointStore::claim`] right after acquiring the lease so
//!   the predecessor is fenced before the successor's first save, not only after it.
//! - **Monotonic within an epoch.** Under the same epoch a checkpoint's `clusterTime` never moves
//!   backwards: such a save is refused with [`CheckpointError::Backwards`] (it would mean acks
//!   were accounted out of order, and resuming from it would re-publish). A save without a
//!   cluster time, or over a stored checkpoint without one, is not ordered and is accepted. A new
//!   epoch may start anywhere (the new leader decides where to resume). To rewind a stream on
//!   purpose, an operator deletes its checkpoint document (docs/operations.md).
//! - `events` is informational (a running count of published events) and not checked.

use mongodb::bson::{doc, Bson, DateTime, Document, Timestamp};
use mongodb::{Collection, Database};

use crate::mongo::{is_duplicate_key, is_transient};

/// Default collection name.
pub const DEFAULT_COLLECTION: &str = "ordo_checkpoints";

/// Why a checkpoint operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A writer with a newer lease epoch owns this checkpoint; the caller is no longer leader and
    /// must stop publishing.
    #[error("checkpoint of stream {stream} is fenced: epoch {epoch} is older than the stored epoch {current}")]
    Fenced {
        /// The stream.
        stream: String,
        /// The epoch the refused save carried.
        epoch: i64,
        /// The epoch stored with the checkpoint.
        current: i64,
    },
    /// The save would move the checkpoint behind the one stored under the same epoch.
    #[error("checkpoint of stream {stream} would move backwards under epoch {epoch}: stored cluster time {stored:?}, attempted {attempted:?}")]
    Backwards {
        /// The stream.
        stream: String,
        /// The epoch of both writes.
        epoch: i64,
        /// The stored cluster time.
        stored: Timestamp,
        /// The cluster time of the refused save.
        attempted: Timestamp,
    },
    /// The stored checkpoint document does not have the expected shape.
    #[error("checkpoint document of stream {stream} is malformed: {reason}")]
    Malformed {
        /// The stream.
        stream: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The database operation failed.
    #[error("checkpoint store: {0}")]
    Mongo(#[from] mongodb::error::Error),
}

impl CheckpointError {
    /// True for network and transient server errors. Fenced and backwards saves are decisions,
    /// not faults, and retrying them cannot succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            CheckpointError::Mongo(e) => is_transient(e),
            CheckpointError::Fenced { .. }
            | CheckpointError::Backwards { .. }
            | CheckpointError::Malformed { .. } => false,
        }
    }
}

/// A stream's resume position.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The stream (one per watched events collection).
    pub stream: String,
    /// The change stream resume token (`{_data: ...}`) to `startAfter`.
    pub resume_token: Option<Document>,
    /// Cluster time of the last event covered, used for ordering and `startAtOperationTime`.
    pub cluster_time: Option<Timestamp>,
    /// Wall time of the last event covered; the lost-history recovery starts a margin before it.
    pub wall_time: Option<DateTime>,
    /// Events published so far (informational).
    pub events: u64,
    /// When the checkpoint was written. Filled in by [`CheckpointStore::load`]; saves write the
    /// current time instead.
    pub updated_at: DateTime,
    /// Lease epoch of the writer. Filled in by [`CheckpointStore::load`]; saves write their
    /// `fence_epoch` instead.
    pub epoch: i64,
}

impl Checkpoint {
    /// A checkpoint of `stream` with no position yet.
    pub fn new(stream: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            resume_token: None,
            cluster_time: None,
            wall_time: None,
            events: 0,
            updated_at: DateTime::now(),
            epoch: 0,
        }
    }

    /// Whether it records where to resume (a token or a cluster time).
    pub fn has_position(&self) -> bool {
        self.resume_token.is_some() || self.cluster_time.is_some()
    }
}

/// The checkpoint collection.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    coll: Collection<Document>,
}

impl CheckpointStore {
    /// A store over `collection` (usually [`DEFAULT_COLLECTION`]) in `db`.
    pub fn new(db: &Database, collection: &str) -> Self {
        Self {
            coll: db.collection(collection),
        }
    }

    /// The stream's checkpoint, or `None` if it has no position yet (never saved, or only
    /// claimed): the producer then applies its start mode.
    pub async fn load(&self, stream: &str) -> Result<Option<Checkpoint>, CheckpointError> {
        match self.coll.find_one(doc! { "_id": stream }).await? {
            Some(d) => {
                let cp = parse(stream, &d)?;
                Ok(cp.has_position().then_some(cp))
            }
            None => Ok(None),
        }
    }

    /// Writes `checkpoint` under lease epoch `fence_epoch`, subject to the fencing and ordering
    /// rules in the module documentation.
    pub async fn save(
        &self,
        checkpoint: &Checkpoint,
        fence_epoch: i64,
    ) -> Result<(), CheckpointError> {
        self.write(checkpoint, fence_epoch).await
    }

    /// Raises the stored epoch to `fence_epoch` without touching the position, fencing every
    /// older writer from now on. A new leader calls this right after acquiring the lease.
    /// Fails with [`CheckpointError::Fenced`] if an even newer epoch is already stored.
    pub async fn claim(&self, stream: &str, fence_epoch: i64) -> Result<(), CheckpointError> {
        let filter = doc! { "_id": stream, "epoch": { "$lte": fence_epoch } };
        let update = doc! { "$set": { "epoch": fence_epoch, "updatedAt": DateTime::now() } };
        if self
            .upsert(filter, update, stream, fence_epoch, None)
            .await?
        {
            return Ok(());
        }
        Err(self
            .refused(stream, fence_epoch, None)
            .await
            .err()
            .unwrap_or_else(|| CheckpointError::Malformed {
                stream: stream.to_owned(),
                reason: "claim kept colliding with concurrent writers".to_owned(),
            }))
    }

    async fn write(&self, cp: &Checkpoint, epoch: i64) -> Result<(), CheckpointError> {
        let stream = cp.stream.as_str();
        // Plain `{_id, epoch: {$lte}}` for a checkpoint without a cluster time; otherwise the
        // same epoch must not be ahead of us. A miss makes the upsert collide on `_id` (duplicate
        // key), and `refused` tells which rule refused it.
        let filter = match cp.cluster_time {
            Some(ct) => doc! {
                "_id": stream,
                "$or": [
                    { "epoch": { "$lt": epoch } },
                    { "epoch": epoch, "clusterTime": { "$lte": ct } },
                    { "epoch": epoch, "clusterTime": null },
                ],
            },
            None => doc! { "_id": stream, "epoch": { "$lte": epoch } },
        };
        let update = doc! {
            "$set": {
                "resumeToken": cp.resume_token.clone().map_or(Bson::Null, Bson::Document),
                "clusterTime": cp.cluster_time.map_or(Bson::Null, Bson::Timestamp),
                "wallTime": cp.wall_time.map_or(Bson::Null, Bson::DateTime),
                "events": i64::try_from(cp.events).unwrap_or(i64::MAX),
                "epoch": epoch,
                "updatedAt": DateTime::now(),
            }
        };
        if self
            .upsert(filter, update, stream, epoch, cp.cluster_time)
            .await?
        {
            return Ok(());
        }
        Err(CheckpointError::Malformed {
            stream: stream.to_owned(),
            reason: "save kept colliding with concurrent writers".to_owned(),
        })
    }

    /// Upserts `update` where `filter` matches, at most three times. A miss collides on `_id`
    /// (duplicate key): [`Self::refused`] then says `Fenced` or `Backwards`, or nothing when a
    /// concurrent first insert beat ours, and the upsert is tried again. `Ok(false)` when every
    /// try collided that way.
    async fn upsert(
        &self,
        filter: Document,
        update: Document,
        stream: &str,
        epoch: i64,
        attempted: Option<Timestamp>,
    ) -> Result<bool, CheckpointError> {
        for _ in 0..3 {
            match self
                .coll
                .update_one(filter.clone(), update.clone())
                .upsert(true)
                .await
            {
                Ok(_) => return Ok(true),
                Err(e) if is_duplicate_key(&e) => self.refused(stream, epoch, attempted).await?,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(false)
    }

    /// Explains a refused conditional write from the stored document: `Err(Fenced)` or
    /// `Err(Backwards)`, or `Ok(())` when neither applies any more (a concurrent insert raced
    /// ours; the caller retries).
    async fn refused(
        &self,
        stream: &str,
        epoch: i64,
        attempted: Option<Timestamp>,
    ) -> Result<(), CheckpointError> {
        let Some(d) = self.coll.find_one(doc! { "_id": stream }).await? else {
            return Ok(());
        };
        let stored = parse(stream, &d)?;
        if stored.epoch > epoch {
            return Err(CheckpointError::Fenced {
                stream: stream.to_owned(),
                epoch,
                current: stored.epoch,
            });
        }
        if let (Some(stored_ct), Some(attempted)) = (stored.cluster_time, attempted) {
            if stored.epoch == epoch && stored_ct > attempted {
                return Err(CheckpointError::Backwards {
                    stream: stream.to_owned(),
                    epoch,
                    stored: stored_ct,
                    attempted,
                });
            }
        }
        Ok(())
    }
}

fn parse(stream: &str, d: &Document) -> Result<Checkpoint, CheckpointError> {
    let malformed = |field: &str, found: &Bson| CheckpointError::Malformed {
        stream: stream.to_owned(),
        reason: format!("{field}: unexpected {found:?}"),
    };
    let resume_token = match d.get("resumeToken") {
        None | Some(Bson::Null) => None,
        Some(Bson::Document(t)) => Some(t.clone()),
        Some(other) => return Err(malformed("resumeToken", other)),
    };
    let cluster_time = match d.get("clusterTime") {
        None | Some(Bson::Null) => None,
        Some(Bson::Timestamp(t)) => Some(*t),
        Some(other) => return Err(malformed("clusterTime", other)),
    };
    let wall_time = match d.get("wallTime") {
        None | Some(Bson::Null) => None,
        Some(Bson::DateTime(t)) => Some(*t),
        Some(other) => return Err(malformed("wallTime", other)),
    };
    let events = match d.get("events") {
        None | Some(Bson::Null) => 0,
        Some(Bson::Int64(v)) => u64::try_from(*v).unwrap_or(0),
        Some(Bson::Int32(v)) => u64::try_from(*v).unwrap_or(0),
        Some(other) => return Err(malformed("events", other)),
    };
    let epoch = match d.get("epoch") {
        None | Some(Bson::Null) => 0,
        Some(Bson::Int64(v)) => *v,
        Some(Bson::Int32(v)) => i64::from(*v),
        Some(other) => return Err(malformed("epoch", other)),
    };
    let updated_at = match d.get("updatedAt") {
        Some(Bson::DateTime(t)) => *t,
        None | Some(Bson::Null) => DateTime::from_millis(0),
        Some(other) => return Err(malformed("updatedAt", other)),
    };
    Ok(Checkpoint {
        stream: stream.to_owned(),
        resume_token,
        cluster_time,
        wall_time,
        events,
        updated_at,
        epoch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_every_field() {
        let d = doc! {
            "_id": "s",
            "resumeToken": { "_data": "82" },
            "clusterTime": Timestamp { time: 5, increment: 2 },
            "wallTime": DateTime::from_millis(1000),
            "events": 7_i64,
            "epoch": 3_i64,
            "updatedAt": DateTime::from_millis(2000),
        };
        let cp = parse("s", &d).unwrap();
        assert_eq!(cp.resume_token, Some(doc! { "_data": "82" }));
        assert_eq!(
            cp.cluster_time,
            Some(Timestamp {
                time: 5,
                increment: 2
            })
        );
        assert_eq!(cp.wall_time, Some(DateTime::from_millis(1000)));
        assert_eq!((cp.events, cp.epoch), (7, 3));
        assert!(cp.has_position());
    }

    #[test]
    fn a_claimed_document_has_no_position() {
        let cp = parse("s", &doc! { "_id": "s", "epoch": 2_i64 }).unwrap();
        assert!(!cp.has_position());
        assert_eq!(cp.epoch, 2);
    }

    #[test]
    fn parse_rejects_wrong_types() {
        let d = doc! { "_id": "s", "clusterTime": "yesterday" };
        assert!(matches!(
            parse("s", &d),
            Err(CheckpointError::Malformed { .. })
        ));
    }

    #[test]
    fn only_database_faults_are_retryable() {
        let fenced = CheckpointError::Fenced {
            stream: "s".into(),
            epoch: 1,
            current: 2,
        };
        assert!(!fenced.is_retryable());
    }
}
