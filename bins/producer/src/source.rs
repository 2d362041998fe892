//! Reading the events: the change stream and collection scans; invalid events go to
//! [`crate::park`].
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
//! with one stage that replaces a document over [`OVERSIZE_BYTES`] by its `_id` and marks the
//! event with its size; the producer parks it as `too_large` (no topic carries 16 MB anyway)
//! and goes on. The stage stays for the rest of the reader's life; until then the stream has
//! no stage at all.
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
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{self, doc, Bson, DateTime, Document, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use mongodb::{Collection, Database};
use ordo_core::envelope::Envelope;
use ordo_core::metrics as names;
use ordo_core::retry::Backoff;
use ordo_core::servicebus::sender;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::{OnInvalid, ProducerConfig, StartAt};
use crate::dispatch::{Acks, Dispatcher};
use crate::park::{ParkError, Parker};
use crate::readiness::{dependency, Fault, Readiness};
use crate::Position;

/// BSONObjectTooLarge: a change event over the 16 MB limit.
const EVENT_TOO_LARGE: i32 = 10334;

/// A document above this many bytes of BSON is read by its `_id` alone once the stream met an
/// event over the limit: 16 MiB less 64 KiB for the change event's own fields (its resume
/// token, the namespace, the document key).
pub const OVERSIZE_BYTES: i64 = 16 * 1024 * 1024 - 64 * 1024;

/// The field the shrinking stage adds to an event whose document it replaced.
const OVERSIZE_FIELD: &str = "ordoOversizeBytes";

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

/// The fields of a change event the producer reads. The driver's `ChangeStreamEvent` also
/// decodes the namespace, the session, the update description and more, and its operation
/// type through an untagged enum (a buffered second pass); decoding events was the largest
/// part of the producer's CPU.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Change {
    #[serde(rename = "_id")]
    id: ResumeToken,
    operation_type: String,
    cluster_time: Option<Timestamp>,
    wall_time: Option<DateTime>,
    full_document: Option<Document>,
    document_key: Option<Document>,
    /// Set by the shrinking stage: the size of the document it replaced by its `_id`.
    #[serde(rename = "ordoOversizeBytes")]
    oversize: Option<i64>,
}

/// What the stream reader hands to the handling side, in stream order.
enum Streamed {
    /// An inserted event and its position.
    Insert {
        doc: Document,
        position: Position,
        /// The document was over [`OVERSIZE_BYTES`]: `doc` is its `_id` alone.
        oversize: Option<i64>,
    },
    /// The stream is caught up to this position (an idle stream's post-batch resume token).
    Idle(Position),
}

