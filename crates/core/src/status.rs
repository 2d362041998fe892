//! What an operator asks of a running deployment, read from MongoDB and Service Bus:
//! checkpoint age and producer lag per stream, who holds the producer lease, the projectors
//! alive and the sessions they hold, blocked aggregates, parked events, dead-letter depth.
//!
//! Projectors report themselves in `ordo_projectors` (one heartbeat document per process,
//! refreshed every few seconds); a heartbeat older than three intervals counts as gone.

use std::fmt;
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::Database;
use serde::Serialize;

/// Collection of projector heartbeats.
pub const PROJECTORS_COLLECTION: &str = "ordo_projectors";

/// Where the producer records the events it parked (its `park` module writes, the report
/// counts).
pub const PARKED_COLLECTION: &str = "ordo_parked";

/// How often projectors refresh their heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// A heartbeat not refreshed for this long belongs to a process that died without retiring it
/// (SIGKILL, OOM, a lost node); every live projector deletes such heartbeats when it beats, so
/// `ordo_projectors` holds at most the live processes plus those dead for less than this.
pub const HEARTBEAT_EXPIRY: Duration = Duration::from_secs(60);

/// One projector process, as it reports itself.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProjectorHeartbeat {
    /// Unique per process (`host:pid:start`).
    pub instance: String,
    /// Host name.
    pub host: String,
    /// Sessions (aggregates) held right now.
    pub sessions_held: u64,
    /// Events applied since start.
    pub applied: u64,
    /// When the process started.
    pub started_at_ms: i64,
    /// When the heartbeat was written.
    pub updated_at_ms: i64,
}

/// Writes (upserts) a projector's heartbeat and deletes the heartbeats of processes gone for
/// longer than [`HEARTBEAT_EXPIRY`]; returns how many were deleted.
pub async fn beat(db: &Database, hb: &ProjectorHeartbeat) -> mongodb::error::Result<u64> {
    let coll = db.collection::<Document>(PROJECTORS_COLLECTION);
    coll.update_one(
        doc! {"_id": &hb.instance},
        doc! {"$set": {
            "host": &hb.host,
            "sessionsHeld": hb.sessions_held as i64,
            "applied": hb.applied as i64,
            "startedAt": DateTime::from_millis(hb.started_at_ms),
            "updatedAt": DateTime::now(),
        }},
    )
    .upsert(true)
    .await?;
    let expired_before = DateTime::from_millis(
        DateTime::now().timestamp_millis() - HEARTBEAT_EXPIRY.as_millis() as i64,
    );
    Ok(coll
        .delete_many(doc! {"updatedAt": {"$lt": expired_before}})
        .await?
        .deleted_count)
}

/// Removes a projector's heartbeat at a clean shutdown.
pub async fn retire(db: &Database, instance: &str) -> mongodb::error::Result<()> {
    db.collection::<Document>(PROJECTORS_COLLECTION)
        .delete_one(doc! {"_id": instance})
        .await
        .map(|_| ())
}

/// One producer stream.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StreamStatus {
    /// Stream name.
    pub stream: String,
    /// Seconds since the checkpoint was written.
    pub checkpoint_age_s: Option<f64>,
    /// Newest event time minus the checkpoint's wall time, seconds (0 when caught up).
    pub producer_lag_s: Option<f64>,
    /// Events published according to the checkpoint.
    pub events: i64,
    /// Lease holder and seconds until its lease expires (negative: expired).
    pub lease_holder: Option<String>,
    /// Seconds until the lease expires.
    pub lease_expires_in_s: Option<f64>,
    /// Lease epoch (increments at every takeover).
    pub lease_epoch: Option<i64>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatusReport {
    /// Producer streams.
    pub streams: Vec<StreamStatus>,
    /// Projector processes with a fresh heartbeat.
    pub projectors: Vec<ProjectorHeartbeat>,
    /// Sessions held by all live projectors.
    pub sessions_held: u64,
    /// Aggregates blocked (`ordo_blocked`).
    pub blocked_aggregates: u64,
    /// Up to ten blocked aggregates: (aggregate id, reason).
    pub blocked_sample: Vec<(String, String)>,
    /// Events parked by the producer (`ordo_parked`).
    pub parked_events: u64,
    /// Dead-letter queue depth, and whether counting stopped at the cap.
    pub dead_letter_depth: Option<(usize, bool)>,
    /// Why the dead-letter depth is missing, if it is.
    pub dead_letter_error: Option<String>,
    /// The unique (aggregateId, eventId) index of the events collection.
    pub event_index: Option<String>,
}

