//! Reading the events: the change stream and collection scans; invalid events go to
//! [`crate::park`].
//!
//! Files: this one holds the reader's loop and what it does with each event (queue or park);
//! `scan` the collection scans, `stream` the change stream.
//!
//! Every item read gets a sequence number in the [`crate::acks::AckTracker`] in read order
//! before it is queued, so the checkpoint can only cover what was read before it.
//!
//! Start points:
//! - a checkpoint: `startAfter` its token;
//! - `now` / a timestamp (`startAtOperationTime`);
//! - `beginning` and lost-history recovery: take the stream's position first (the resume token
//!   of a fresh stream, i.e. the operation time before the scan), scan the collection, then open
//!   the stream after that position. An event inserted during the scan is either seen by the scan
//!   or after the position, or both (a duplicate, removed by MessageId dedup): never neither.
//!
//! The stream has no `$match` stage: the events collection is append-only, so there is nothing
//! for the server to filter, and evaluating the stage per event cost the MongoDB stand-in a
//! third of its change-stream throughput. Operation types other than inserts (an update or a
//! delete someone made by hand, a drop before its invalidate) are skipped here.
//!
//! An event whose change event is over MongoDB's 16 MB limit (BSONObjectTooLarge, 10334; a
//! document near the limit plus the event's metadata) cannot be read as it is, and reopening
//! the stream would meet it again forever. After the first such error the stream is reopened
//! with stages that replace a document over [`OVERSIZE_BYTES`] by its `_id` and mark the event
//! with its size, and drop update descriptions (never read, as large); the producer parks such
//! an event as `too_large` (no topic carries 16 MB anyway) and goes on. The stages stay until
//! the stream is started afresh (a restart, lost history); until needed the stream has none.
//!
//! Lost history (286 ChangeStreamHistoryLost, 260 InvalidResumeToken, 280 ChangeStreamFatalError,
//! or an invalidate event): re-publish the whole events collection in (aggregateId, eventId)
//! order, then continue as above. Nothing in the collection says which events were published
//! before the history was lost: an `_id` need not be an ObjectId (strings, UUIDs and composite
//! ids select nothing under an ObjectId bound) and a time field depends on clocks agreeing, so
//! no bound is provably safe, and the whole collection is. What this relies on: the events
//! collection is append-only (events are never deleted or rewritten), every event published
//! again is removed by MessageId deduplication within the broker's window or by the projector's
//! version guard after it, and per-aggregate order is kept because each aggregate's events are
//! read in eventId order and one session is published in read order.

use std::sync::Arc;

use mongodb::bson::{self, doc, Bson, Document};
use mongodb::change_stream::event::ResumeToken;
use mongodb::{Collection, Database};
use ordo_core::envelope::Envelope;
use ordo_core::retry::{Backoff, Retry};
use ordo_core::servicebus::sender;
use tokio_util::sync::CancellationToken;

use crate::acks::{Acks, Position};
use crate::config::{OnInvalid, ProducerConfig, StartAt};
use crate::dispatch::Dispatcher;
use crate::park::{ParkError, Parker};
use ordo_core::readiness::{dependency, Fault, Readiness};

mod scan;
mod stream;

pub use stream::OVERSIZE_BYTES;

/// Server codes meaning the stream cannot resume from the position it was given.
pub const HISTORY_LOST_CODES: &[i32] = &[286, 260, 280];

/// Where the reader starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// After a saved (or scanned-up-to) position.
    After(Document),
    /// From a start mode, no checkpoint.
    Mode(StartAt),
    /// Re-publish the whole collection, then stream.
    Recover,
}

/// Why the reader stopped other than by cancellation.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// An invalid event with `on_invalid = "halt"`.
    #[error("invalid event {id} halts the producer (on_invalid = \"halt\"): {reason}")]
    Halt {
        /// The source document's `_id`.
        id: String,
        /// Why it is invalid.
        reason: String,
    },
    /// An invalid event could not be recorded in `ordo_parked`.
    #[error(transparent)]
    Park(#[from] ParkError),
}

/// Everything the reader uses.
#[derive(Debug, Clone)]
pub struct Source {
    /// Configuration.
    pub cfg: Arc<ProducerConfig>,
    /// The events collection.
    pub events: Collection<Document>,
    /// Records invalid events.
    pub parker: Parker,
    /// Stream name, for logs.
    pub stream: String,
    /// The queues to the workers.
    pub dispatcher: Arc<Dispatcher>,
    /// Sequence numbers and acks.
    pub acks: Acks,
    /// Readiness.
    pub readiness: Arc<Readiness>,
    /// Retry delays.
    pub backoff: Backoff,
    /// Stop reading.
    pub cancel: CancellationToken,
}

/// Result of an attempt that may be cut short by cancellation.
type Step<T> = Result<Option<T>, SourceError>;

enum Read {
    /// Reopen the stream at this start.
    Reopen(Start),
    /// Cancelled.
    Stop,
}

