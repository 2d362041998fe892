//! `ordo_parked`: events that cannot be published, each recorded once with its reason, so the
//! stream moves on and an operator can find, fix and re-insert them.
//!
//! A record is keyed by `{stream, id}` (the source document's `_id`): parking the same event
//! again after a restart is a no-op, and two streams whose events share an `_id` do not collide.
//!
//! Writing a record is retried while the database fails transiently (readiness is off
//! meanwhile). A permanent refusal is not retried: the record is written once more without the
//! source document (a document near 16 MB plus the record's own fields exceeds the BSON limit),
//! and if that is refused too the caller stops the producer with the error, rather than loop.

use std::sync::Arc;

use futures::future::BoxFuture;
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::{Collection, Database};
use ordo_core::envelope::{Envelope, WireMessage};
use ordo_core::metrics as names;
use ordo_core::retry::{Backoff, Retry};
use tokio_util::sync::CancellationToken;

use ordo_core::readiness::{dependency, Readiness};

pub use ordo_core::status::PARKED_COLLECTION;

/// Parking could not record an event for good.
#[derive(Debug, thiserror::Error)]
#[error("cannot record event {id} of stream {stream} in ordo_parked ({reason}): {error}")]
pub struct ParkError {
    /// The stream.
    pub stream: String,
    /// The source `_id`, as relaxed Extended JSON.
    pub id: String,
    /// Why it was being parked.
    pub reason: String,
    /// The database's refusal.
    pub error: String,
}

/// Writes parking records for one stream.
#[derive(Debug, Clone)]
pub struct Parker {
    parked: Collection<Document>,
    stream: String,
    backoff: Backoff,
    readiness: Arc<Readiness>,
    cancel: CancellationToken,
}

/// Parks a message the client or broker refused (the publishing workers' side).
pub trait ParkMessage: Send + Sync + std::fmt::Debug + 'static {
    /// Records `message` as parked for `reason`; `Ok(false)` if cancelled first.
    fn park_message<'a>(
        &'a self,
        message: &'a WireMessage,
        reason: &'static str,
        error: String,
    ) -> BoxFuture<'a, Result<bool, ParkError>>;
}

impl Parker {
    /// A parker for `stream` in `db`; `cancel` stops its retries.
    pub fn new(
        db: &Database,
        stream: String,
        backoff: Backoff,
        readiness: Arc<Readiness>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            parked: db.collection(PARKED_COLLECTION),
            stream,
            backoff,
            readiness,
            cancel,
        }
    }

    /// Records the event `id` (its source document or envelope in `source`) as parked for
    /// `reason`. `Ok(true)` once recorded (or already there), `Ok(false)` if cancelled.
    pub async fn park(
        &self,
        id: Bson,
        source: Bson,
        reason: &'static str,
        error: &str,
    ) -> Result<bool, ParkError> {
        let shown = id.clone().into_relaxed_extjson().to_string();
        ::metrics::counter!(names::EVENTS_PARKED, "reason" => reason).increment(1);
        tracing::error!(stream = %self.stream, id = %shown, reason, error, "event parked in ordo_parked");
        let key = doc! { "stream": &self.stream, "id": id.clone() };
        let record = |source: Option<Bson>, omitted: Option<String>| {
            let mut fields = doc! {
                "_id": key.clone(),
                "stream": &self.stream,
                "sourceId": id.clone(),
                "reason": reason,
                "error": error,
                "parkedAt": DateTime::now(),
            };
            if let Some(s) = source {
                fields.insert("source", s);
            }
            if let Some(o) = omitted {
                fields.insert("sourceOmitted", o);
            }
            doc! { "$setOnInsert": fields }
        };
        let mut update = record(Some(source), None);
        let mut without_source = false;
        let mut retry = Retry::new("park", self.backoff);
        let mut fault = None;
        loop {
            let r = tokio::select! {
                r = self.parked.update_one(doc! { "_id": key.clone() }, update.clone()).upsert(true) => r,
                _ = self.cancel.cancelled() => return Ok(false),
            };
            match r {
                Ok(_) => return Ok(true),
                Err(e) if ordo_core::mongo::is_duplicate_key(&e) => return Ok(true),
                Err(e) if ordo_core::mongo::is_transient(&e) => {
                    self.readiness.hold(&mut fault, dependency::MONGODB);
                    let reason = ordo_core::mongo::error_reason(&e);
                    if !retry.pause(reason, &e, &self.cancel).await {
                        return Ok(false);
                    }
                }
                Err(e) if !without_source => {
                    tracing::error!(stream = %self.stream, id = %shown, error = %e, "parking record refused: recording it without the source document");
                    without_source = true;
                    update = record(None, Some(e.to_string()));
                }
                Err(e) => {
                    return Err(ParkError {
                        stream: self.stream.clone(),
                        id: shown,
                        reason: reason.to_string(),
                        error: e.to_string(),
                    })
                }
            }
        }
    }
}

impl ParkMessage for Parker {
    fn park_message<'a>(
        &'a self,
        message: &'a WireMessage,
        reason: &'static str,
        error: String,
    ) -> BoxFuture<'a, Result<bool, ParkError>> {
        Box::pin(async move {
            // The body is the envelope the producer built itself; it names the source `_id`.
            let (id, envelope) = match Envelope::decode(&message.body) {
                Ok(env) => {
                    let id = Bson::try_from(env.source.id.clone())
                        .unwrap_or_else(|_| Bson::String(env.source.id.to_string()));
                    let json = serde_json::to_value(&env).unwrap_or_default();
                    (id, Bson::try_from(json).unwrap_or(Bson::Null))
                }
                Err(_) => (
                    Bson::String(message.message_id.clone()),
                    Bson::String(String::from_utf8_lossy(&message.body).into_owned()),
                ),
            };
            let source = Bson::Document(doc! {
                "messageId": &message.message_id,
                "sessionId": &message.session_id,
                "envelope": envelope,
            });
            self.park(id, source, reason, &error).await
        })
    }
}
