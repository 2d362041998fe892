//! Where a term starts reading: after the stored checkpoint, or at the start mode of a stream
//! that has none. A stream that starts `now` saves its first position as the checkpoint before
//! the first event is read, so a restart before the first publish resumes there instead of at
//! a new "now".

use mongodb::bson::DateTime;
use ordo_core::checkpoint::{Checkpoint, CheckpointError};
use ordo_core::readiness::dependency;
use ordo_core::retry::Retry;
use tokio_util::sync::CancellationToken;

use crate::checkpointer;
use crate::source::{self, Source, Start};
use crate::{Producer, ProducerError};

/// The stored checkpoint a term starts from.
pub(crate) struct Loaded {
    /// Where the reader starts.
    pub start: Start,
    /// Wall time of the stored checkpoint; `None` without one.
    pub saved_wall: Option<DateTime>,
    /// Events published before this term, as the stored checkpoint counts them.
    pub published_before: u64,
}

/// How saving the first position ended.
pub(crate) enum FirstPosition {
    /// Saved: the reader starts after it.
    Saved(Start),
    /// A newer producer's epoch fenced the save: this term is lost.
    Fenced,
    /// Shutdown came first.
    Cancelled,
}

impl Producer {
    /// Loads the stream's checkpoint, retrying while the database fails; `None` when
    /// `cancel` fires first, also while a read hangs on the database.
    pub(crate) async fn load_start(
        &self,
        cancel: &CancellationToken,
    ) -> Result<Option<Loaded>, ProducerError> {
        let mut retry = Retry::new("load_checkpoint", self.backoff);
        let mut fault = None;
        loop {
            let load = self.checkpoints.load(&self.stream);
            let Some(loaded) = cancel.run_until_cancelled(load).await else {
                return Ok(None);
            };
            match loaded {
                Ok(Some(cp)) => {
                    let start = match cp.resume_token {
                        Some(token) => {
                            tracing::info!(stream = %self.stream, wall_time = ?cp.wall_time, events = cp.events, "resuming after the checkpoint");
                            Start::After(token)
                        }
                        None => Start::Recover,
                    };
                    return Ok(Some(Loaded {
                        start,
                        saved_wall: cp.wall_time,
                        published_before: cp.events,
                    }));
                }
                Ok(None) => {
                    let mode = self.cfg.producer.start_at();
                    tracing::info!(stream = %self.stream, start_at = %self.cfg.producer.start_at, "no checkpoint: applying the start mode");
                    return Ok(Some(Loaded {
                        start: Start::Mode(mode),
                        saved_wall: None,
                        published_before: 0,
                    }));
                }
                Err(e) if e.is_retryable() => {
                    self.readiness.hold(&mut fault, dependency::MONGODB);
                    if !retry.pause(checkpointer::reason(&e), &e, cancel).await {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Saves the position a fresh stream starts at as the checkpoint, before reading. A save
    /// cancelled by shutdown (also one hanging on the database) leaves the stream without a
    /// checkpoint, so the next term applies the start mode again: nothing was published yet.
    pub(crate) async fn save_first_position(
        &self,
        source: &Source,
        epoch: i64,
        cancel: &CancellationToken,
    ) -> Result<FirstPosition, ProducerError> {
        let Some(token) = source.current_position().await else {
            return Ok(FirstPosition::Cancelled);
        };
        let mut cp = Checkpoint::new(self.stream.clone());
        cp.resume_token = Some(source::token_doc(&token));
        cp.wall_time = Some(DateTime::now());
        let mut retry = Retry::new("save_checkpoint", self.backoff);
        let mut fault = None;
        loop {
            let save = self.checkpoints.save(&cp, epoch);
            let Some(saved) = cancel.run_until_cancelled(save).await else {
                return Ok(FirstPosition::Cancelled);
            };
            match saved {
                Ok(()) => {
                    tracing::info!(stream = %self.stream, "first position saved before reading");
                    return Ok(FirstPosition::Saved(Start::After(source::token_doc(
                        &token,
                    ))));
                }
                Err(CheckpointError::Fenced { .. }) => return Ok(FirstPosition::Fenced),
                Err(e) if e.is_retryable() => {
                    self.readiness.hold(&mut fault, dependency::MONGODB);
                    if !retry.pause(checkpointer::reason(&e), &e, cancel).await {
                        return Ok(FirstPosition::Cancelled);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