impl Source {
    /// A source over `db` for `cfg`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Arc<ProducerConfig>,
        db: &Database,
        stream: String,
        dispatcher: Arc<Dispatcher>,
        acks: Acks,
        parker: Parker,
        readiness: Arc<Readiness>,
        cancel: CancellationToken,
    ) -> Self {
        let backoff = cfg.producer.backoff();
        Self {
            events: db.collection(&cfg.mongodb.events_collection),
            parker,
            cfg,
            stream,
            dispatcher,
            acks,
            readiness,
            backoff,
            cancel,
        }
    }

    /// Reads until cancelled (Ok) or halted by an invalid event.
    pub async fn run(&self, mut start: Start) -> Result<(), SourceError> {
        loop {
            let next = match start {
                Start::Mode(StartAt::Beginning) => {
                    tracing::info!(stream = %self.stream, "no checkpoint: publishing the existing events first");
                    let sort = bson::to_document(&self.cfg.producer.scan_sort)
                        .unwrap_or_else(|_| doc! { "_id": 1 });
                    self.scan_then_stream(sort).await?
                }
                Start::Recover => {
                    tracing::warn!(stream = %self.stream, "re-publishing the events collection in (aggregateId, eventId) order");
                    let f = &self.cfg.mongodb.fields;
                    let sort = doc! { &f.aggregate_id: 1, &f.event_id: 1 };
                    self.scan_then_stream(sort).await?
                }
                other => Some(other),
            };
            let Some(from) = next else { return Ok(()) };
            match self.stream(from).await? {
                Read::Reopen(s) => start = s,
                Read::Stop => return Ok(()),
            }
        }
    }

    /// The step after a database error of the reader: the MongoDB fault held in `slot` (once)
    /// and the retry's pause; false once reading stops.
    async fn fault_and_pause(
        &self,
        slot: &mut Option<Fault>,
        retry: &mut Retry,
        e: &mongodb::error::Error,
    ) -> bool {
        self.readiness.hold(slot, dependency::MONGODB);
        retry
            .pause(ordo_core::mongo::error_reason(e), e, &self.cancel)
            .await
    }

    /// Registers a position that needs no send (idle stream, end of a scan). It needs no room
    /// in the tracker: behind a stuck front it replaces the previous marker.
    fn marker(&self, position: Position) {
        self.acks
            .lock()
            .expect("ack lock")
            .push_acked_marker(position);
    }

    /// Waits until the ack tracker has room for one more item; false if cancelled first.
    async fn room(&self) -> bool {
        loop {
            let freed = {
                let acks = self.acks.lock().expect("ack lock");
                if acks.has_room() {
                    return true;
                }
                acks.freed()
            };
            // Registered before the second look, so a wake-up in between is not missed.
            let notified = freed.notified();
            if self.acks.lock().expect("ack lock").has_room() {
                return true;
            }
            tokio::select! {
                _ = notified => {}
                _ = self.cancel.cancelled() => return false,
            }
        }
    }

    /// Queues one source event, or parks it (`oversize`: the stream read only its `_id`, see
    /// the shrinking stage). Returns false when cancelled while waiting for room in the queues
    /// or for the parking write.
    async fn handle(
        &self,
        doc: Document,
        position: Option<Position>,
        oversize: Option<i64>,
    ) -> Result<bool, SourceError> {
        if !self.room().await {
            return Ok(false);
        }
        if let Some(bytes) = oversize {
            let error = format!(
                "the document is {bytes} bytes of BSON: its change event is over MongoDB's 16 MB limit, so only its _id was read"
            );
            return self.park(doc, position, "too_large", error).await;
        }
        let m = &self.cfg.mongodb;
        let max = self.cfg.producer.max_message_bytes as u64;
        let invalid =
            match Envelope::from_event(&doc, &m.fields, m.database(), &m.events_collection) {
                Ok(env) => {
                    let message = env.to_message();
                    match sender::fits(&message, max) {
                        Ok(()) => {
                            let seq = self.acks.lock().expect("ack lock").push(position);
                            return Ok(self.dispatcher.submit(seq, message, &self.cancel).await);
                        }
                        Err(why) => ("too_large", why),
                    }
                }
                Err(e) => (e.reason(), e.to_string()),
            };
        self.park(doc, position, invalid.0, invalid.1).await
    }

    async fn park(
        &self,
        doc: Document,
        position: Option<Position>,
        reason: &'static str,
        error: String,
    ) -> Result<bool, SourceError> {
        let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
        if self.cfg.producer.on_invalid == OnInvalid::Halt {
            // Nothing is parked: the error and the exit status say which event stopped it.
            let shown = id.into_relaxed_extjson().to_string();
            tracing::error!(stream = %self.stream, id = %shown, reason, error = %error, "invalid event: halting");
            return Err(SourceError::Halt {
                id: shown,
                reason: error,
            });
        }
        if !self
            .parker
            .park(id, Bson::Document(doc), reason, &error)
            .await?
        {
            return Ok(false);
        }
        // Durably recorded: it counts as handled for the checkpoint.
        let mut acks = self.acks.lock().expect("ack lock");
        let seq = acks.push_marker(position);
        acks.ack(seq);
        Ok(true)
    }
}

/// The resume token as a document (how the checkpoint stores it).
pub fn token_doc(token: &ResumeToken) -> Document {
    bson::to_document(token).unwrap_or_default()
}
