//! Collection scans: the whole events collection, for `beginning` and lost-history recovery,
//! and the stream position taken before one.

use futures::TryStreamExt;
use mongodb::bson::{DateTime, Document};
use mongodb::change_stream::event::ResumeToken;
use ordo_core::metrics as names;
use ordo_core::retry::Retry;

use super::{token_doc, Source, Start, Step};
use crate::acks::Position;

impl Source {
    /// The position a fresh stream would start at: taken before a scan, and saved as the
    /// first checkpoint of a stream that starts `now`.
    pub async fn current_position(&self) -> Option<ResumeToken> {
        let mut retry = Retry::new("open_stream", self.backoff);
        let mut failed = None;
        loop {
            let opened = tokio::select! {
                r = self.events.watch() => r,
                _ = self.cancel.cancelled() => return None,
            };
            // No post-batch token cannot happen on a server that supports change streams; it
            // is treated as a fault rather than guessing a position.
            let e = match opened.map(|s| s.resume_token()) {
                Ok(Some(token)) => return Some(token),
                Ok(None) => mongodb::error::Error::custom("change stream returned no resume token"),
                Err(e) => e,
            };
            if !self.fault_and_pause(&mut failed, &mut retry, &e).await {
                return None;
            }
        }
    }

    /// Publishes every event of the collection in `sort` order, then returns the position
    /// taken before the scan (its marker is acked only after the scanned events).
    pub(super) async fn scan_then_stream(&self, sort: Document) -> Step<Start> {
        let Some(position) = self.current_position().await else {
            return Ok(None);
        };
        let wall = DateTime::now();
        let filter = Document::new();
        let mut retry = Retry::new("scan", self.backoff);
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
                    if !self.fault_and_pause(&mut failed, &mut retry, &e).await {
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
                        if !self.handle(doc, None, None).await? {
                            return Ok(None);
                        }
                        published += 1;
                    }
                    Ok(None) => break 'attempt,
                    Err(e) => {
                        // Start over: what was queued stays queued, repeats are deduplicated.
                        if !self.fault_and_pause(&mut failed, &mut retry, &e).await {
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
}
