//! Reading the events: the change stream, collection scans, and parking invalid events.
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
//! Lost history (286 ChangeStreamHistoryLost, 260 InvalidResumeToken, 280 ChangeStreamFatalError,
//! or an invalidate event): re-publish from the collection starting
//! `history_safety_margin` before the last saved checkpoint's wall time, then continue as above.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{self, doc, oid::ObjectId, Bson, DateTime, Document, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use mongodb::{Collection, Database};
use ordo_core::envelope::Envelope;
use ordo_core::metrics as names;
use ordo_core::retry::Backoff;
use ordo_core::telemetry::Health;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::{OnInvalid, ProducerConfig, StartAt};
use crate::dispatch::{Acks, Dispatcher};
use crate::Position;

/// Server codes meaning the stream cannot resume from the position it was given.
pub const HISTORY_LOST_CODES: &[i32] = &[286, 260, 280];

/// Where the reader starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// After a saved (or scanned-up-to) position.
    After(Document),
    /// From a start mode, no checkpoint.
    Mode(StartAt),
    /// Re-publish from the collection from this wall time on, then stream.
    Recover {
        /// Events from this time on are re-published.
        since: DateTime,
    },
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
}

/// Everything the reader uses.
#[derive(Debug, Clone)]
pub struct Source {
    /// Configuration.
    pub cfg: Arc<ProducerConfig>,
    /// The events collection.
    pub events: Collection<Document>,
    /// `ordo_parked`.
    pub parked: Collection<Document>,
    /// Stream name, recorded with parked events.
    pub stream: String,
    /// The queues to the workers.
    pub dispatcher: Arc<Dispatcher>,
    /// Sequence numbers and acks.
    pub acks: Acks,
    /// Wall time of the last saved checkpoint, the base of lost-history recovery.
    pub saved_wall: Arc<Mutex<Option<DateTime>>>,
    /// Readiness.
    pub health: Arc<Health>,
    /// Components currently failing; readiness is true only at zero.
    pub failing: Arc<AtomicUsize>,
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
}

