//! Leader election for one active producer per stream (`ordo_leases`).
//!
//! One document per stream:
//! `{_id: stream, holder, epoch, expiresAt, renewedAt, acquiredAt}`.
//!
//! - A holder takes the lease when it is free, expired, or already its own ([`LeaseStore::try_acquire`]).
//! - Every takeover (a free or expired lease changing hands, or the first acquisition) increments
//!   `epoch`. The epoch is the fencing token: checkpoint writes carry it, and a writer with an
//!   older epoch is refused (see [`crate::checkpoint`]). Re-acquiring a live lease one already
//!   holds keeps the epoch.
//! - Lease documents are never deleted: [`LeaseStore::release`] only expires the lease, so the
//!   epoch keeps growing for the lifetime of the stream. Deleting a document would restart
//!   epochs at 1 and let a stale leader pass the fence; do not do it by hand either.
//!
//! Every step is one atomic conditional write, so two contenders can never both win.
//!
//! Clocks: expiry is compared against the local clock of the process doing the write. Hosts must
//! agree on the time to well within the TTL (NTP-synchronised hosts and TTLs of seconds are
//! fine). Skew only shifts *when* a takeover happens; it cannot produce two leaders that both
//! pass the checkpoint fence, because epochs, not clocks, decide that.
//!
//! Holder ids must be unique per process incarnation (e.g. `hostname:pid:uuid`): a restarted
//! process reusing its predecessor's id would inherit the predecessor's live lease and epoch.

use std::time::Duration;

use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::ReturnDocument;
use mongodb::{Collection, Database};

use crate::mongo::{is_duplicate_key, is_transient};

/// Default collection name.
pub const DEFAULT_COLLECTION: &str = "ordo_leases";

/// Why a lease operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Someone else holds the lease now (it was taken over under a newer epoch); the caller must
    /// stop acting as leader at once.
    #[error("lease on stream {stream} lost: epoch {epoch} of {holder} is no longer current")]
    Lost {
        /// The stream.
        stream: String,
        /// The holder that lost it.
        holder: String,
        /// The epoch it held.
        epoch: i64,
    },
    /// The stored lease document does not have the expected shape.
    #[error("lease document of stream {stream} is malformed: {reason}")]
    Malformed {
        /// The stream.
        stream: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The database operation failed.
    #[error("lease store: {0}")]
    Mongo(#[from] mongodb::error::Error),
}

impl LeaseError {
    /// True for network and transient server errors; a lost lease or a malformed document is
    /// not fixed by retrying.
    pub fn is_retryable(&self) -> bool {
        match self {
            LeaseError::Mongo(e) => is_transient(e),
            LeaseError::Lost { .. } | LeaseError::Malformed { .. } => false,
        }
    }
}

/// A lease held by this process.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The stream the lease elects a producer for.
    pub stream: String,
    /// This process's holder id.
    pub holder: String,
    /// The fencing token: strictly greater than every earlier holder's.
    pub epoch: i64,
    /// When the lease lapses unless renewed.
    pub expires_at: DateTime,
    /// The TTL it was acquired or last renewed with.
    pub ttl: Duration,
}

impl Lease {
    /// Time left before expiry by the local clock; zero once expired. Leaders renew well
    /// before this reaches zero (e.g. every ttl/3) and stop publishing when it does.
    pub fn remaining(&self) -> Duration {
        let left = self.expires_at.timestamp_millis() - DateTime::now().timestamp_millis();
        Duration::from_millis(u64::try_from(left).unwrap_or(0))
    }

    /// Whether the lease has lapsed by the local clock.
    pub fn is_expired(&self) -> bool {
        self.remaining().is_zero()
    }
}

/// The lease collection.
#[derive(Debug, Clone)]
pub struct LeaseStore {
    coll: Collection<Document>,
}

impl LeaseStore {
    /// A store over `collection` (usually [`DEFAULT_COLLECTION`]) in `db`.
    pub fn new(db: &Database, collection: &str) -> Self {
        Self {
            coll: db.collection(collection),
        }
    }