/// Aborts the task when dropped: the reader must not outlive the side handling what it reads.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
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
        let backoff = Backoff {
            initial: cfg.producer.retry_initial,
            max: cfg.producer.retry_max,
        };
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

    fn fault(&self, slot: &mut Option<Fault>) {
        self.readiness.hold(slot, dependency::MONGODB);
    }

    async fn pause(
        &self,
        delays: &mut impl Iterator<Item = Duration>,
        op: &'static str,
        e: &mongodb::error::Error,
    ) -> bool {
        let delay = delays.next().unwrap_or(self.backoff.max);
        ::metrics::counter!(names::RETRIES, "operation" => op, "reason" => ordo_core::mongo::error_reason(e)).increment(1);
        tracing::warn!(op, delay_ms = delay.as_millis() as u64, error = %e, "database operation failed, retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = self.cancel.cancelled() => false,
        }
    }

    /// The position a fresh stream would start at: taken before a scan, and saved as the
    /// first checkpoint of a stream that starts `now`.
    pub async fn current_position(&self) -> Option<ResumeToken> {
        let mut delays = self.backoff.delays();
        let mut failed = None;
        loop {
            let opened = tokio::select! {
                r = self.events.watch() => r,
                _ = self.cancel.cancelled() => return None,
            };
            let r = opened.map(|s| s.resume_token());
            match r {
                Ok(Some(token)) => return Some(token),
                Ok(None) => {
                    // No post-batch token: cannot happen on a server that supports change
                    // streams; treat it as a fault rather than guessing a position.
                    let e = mongodb::error::Error::custom("change stream returned no resume token");
                    self.fault(&mut failed);
                    if !self.pause(&mut delays, "open_stream", &e).await {
                        return None;
                    }
                }
                Err(e) => {
                    self.fault(&mut failed);
                    if !self.pause(&mut delays, "open_stream", &e).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Publishes every event of the collection in `sort` order, then returns the position
    /// taken before the scan (its marker is acked only after the scanned events).
    async fn scan_then_stream(&self, sort: Document) -> Step<Start> {
        let Some(position) = self.current_position().await else {
            return Ok(None);
        };
        let wall = DateTime::now();
        let filter = Document::new();
        let mut delays = self.backoff.delays();
        let mut failed = None;
        let mut published: u64 = 0;
        'attempt: loop {
            let cursor = tokio::select! {
                r = self.events.find(filter.clone()).sort(sort.clone()).batch_size(self.cfg.producer.read_batch_size) => r,
                _ = self.cancel.cancelled() => return Ok(None),
            };
            let mut cursor = match cursor {
                Ok(c) => c,
                Err(e) => {
                    self.fault(&mut failed);
                    if !self.pause(&mut delays, "scan", &e).await {
                        return Ok(None);
                    }
                    continue 'attempt;
                }
            };
            loop {
                let next = tokio::select! {
                    r = cursor.try_next() => r,
                    _ = self.cancel.cancelled() => return Ok(None),
                };
                match next {
                    Ok(Some(doc)) => {
                        failed = None;
                        if !self.handle(doc, None).await? {
                            return Ok(None);
                        }
                        published += 1;
                    }
                    Ok(None) => break 'attempt,
                    Err(e) => {
                        // Start over: what was queued stays queued, repeats are deduplicated.
                        self.fault(&mut failed);
                        if !self.pause(&mut delays, "scan", &e).await {
                            return Ok(None);
                        }
                        continue 'attempt;
                    }
                }
            }
        }
        drop(failed);
        ::metrics::counter!(names::EVENTS_REPUBLISHED).increment(published);
        tracing::info!(stream = %self.stream, events = published, "collection scan done, continuing with the change stream");
        self.marker(Position {
            token: position.clone(),
            cluster_time: None,
            wall_time: wall,
        });
        Ok(Some(Start::After(token_doc(&position))))
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

    async fn open(
        &self,
        start: &Start,
        shrink: bool,
    ) -> mongodb::error::Result<ChangeStream<Change>> {
        let p = &self.cfg.producer;
        let pipeline = if shrink { shrinking_stage() } else { vec![] };
        let watch = self
            .events
            .watch()
            .pipeline(pipeline)
            .max_await_time(p.max_await_time)
            .batch_size(p.read_batch_size);
        let stream = match start {
            Start::After(token) => {
                let token: ResumeToken = bson::from_document(token.clone()).map_err(|e| {
                    mongodb::error::Error::custom(format!("stored resume token is unusable: {e}"))
                })?;
                watch.start_after(token).await
            }
            Start::Mode(StartAt::Time(secs)) => {
                watch
                    .start_at_operation_time(Timestamp {
                        time: (*secs).clamp(0, i64::from(u32::MAX)) as u32,
                        increment: 0,
                    })
                    .await
            }
            Start::Mode(_) | Start::Recover => watch.await,
        };
        stream.map(ChangeStream::with_type)
    }

    /// The stream met an event over the 16 MB limit; it is reopened with the shrinking stage.
    fn met_event_too_large(&self, e: &mongodb::error::Error) {
        ::metrics::counter!(names::RETRIES, "operation" => "change_stream", "reason" => "event_too_large").increment(1);
        tracing::error!(stream = %self.stream, error = %e, limit = OVERSIZE_BYTES, "a change event is over MongoDB's 16 MB limit: reopening the stream with a stage that reads a document over the limit by its _id; it is parked as too_large");
    }

    fn recovery(&self, cause: &'static str, detail: &str) -> Read {
        ::metrics::counter!(names::HISTORY_LOST, "cause" => cause).increment(1);
        tracing::error!(stream = %self.stream, cause, error = detail, "change stream history lost: re-publishing from the events collection");
        Read::Reopen(Start::Recover)
    }

    /// Tails the stream from `start` until cancelled, lost history, or an invalidate.
    ///
    /// Two tasks, one channel: [`Source::tail`] reads and decodes the stream and hands each
    /// event on in stream order; this task turns them into messages and queues them. The driver
    /// asks for the next batch only once the current one is consumed, so with one task the
    /// server's work on a batch and ours on the previous one would take turns.
    async fn stream(&self, start: Start) -> Result<Read, SourceError> {
        let capacity = (self.cfg.producer.read_batch_size as usize).clamp(1, 4096);
        let (tx, mut rx) = tokio::sync::mpsc::channel(capacity);
        let mut tail = {
            let this = self.clone();
            AbortOnDrop(tokio::spawn(async move { this.tail(start, tx).await }))
        };
        while let Some(item) = rx.recv().await {
            match item {
                Streamed::Insert {
                    doc,
                    position,
                    oversize,
                } => {
                    let handled = match oversize {
                        Some(bytes) => self.park(doc, Some(position), "too_large", format!(
                            "the document is {bytes} bytes of BSON: its change event is over MongoDB's 16 MB limit, so only its _id was read"
                        )).await?,
                        None => self.handle(doc, Some(position)).await?,
                    };
                    if !handled {
                        return Ok(Read::Stop);
                    }
                }
                Streamed::Idle(position) => self.marker(position),
            }
        }
        // The channel closes only when `tail` returned: everything it read is handled.
        match (&mut tail.0).await {
            Ok(read) => Ok(read),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Ok(Read::Stop),
        }
    }

    /// Reads the stream from `start` into `tx` until cancelled, lost history, an invalidate, or
    /// the receiving side is gone. Transient faults reopen the stream after the last position
    /// handed on.
    async fn tail(&self, start: Start, tx: tokio::sync::mpsc::Sender<Streamed>) -> Read {
        let mut delays = self.backoff.delays();
        let mut failed = None;
        // Where to reopen after a transient fault: the last position read, else the start.
        let mut reopen = start;
        let mut last_token: Option<ResumeToken> = None;
        // Read oversized documents by their `_id`: set after the first event over the limit.
        let mut shrink = false;
        'open: loop {
            if let Some(token) = last_token.as_ref() {
                reopen = Start::After(token_doc(token));
            }
            let opened = tokio::select! {
                r = self.open(&reopen, shrink) => r,
                _ = self.cancel.cancelled() => return Read::Stop,
            };
            let mut stream = match opened {
                Ok(s) => s,
                Err(e) if is_history_lost(&e) => {
                    return self.recovery(code_name(&e), &e.to_string())
                }
                Err(e) if !shrink && is_event_too_large(&e) => {
                    self.met_event_too_large(&e);
                    shrink = true;
                    continue 'open;
                }
                Err(e) => {
                    self.fault(&mut failed);
                    if !self.pause(&mut delays, "change_stream", &e).await {
                        return Read::Stop;
                    }
                    continue 'open;
                }
            };
            tracing::info!(stream = %self.stream, "change stream open");
            loop {
                let next = tokio::select! {
                    r = stream.next_if_any() => r,
                    _ = self.cancel.cancelled() => return Read::Stop,
                };
                let item = match next {
                    Ok(Some(event)) => {
                        failed = None;
                        delays = self.backoff.delays();
                        if let Some(ct) = event.cluster_time {
                            let lag = DateTime::now().timestamp_millis() as f64 / 1000.0
                                - f64::from(ct.time);
                            ::metrics::gauge!(names::CHANGE_STREAM_LAG).set(lag.max(0.0));
                        }
                        match event.operation_type.as_str() {
                            "insert" => {
                                // An insert always carries its document; if a server ever omits
                                // it, the key alone is parked (as invalid) rather than dropped.
                                let doc = event
                                    .full_document
                                    .or(event.document_key)
                                    .unwrap_or_default();
                                let position = Position {
                                    token: event.id.clone(),
                                    cluster_time: event.cluster_time,
                                    wall_time: event.wall_time.unwrap_or_else(DateTime::now),
                                };
                                last_token = Some(event.id);
                                Streamed::Insert {
                                    doc,
                                    position,
                                    oversize: event.oversize,
                                }
                            }
                            "invalidate" => {
                                return self.recovery("invalidate", "the change stream was invalidated (collection dropped or renamed)");
                            }
                            // Updates, deletes, drops: not events of an append-only log.
                            _ => {
                                last_token = Some(event.id);
                                continue;
                            }
                        }
                    }
                    Ok(None) => {
                        failed = None;
                        // Idle: the post-batch resume token moved past everything scanned, so
                        // the stream is caught up; a lag kept from the last event would lie.
                        ::metrics::gauge!(names::CHANGE_STREAM_LAG).set(0.0);
                        if !stream.is_alive() {
                            continue 'open;
                        }
                        match stream.resume_token() {
                            Some(token) if last_token.as_ref() != Some(&token) => {
                                let position = Position {
                                    token: token.clone(),
                                    cluster_time: None,
                                    wall_time: DateTime::now(),
                                };
                                last_token = Some(token);
                                Streamed::Idle(position)
                            }
                            _ => continue,
                        }
                    }
                    Err(e) if is_history_lost(&e) => {
                        return self.recovery(code_name(&e), &e.to_string())
                    }
                    Err(e) if !shrink && is_event_too_large(&e) => {
                        self.met_event_too_large(&e);
                        shrink = true;
                        continue 'open;
                    }
                    Err(e) => {
                        self.fault(&mut failed);
                        if !self.pause(&mut delays, "change_stream", &e).await {
                            return Read::Stop;
                        }
                        continue 'open;
                    }
                };
                let sent = tokio::select! {
                    r = tx.send(item) => r,
                    _ = self.cancel.cancelled() => return Read::Stop,
                };
                if sent.is_err() {
                    // The handling side stopped (halt or cancellation): it decides what follows.
                    return Read::Stop;
                }
            }
        }
    }

    /// Queues one source event, or parks it. Returns false when cancelled while waiting for
    /// room in the queues or for the parking write.
    async fn handle(&self, doc: Document, position: Option<Position>) -> Result<bool, SourceError> {
        if !self.room().await {
            return Ok(false);
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
            let shown = id.into_relaxed_extjson().to_string();
            ::metrics::counter!(names::EVENTS_PARKED, "reason" => reason).increment(1);
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

fn is_event_too_large(e: &mongodb::error::Error) -> bool {
    ordo_core::mongo::server_code(e) == Some(EVENT_TOO_LARGE)
}

/// The stage that keeps every change event under the limit: a document over
/// [`OVERSIZE_BYTES`] is replaced by its `_id`, and the event gets [`OVERSIZE_FIELD`] with the
/// document's size. Events of other kinds (no document) pass unchanged.
fn shrinking_stage() -> Vec<Document> {
    let size = doc! { "$bsonSize": "$fullDocument" };
    let over = doc! { "$gt": [size.clone(), OVERSIZE_BYTES] };
    vec![doc! { "$set": {
        OVERSIZE_FIELD: { "$cond": [over.clone(), size, "$$REMOVE"] },
        "fullDocument": { "$cond": [over, { "_id": "$fullDocument._id" }, "$fullDocument"] },
    } }]
}

fn is_history_lost(e: &mongodb::error::Error) -> bool {
    ordo_core::mongo::server_code(e).is_some_and(|c| HISTORY_LOST_CODES.contains(&c))
}

fn code_name(e: &mongodb::error::Error) -> &'static str {
    match ordo_core::mongo::server_code(e) {
        Some(286) => "history_lost",
        Some(260) => "invalid_resume_token",
        Some(280) => "change_stream_fatal",
        _ => "unknown",
    }
}