/// What the stream reader hands to the handling side, in stream order.
enum Streamed {
    /// An inserted event and its position.
    Insert { doc: Document, position: Position },
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
        saved_wall: Arc<Mutex<Option<DateTime>>>,
        health: Arc<Health>,
        failing: Arc<AtomicUsize>,
        cancel: CancellationToken,
    ) -> Self {
        let backoff = Backoff {
            initial: cfg.producer.retry_initial,
            max: cfg.producer.retry_max,
        };
        Self {
            events: db.collection(&cfg.mongodb.events_collection),
            parked: db.collection(crate::PARKED_COLLECTION),
            cfg,
            stream,
            dispatcher,
            acks,
            saved_wall,
            health,
            failing,
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
                    self.scan_then_stream(Document::new()).await?
                }
                Start::Recover { since } => {
                    let filter = self.replay_filter(since);
                    tracing::warn!(stream = %self.stream, since = %since, filter = %filter, "re-publishing events from the collection");
                    self.scan_then_stream(filter).await?
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

    fn replay_filter(&self, since: DateTime) -> Document {
        let margin = self.cfg.producer.history_safety_margin.as_millis() as i64;
        let from = DateTime::from_millis(since.timestamp_millis().saturating_sub(margin).max(0));
        let field = &self.cfg.producer.replay_time_field;
        if field == "_id" {
            let secs = (from.timestamp_millis() / 1000).clamp(0, i64::from(u32::MAX)) as u32;
            let mut bytes = [0u8; 12];
            bytes[..4].copy_from_slice(&secs.to_be_bytes());
            doc! { "_id": { "$gte": ObjectId::from_bytes(bytes) } }
        } else {
            doc! { field: { "$gte": from } }
        }
    }

    fn fault(&self, failed: &mut bool) {
        if !*failed {
            *failed = true;
            self.failing.fetch_add(1, Ordering::SeqCst);
            self.health.set_ready(false);
        }
    }

    fn recovered(&self, failed: &mut bool) {
        if *failed {
            *failed = false;
            if self.failing.fetch_sub(1, Ordering::SeqCst) == 1 {
                self.health.set_ready(true);
            }
        }
    }

    async fn pause(
        &self,
        delays: &mut impl Iterator<Item = Duration>,
        op: &'static str,
        e: &mongodb::error::Error,
    ) -> bool {
        let delay = delays.next().unwrap_or(self.backoff.max);
        ::metrics::counter!(names::RETRIES, "op" => op).increment(1);
        tracing::warn!(op, delay_ms = delay.as_millis() as u64, error = %e, "database operation failed, retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = self.cancel.cancelled() => false,
        }
    }

    /// The position a fresh stream would start at: taken before a scan.
    async fn current_position(&self) -> Option<ResumeToken> {
        let mut delays = self.backoff.delays();
        let mut failed = false;
        loop {
            let opened = tokio::select! {
                r = self.events.watch() => r,
                _ = self.cancel.cancelled() => return None,
            };
            let r = opened.map(|s| s.resume_token());
            match r {
                Ok(Some(token)) => {
                    self.recovered(&mut failed);
                    return Some(token);
                }
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

    /// Publishes every event matching `filter` in `scan_sort` order, then returns the position
    /// taken before the scan (its marker is acked only after the scanned events).
    async fn scan_then_stream(&self, filter: Document) -> Step<Start> {
        let Some(position) = self.current_position().await else {
            return Ok(None);
        };
        let wall = DateTime::now();
        let sort: Document = match bson::to_document(&self.cfg.producer.scan_sort) {
            Ok(d) => d,
            Err(_) => doc! { "_id": 1 },
        };
        let mut delays = self.backoff.delays();
        let mut failed = false;
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
                        self.recovered(&mut failed);
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
        self.recovered(&mut failed);
        ::metrics::counter!(names::EVENTS_REPUBLISHED).increment(published);
        tracing::info!(stream = %self.stream, events = published, "collection scan done, continuing with the change stream");
        self.marker(Position {
            token: position.clone(),
            cluster_time: None,
            wall_time: wall,
        });
        Ok(Some(Start::After(token_doc(&position))))
    }

    /// Registers a position that needs no send (idle stream, end of a scan).
    fn marker(&self, position: Position) {
        let mut acks = self.acks.lock().expect("ack lock");
        let seq = acks.push_marker(Some(position));
        acks.ack(seq);
    }

    async fn open(&self, start: &Start) -> mongodb::error::Result<ChangeStream<Change>> {
        let p = &self.cfg.producer;
        let watch = self
            .events
            .watch()
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
            Start::Mode(_) | Start::Recover { .. } => watch.await,
        };
        stream.map(ChangeStream::with_type)
    }

    fn recovery(&self, cause: &'static str, detail: &str) -> Read {
        let since = self
            .saved_wall
            .lock()
            .expect("saved wall lock")
            .unwrap_or_else(DateTime::now);
        ::metrics::counter!(names::HISTORY_LOST, "cause" => cause).increment(1);
        tracing::error!(stream = %self.stream, cause, error = detail, since = %since, margin_s = self.cfg.producer.history_safety_margin.as_secs(), "change stream history lost: re-publishing from the events collection");
        Read::Reopen(Start::Recover { since })
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
                Streamed::Insert { doc, position } => {
                    if !self.handle(doc, Some(position)).await? {
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
        let mut failed = false;
        // Where to reopen after a transient fault: the last position read, else the start.
        let mut reopen = start;
        let mut last_token: Option<ResumeToken> = None;
        'open: loop {
            if let Some(token) = last_token.as_ref() {
                reopen = Start::After(token_doc(token));
            }
            let opened = tokio::select! {
                r = self.open(&reopen) => r,
                _ = self.cancel.cancelled() => return Read::Stop,
            };
            let mut stream = match opened {
                Ok(s) => s,
                Err(e) if is_history_lost(&e) => {
                    return self.recovery(code_name(&e), &e.to_string())
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
                        self.recovered(&mut failed);
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
                                Streamed::Insert { doc, position }
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
                        self.recovered(&mut failed);
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
        let m = &self.cfg.mongodb;
        let invalid =
            match Envelope::from_event(&doc, &m.fields, m.database(), &m.events_collection) {
                Ok(env) => {
                    let message = env.to_message();
                    if message.body.len() <= self.cfg.producer.max_message_bytes {
                        let seq = self.acks.lock().expect("ack lock").push(position);
                        return Ok(self.dispatcher.submit(seq, message, &self.cancel).await);
                    }
                    (
                        "too_large",
                        format!(
                            "message body is {} bytes, more than producer.max_message_bytes = {}",
                            message.body.len(),
                            self.cfg.producer.max_message_bytes
                        ),
                    )
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
        let shown = id.clone().into_relaxed_extjson().to_string();
        ::metrics::counter!(names::EVENTS_PARKED, "reason" => reason).increment(1);
        if self.cfg.producer.on_invalid == OnInvalid::Halt {
            tracing::error!(stream = %self.stream, id = %shown, reason, error = %error, "invalid event: halting");
            return Err(SourceError::Halt {
                id: shown,
                reason: error,
            });
        }
        tracing::error!(stream = %self.stream, id = %shown, reason, error = %error, "invalid event parked in ordo_parked");
        // Keyed by the source `_id`: parking the same event again (after a restart) is a no-op.
        let filter = doc! { "_id": id.clone() };
        let update = doc! { "$setOnInsert": {
            "_id": id,
            "stream": &self.stream,
            "source": doc,
            "reason": reason,
            "error": error,
            "parkedAt": DateTime::now(),
        }};
        let mut delays = self.backoff.delays();
        let mut failed = false;
        loop {
            let r = tokio::select! {
                r = self.parked.update_one(filter.clone(), update.clone()).upsert(true) => r,
                _ = self.cancel.cancelled() => return Ok(false),
            };
            match r {
                Ok(_) => break,
                Err(e) if ordo_core::mongo::is_duplicate_key(&e) => break,
                Err(e) => {
                    self.fault(&mut failed);
                    if !self.pause(&mut delays, "park", &e).await {
                        return Ok(false);
                    }
                }
            }
        }
        self.recovered(&mut failed);
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