fn age_s(now: i64, then: i64) -> f64 {
    (now - then) as f64 / 1000.0
}

/// Reads the MongoDB half of the report; `fields` name the index's keys.
pub async fn gather(
    db: &Database,
    events_collection: &str,
    fields: &crate::envelope::EventFields,
    blocked_collection: &str,
) -> mongodb::error::Result<StatusReport> {
    let event_index = crate::indexes::event_index(&db.collection(events_collection), fields)
        .await?
        .to_string();
    let now = DateTime::now().timestamp_millis();
    let streams = streams(db, events_collection, now).await?;
    let projectors = live_projectors(db, now).await?;
    let (blocked_aggregates, blocked_sample) = blocked(db, blocked_collection).await?;
    let parked_events = db
        .collection::<Document>(PARKED_COLLECTION)
        .count_documents(doc! {})
        .await?;
    Ok(StatusReport {
        streams,
        sessions_held: projectors.iter().map(|p| p.sessions_held).sum(),
        projectors,
        blocked_aggregates,
        blocked_sample,
        parked_events,
        dead_letter_depth: None,
        dead_letter_error: None,
        event_index: Some(event_index),
    })
}

/// Each stream's checkpoint, with its lease and how far it is behind the newest event.
async fn streams(
    db: &Database,
    events_collection: &str,
    now: i64,
) -> mongodb::error::Result<Vec<StreamStatus>> {
    let newest_event_ms = db
        .collection::<Document>(events_collection)
        .find_one(doc! {})
        .sort(doc! {"_id": -1})
        .await?
        .and_then(|d| match d.get("_id") {
            Some(Bson::ObjectId(oid)) => Some(oid.timestamp().timestamp_millis()),
            _ => None,
        });
    let leases: Vec<Document> = db
        .collection::<Document>(crate::lease::DEFAULT_COLLECTION)
        .find(doc! {})
        .await?
        .try_collect()
        .await?;
    let mut streams = Vec::new();
    let mut cur = db
        .collection::<Document>(crate::checkpoint::DEFAULT_COLLECTION)
        .find(doc! {})
        .await?;
    while let Some(d) = cur.try_next().await? {
        let stream = d.get_str("_id").unwrap_or_default().to_string();
        let lease = leases
            .iter()
            .find(|l| l.get_str("_id").ok() == Some(stream.as_str()));
        let wall = d
            .get_datetime("wallTime")
            .ok()
            .map(|t| t.timestamp_millis());
        streams.push(StreamStatus {
            checkpoint_age_s: d
                .get_datetime("updatedAt")
                .ok()
                .map(|t| age_s(now, t.timestamp_millis())),
            producer_lag_s: match (newest_event_ms, wall) {
                (Some(e), Some(w)) => Some(age_s(e, w).max(0.0)),
                _ => None,
            },
            events: match d.get("events") {
                Some(Bson::Int64(v)) => *v,
                Some(Bson::Int32(v)) => i64::from(*v),
                _ => 0,
            },
            lease_holder: lease
                .and_then(|l| l.get_str("holder").ok())
                .map(str::to_string),
            lease_expires_in_s: lease
                .and_then(|l| l.get_datetime("expiresAt").ok())
                .map(|t| age_s(t.timestamp_millis(), now)),
            lease_epoch: lease.and_then(|l| l.get_i64("epoch").ok()),
            stream,
        });
    }
    Ok(streams)
}

/// Projector processes whose heartbeat is fresh.
async fn live_projectors(
    db: &Database,
    now: i64,
) -> mongodb::error::Result<Vec<ProjectorHeartbeat>> {
    let fresh = DateTime::from_millis(now - 3 * HEARTBEAT_INTERVAL.as_millis() as i64);
    let millis = |d: &Document, key: &str| {
        d.get_datetime(key)
            .map(|t| t.timestamp_millis())
            .unwrap_or(0)
    };
    let mut projectors = Vec::new();
    let mut cur = db
        .collection::<Document>(PROJECTORS_COLLECTION)
        .find(doc! {"updatedAt": {"$gte": fresh}})
        .await?;
    while let Some(d) = cur.try_next().await? {
        projectors.push(ProjectorHeartbeat {
            instance: d.get_str("_id").unwrap_or_default().to_string(),
            host: d.get_str("host").unwrap_or_default().to_string(),
            sessions_held: d.get_i64("sessionsHeld").unwrap_or(0).max(0) as u64,
            applied: d.get_i64("applied").unwrap_or(0).max(0) as u64,
            started_at_ms: millis(&d, "startedAt"),
            updated_at_ms: millis(&d, "updatedAt"),
        });
    }
    Ok(projectors)
}