    /// Takes the lease on `stream` for `holder` when it is free, expired, or already held by
    /// `holder`; `Ok(None)` when someone else holds a live lease (or won a race for it).
    pub async fn try_acquire(
        &self,
        stream: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, LeaseError> {
        let now = DateTime::now();
        let expires = after(now, ttl);

        // Already ours and live: extend it, same epoch.
        let ours = self
            .coll
            .find_one_and_update(
                doc! { "_id": stream, "holder": holder, "expiresAt": { "$gt": now } },
                doc! { "$set": { "expiresAt": expires, "renewedAt": now } },
            )
            .return_document(ReturnDocument::After)
            .await?;
        if let Some(d) = ours {
            return parse(stream, &d, ttl).map(Some);
        }

        // Free or expired (or never created): take it under the next epoch. When a live lease
        // of someone else exists the filter misses, the upsert collides on `_id`, and the
        // duplicate-key error means "not acquired". Concurrent takeovers of an expired lease
        // are serialised by the document: the loser's filter no longer matches.
        let taken = self
            .coll
            .find_one_and_update(
                doc! { "_id": stream, "expiresAt": { "$lte": now } },
                doc! {
                    "$set": {
                        "holder": holder,
                        "expiresAt": expires,
                        "renewedAt": now,
                        "acquiredAt": now,
                    },
                    "$inc": { "epoch": 1_i64 },
                },
            )
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await;
        match taken {
            Ok(Some(d)) => {
                let lease = parse(stream, &d, ttl)?;
                tracing::info!(stream, holder, epoch = lease.epoch, "lease acquired");
                Ok(Some(lease))
            }
            Ok(None) => Ok(None),
            Err(e) if is_duplicate_key(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Extends `lease` by its TTL if it is still this holder's under the same epoch. This
    /// succeeds even after local expiry as long as nobody has taken over (a takeover changes
    /// the epoch); otherwise [`LeaseError::Lost`].
    pub async fn renew(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        let now = DateTime::now();
        let renewed = self
            .coll
            .find_one_and_update(
                doc! { "_id": &lease.stream, "holder": &lease.holder, "epoch": lease.epoch },
                doc! { "$set": { "expiresAt": after(now, lease.ttl), "renewedAt": now } },
            )
            .return_document(ReturnDocument::After)
            .await?;
        match renewed {
            Some(d) => parse(&lease.stream, &d, lease.ttl),
            None => Err(LeaseError::Lost {
                stream: lease.stream.clone(),
                holder: lease.holder.clone(),
                epoch: lease.epoch,
            }),
        }
    }

    /// Gives the lease up so a standby can take it at once instead of waiting for expiry.
    /// Returns false when it was no longer ours (nothing to release). The document stays, with
    /// its epoch, so the next holder's epoch is higher.
    pub async fn release(&self, lease: &Lease) -> Result<bool, LeaseError> {
        let result = self
            .coll
            .update_one(
                doc! { "_id": &lease.stream, "holder": &lease.holder, "epoch": lease.epoch },
                doc! { "$set": { "expiresAt": DateTime::from_millis(0), "renewedAt": DateTime::now() } },
            )
            .await?;
        if result.matched_count == 1 {
            tracing::info!(stream = %lease.stream, holder = %lease.holder, epoch = lease.epoch, "lease released");
        }
        Ok(result.matched_count == 1)
    }

    /// The current lease document of `stream` as a [`Lease`] (whoever holds it, possibly
    /// expired), for status output and tests. `ttl` is reported as zero.
    pub async fn current(&self, stream: &str) -> Result<Option<Lease>, LeaseError> {
        match self.coll.find_one(doc! { "_id": stream }).await? {
            Some(d) => parse(stream, &d, Duration::ZERO).map(Some),
            None => Ok(None),
        }
    }
}

fn after(now: DateTime, ttl: Duration) -> DateTime {
    let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    DateTime::from_millis(now.timestamp_millis().saturating_add(ms))
}

fn parse(stream: &str, d: &Document, ttl: Duration) -> Result<Lease, LeaseError> {
    let malformed = |reason: String| LeaseError::Malformed {
        stream: stream.to_owned(),
        reason,
    };
    let holder = d
        .get_str("holder")
        .map_err(|e| malformed(format!("holder: {e}")))?;
    let epoch = match d.get("epoch") {
        Some(mongodb::bson::Bson::Int64(v)) => *v,
        Some(mongodb::bson::Bson::Int32(v)) => i64::from(*v),
        other => {
            return Err(malformed(format!(
                "epoch: expected an integer, found {other:?}"
            )))
        }
    };
    let expires_at = *d
        .get_datetime("expiresAt")
        .map_err(|e| malformed(format!("expiresAt: {e}")))?;
    Ok(Lease {
        stream: stream.to_owned(),
        holder: holder.to_owned(),
        epoch,
        expires_at,
        ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_is_zero_once_expired() {
        let lease = Lease {
            stream: "s".into(),
            holder: "h".into(),
            epoch: 1,
            expires_at: DateTime::from_millis(DateTime::now().timestamp_millis() - 1),
            ttl: Duration::from_secs(1),
        };
        assert!(lease.is_expired());
        let live = Lease {
            expires_at: after(DateTime::now(), Duration::from_secs(60)),
            ..lease
        };
        assert!(!live.is_expired());
        assert!(live.remaining() > Duration::from_secs(50));
    }

    #[test]
    fn parse_rejects_a_document_without_epoch() {
        let d = doc! { "_id": "s", "holder": "h", "expiresAt": DateTime::now() };
        assert!(matches!(
            parse("s", &d, Duration::ZERO),
            Err(LeaseError::Malformed { .. })
        ));
    }

    #[test]
    fn lost_is_not_retryable() {
        let e = LeaseError::Lost {
            stream: "s".into(),
            holder: "h".into(),
            epoch: 1,
        };
        assert!(!e.is_retryable());
    }
}
