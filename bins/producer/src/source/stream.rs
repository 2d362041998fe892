//! Tailing the change stream: opening it where the last read ended, decoding only what the
//! producer reads, reopening after faults, and the stage that keeps events under 16 MB.

use mongodb::bson::{self, doc, DateTime, Document, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use ordo_core::metrics as names;
use ordo_core::retry::Retry;
use serde::Deserialize;
use tokio::sync::mpsc::Sender;

use super::{token_doc, Read, Source, SourceError, Start, HISTORY_LOST_CODES};
use crate::acks::Position;
use crate::config::StartAt;
use crate::task::AbortOnDrop;
use ordo_core::readiness::Fault;

/// BSONObjectTooLarge: a change event over the 16 MB limit.
const EVENT_TOO_LARGE: i32 = 10334;

/// A document above this many bytes of BSON is read by its `_id` alone once the stream met an
/// event over the limit: 16 MiB less 64 KiB for the change event's own fields (its resume
/// token, the namespace, the document key).
pub const OVERSIZE_BYTES: i64 = 16 * 1024 * 1024 - 64 * 1024;

/// The field the shrinking stage adds to an event whose document it replaced.
const OVERSIZE_FIELD: &str = "ordoOversizeBytes";

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

impl Source {
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

    /// What a failed open or read of the stream leads to: `Some` ends the tail (lost history,
    /// or cancelled during the pause), `None` reopens it (with the shrinking stage after an
    /// event over the limit, at once; after any other fault, past a backoff pause).
    async fn failed(&self, e: &mongodb::error::Error, at: &mut Tailing) -> Option<Read> {
        if is_history_lost(e) {
            return Some(self.recovery(code_name(e), &e.to_string()));
        }
        if !at.shrink && is_event_too_large(e) {
            self.met_event_too_large(e);
            at.shrink = true;
            return None;
        }
        if !self.fault_and_pause(&mut at.fault, &mut at.retry, e).await {
            return Some(Read::Stop);
        }
        None
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
    pub(super) async fn stream(&self, start: Start) -> Result<Read, SourceError> {
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
                    let handled = self.handle(doc, Some(position), oversize).await?;
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
    async fn tail(&self, start: Start, tx: Sender<Streamed>) -> Read {
        let mut at = Tailing {
            reopen: start,
            last_token: None,
            shrink: false,
            retry: Retry::new("change_stream", self.backoff),
            fault: None,
        };
        loop {
            if let Some(token) = at.last_token.as_ref() {
                at.reopen = Start::After(token_doc(token));
            }
            let opened = tokio::select! {
                r = self.open(&at.reopen, at.shrink) => r,
                _ = self.cancel.cancelled() => return Read::Stop,
            };
            let stream = match opened {
                Ok(s) => s,
                Err(e) => match self.failed(&e, &mut at).await {
                    Some(read) => return read,
                    None => continue,
                },
            };
            tracing::info!(stream = %self.stream, "change stream open");
            if let Some(read) = self.read_open(stream, &mut at, &tx).await {
                return read;
            }
        }
    }

    /// Reads an open stream and hands what it reads to `tx`, in stream order; `None` when the
    /// stream is to be opened again, after the last position read.
    async fn read_open(
        &self,
        mut stream: ChangeStream<Change>,
        at: &mut Tailing,
        tx: &Sender<Streamed>,
    ) -> Option<Read> {
        loop {
            let next = tokio::select! {
                r = stream.next_if_any() => r,
                _ = self.cancel.cancelled() => return Some(Read::Stop),
            };
            let next = match next {
                Ok(Some(event)) => self.changed(event, at),
                Ok(None) => caught_up(&stream, at),
                Err(e) => match self.failed(&e, at).await {
                    Some(read) => Next::End(read),
                    None => Next::Reopen,
                },
            };
            let item = match next {
                Next::Hand(item) => item,
                Next::Skip => continue,
                Next::Reopen => return None,
                Next::End(read) => return Some(read),
            };
            let sent = tokio::select! {
                r = tx.send(item) => r,
                _ = self.cancel.cancelled() => return Some(Read::Stop),
            };
            if sent.is_err() {
                // The handling side stopped (halt or cancellation): it decides what follows.
                return Some(Read::Stop);
            }
        }
    }

    /// One change event read: an insert is handed on, an invalidate ends the tail, anything
    /// else only moves the position.
    fn changed(&self, event: Change, at: &mut Tailing) -> Next {
        at.fault = None;
        at.retry.reset();
        if let Some(ct) = event.cluster_time {
            let lag = DateTime::now().timestamp_millis() as f64 / 1000.0 - f64::from(ct.time);
            ::metrics::gauge!(names::CHANGE_STREAM_LAG).set(lag.max(0.0));
        }
        match event.operation_type.as_str() {
            "insert" => {
                // An insert always carries its document; if a server ever omits it, the key
                // alone is parked (as invalid) rather than dropped.
                let doc = event
                    .full_document
                    .or(event.document_key)
                    .unwrap_or_default();
                let position = Position {
                    token: event.id.clone(),
                    cluster_time: event.cluster_time,
                    wall_time: event.wall_time.unwrap_or_else(DateTime::now),
                };
                at.last_token = Some(event.id);
                Next::Hand(Streamed::Insert {
                    doc,
                    position,
                    oversize: event.oversize,
                })
            }
            "invalidate" => Next::End(self.recovery(
                "invalidate",
                "the change stream was invalidated (collection dropped or renamed)",
            )),
            // Updates, deletes, drops: not events of an append-only log.
            _ => {
                at.last_token = Some(event.id);
                Next::Skip
            }
        }
    }
}

/// Where a tail is, across the reopenings of its stream.
struct Tailing {
    /// Where to reopen after a transient fault: the last position read, else the start.
    reopen: Start,
    /// The last position read.
    last_token: Option<ResumeToken>,
    /// Read oversized documents by their `_id`: set after the first event over the limit.
    shrink: bool,
    /// The backoff of the stream's faults, started over by each event read.
    retry: Retry,
    /// Held while opening or reading the stream fails.
    fault: Option<Fault>,
}

/// What one read of the stream leads to.
enum Next {
    /// Hand this on.
    Hand(Streamed),
    /// Nothing to hand on: read on.
    Skip,
    /// Open the stream again.
    Reopen,
    /// The tail ends.
    End(Read),
}

/// An empty batch: the stream is caught up. Its post-batch resume token is handed on when it
/// moved, so an idle stream's checkpoint still advances.
fn caught_up(stream: &ChangeStream<Change>, at: &mut Tailing) -> Next {
    at.fault = None;
    // The post-batch resume token moved past everything scanned, so the stream is caught up;
    // a lag kept from the last event would lie.
    ::metrics::gauge!(names::CHANGE_STREAM_LAG).set(0.0);
    if !stream.is_alive() {
        return Next::Reopen;
    }
    match stream.resume_token() {
        Some(token) if at.last_token.as_ref() != Some(&token) => {
            let position = Position {
                token: token.clone(),
                cluster_time: None,
                wall_time: DateTime::now(),
            };
            at.last_token = Some(token);
            Next::Hand(Streamed::Idle(position))
        }
        _ => Next::Skip,
    }
}

fn is_event_too_large(e: &mongodb::error::Error) -> bool {
    ordo_core::mongo::server_code(e) == Some(EVENT_TOO_LARGE)
}

/// The stages that keep every change event under the limit: a document over
/// [`OVERSIZE_BYTES`] is replaced by its `_id`, and the event gets [`OVERSIZE_FIELD`] with the
/// document's size (measured once); an update's description, which the producer never reads
/// and which can be as large, is dropped. Events without a document pass otherwise unchanged.
fn shrinking_stage() -> Vec<Document> {
    let over = doc! { "$gt": [format!("${OVERSIZE_FIELD}"), OVERSIZE_BYTES] };
    vec![
        doc! { "$set": { OVERSIZE_FIELD: { "$bsonSize": "$fullDocument" } } },
        doc! { "$set": {
            "fullDocument": { "$cond": [over.clone(), { "_id": "$fullDocument._id" }, "$fullDocument"] },
            OVERSIZE_FIELD: { "$cond": [over, format!("${OVERSIZE_FIELD}"), "$$REMOVE"] },
            "updateDescription": "$$REMOVE",
        } },
    ]
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