/// How many aggregates are blocked, and up to ten of them with their reasons.
async fn blocked(
    db: &Database,
    blocked_collection: &str,
) -> mongodb::error::Result<(u64, Vec<(String, String)>)> {
    let blocked = db.collection::<Document>(blocked_collection);
    let count = blocked.count_documents(doc! {}).await?;
    let sample = blocked
        .find(doc! {})
        .limit(10)
        .await?
        .try_collect::<Vec<Document>>()
        .await?
        .into_iter()
        .map(|d| {
            (
                d.get_str("_id").unwrap_or_default().to_string(),
                d.get_str("reason").unwrap_or_default().to_string(),
            )
        })
        .collect();
    Ok((count, sample))
}

fn secs(v: Option<f64>) -> String {
    v.map(|s| format!("{s:.1}s")).unwrap_or_else(|| "-".into())
}

impl fmt::Display for StatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "producer")?;
        if self.streams.is_empty() {
            writeln!(f, "  no checkpoint yet")?;
        }
        for s in &self.streams {
            writeln!(
                f,
                "  stream {}: checkpoint age {}, producer lag {}, {} events published, lease {} (epoch {}, expires in {})",
                s.stream,
                secs(s.checkpoint_age_s),
                secs(s.producer_lag_s),
                s.events,
                s.lease_holder.as_deref().unwrap_or("-"),
                s.lease_epoch.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
                secs(s.lease_expires_in_s),
            )?;
        }
        writeln!(
            f,
            "projectors: {} alive, {} sessions held",
            self.projectors.len(),
            self.sessions_held
        )?;
        for p in &self.projectors {
            writeln!(
                f,
                "  {} on {}: {} sessions, {} events applied",
                p.instance, p.host, p.sessions_held, p.applied
            )?;
        }
        writeln!(f, "blocked aggregates: {}", self.blocked_aggregates)?;
        for (id, reason) in &self.blocked_sample {
            writeln!(f, "  {id}: {reason}")?;
        }
        writeln!(f, "parked events: {}", self.parked_events)?;
        if let Some(index) = &self.event_index {
            writeln!(f, "events index (aggregate id, event id): {index}")?;
        }
        match (&self.dead_letter_depth, &self.dead_letter_error) {
            (Some((n, true)), _) => writeln!(f, "dead-letter queue: at least {n} messages"),
            (Some((n, false)), _) => writeln!(f, "dead-letter queue: {n} messages"),
            (None, Some(e)) => writeln!(f, "dead-letter queue: unknown ({e})"),
            (None, None) => writeln!(f, "dead-letter queue: not read"),
        }
    }
}

/// This machine's name for `status` and the producer's lease holder: `$HOSTNAME` (set by
/// Kubernetes and most shells), else the kernel's (`/proc/sys/kernel/hostname`, hidden by
/// systemd's `ProcSubset=pid`), else `/etc/hostname`, else `unknown`.
pub fn host_name() -> String {
    host_name_from(
        std::env::var("HOSTNAME").ok(),
        &["/proc/sys/kernel/hostname", "/etc/hostname"],
    )
}

fn host_name_from(env: Option<String>, files: &[&str]) -> String {
    env.into_iter()
        .chain(files.iter().filter_map(|f| std::fs::read_to_string(f).ok()))
        .map(|h| h.trim().to_string())
        .find(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_name_prefers_the_environment_then_the_first_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let named = dir.path().join("hostname");
        std::fs::write(&named, "vm-7\n").unwrap();
        let named = named.to_str().unwrap();
        let missing = dir.path().join("missing");
        let missing = missing.to_str().unwrap();
        assert_eq!(host_name_from(Some("pod-1".into()), &[named]), "pod-1");
        assert_eq!(host_name_from(Some(" ".into()), &[missing, named]), "vm-7");
        assert_eq!(host_name_from(None, &[missing]), "unknown");
    }
}
