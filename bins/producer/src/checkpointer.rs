//! When and how the acknowledged prefix is saved: throttled by count and time, restored for a
//! retry when a save fails transiently, and watched for a prefix that stops moving.
//!
//! The rules of the stored document (fencing by lease epoch, monotonic within an epoch) are in
//! [`ordo_core::checkpoint`]. A fenced save means another producer took over: the term ends as
//! lost. A save refused for good (a malformed document, a non-transient database error) ends
//! the term with an error: saving nothing while publishing on would grow the replay of every
//! restart without a sign.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mongodb::bson::DateTime;
use ordo_core::checkpoint::{Checkpoint, CheckpointError, CheckpointStore};
use ordo_core::metrics as names;
use ordo_core::retry::{Backoff, Retry};
use tokio_util::sync::CancellationToken;

use crate::acks::Acks;
use crate::source;
use ordo_core::readiness::{dependency, Fault, Readiness};

/// Saves the acknowledged prefix of one term.
#[derive(Debug)]
pub struct Checkpointer {
    /// The store.
    pub store: CheckpointStore,
    /// The stream.
    pub stream: String,
    /// This term's lease epoch (the fence).
    pub epoch: i64,
    /// The prefix.
    pub acks: Acks,
    /// Wall time of the last saved checkpoint.
    pub saved_wall: Option<DateTime>,
    /// Events published before this term (from the loaded checkpoint); the saved count is this
    /// plus the events the tracker counted up to the saved position.
    pub published_before: u64,
    /// Save after this many acknowledged items.
    pub every: u64,
    /// Save at least this often while the prefix moves.
    pub interval: Duration,
    /// Save at least this often while the prefix moves with no event in it.
    pub idle_interval: Duration,
    /// Not ready once items wait this long behind a prefix that does not move.
    pub stuck_after: Duration,
    /// Readiness.
    pub readiness: Arc<Readiness>,
}

/// How the checkpointer's task ended.
#[derive(Debug)]
pub enum CheckpointerEnd {
    /// Asked to stop: the final save is the caller's.
    Stopped(Checkpointer),
    /// Another producer's epoch fenced this one.
    Fenced(Checkpointer),
}

impl Checkpointer {
    /// Saves as due until `stop` fires or the checkpoint is fenced; a permanent save error
    /// ends it with that error.
    pub async fn run(
        mut self,
        stop: CancellationToken,
    ) -> Result<CheckpointerEnd, CheckpointError> {
        let mut last = Instant::now();
        // Published events the last save covered (`None` before the first).
        let mut saved_events = None;
        let mut stuck = Stuck::default();
        let mut db_fault: Option<Fault> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = stop.cancelled() => return Ok(CheckpointerEnd::Stopped(self)),
            }
            let (due, outstanding, advanced) = {
                let a = self.acks.lock().expect("ack lock");
                // Only idle positions since the last save: the longer interval. Not while a
                // save is failing: the retry decides when readiness comes back.
                let idle = a.ready_events().is_some()
                    && a.ready_events() == saved_events
                    && db_fault.is_none();
                let interval = if idle {
                    self.idle_interval.max(self.interval)
                } else {
                    self.interval
                };
                (
                    a.advanced_by() >= self.every || last.elapsed() >= interval,
                    a.outstanding(),
                    a.advanced_by() > 0,
                )
            };
            stuck.observe(outstanding, advanced, self.stuck_after, &self.readiness);
            if due {
                last = Instant::now();
                match self.save().await {
                    Ok(events) => {
                        db_fault = None;
                        saved_events = events.or(saved_events);
                    }
                    Err(CheckpointError::Fenced { .. }) => {
                        return Ok(CheckpointerEnd::Fenced(self))
                    }
                    Err(e) if e.is_retryable() => {
                        self.readiness.hold(&mut db_fault, dependency::MONGODB);
                        // Counted here rather than by a `Retry`: the next attempt comes when
                        // the next save is due (the interval above), not after a backoff, so
                        // readiness returns as soon as the database does. `save` logs it.
                        ::metrics::counter!(names::RETRIES, "operation" => "save_checkpoint", "reason" => reason(&e)).increment(1);
                    }
                    Err(CheckpointError::Backwards { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            self.age();
        }
    }

    /// Saves the newest acknowledged position, if it moved; returns the number of events (of
    /// this term) it covers, `None` when there was nothing to save.
    pub async fn save(&mut self) -> Result<Option<u64>, CheckpointError> {
        let taken = self.acks.lock().expect("ack lock").take();
        let Some((position, events)) = taken else {
            return Ok(None);
        };
        let mut cp = Checkpoint::new(self.stream.clone());
        cp.resume_token = Some(source::token_doc(&position.token));
        cp.cluster_time = position.cluster_time;
        cp.wall_time = Some(position.wall_time);
        cp.events = self.published_before + events;
        match self.store.save(&cp, self.epoch).await {
            Ok(()) => {
                self.saved_wall = Some(position.wall_time);
                ::metrics::counter!(names::CHECKPOINTS_SAVED).increment(1);
                tracing::debug!(stream = %self.stream, wall_time = %position.wall_time, "checkpoint saved");
                Ok(Some(events))
            }
            Err(e @ CheckpointError::Fenced { .. }) => {
                tracing::warn!(stream = %self.stream, error = %e, "checkpoint fenced: another producer took over");
                Err(e)
            }
            Err(e @ CheckpointError::Backwards { .. }) => {
                // The tracker only moves forward; a refusal means the stored one is already
                // further, which is harmless to keep.
                tracing::error!(stream = %self.stream, error = %e, "checkpoint refused as backwards");
                Err(e)
            }
            Err(e) => {
                if e.is_retryable() {
                    tracing::warn!(stream = %self.stream, error = %e, "checkpoint save failed, will retry");
                } else {
                    tracing::error!(stream = %self.stream, error = %e, "checkpoint save refused for good");
                }
                self.acks
                    .lock()
                    .expect("ack lock")
                    .restore(position, events);
                Err(e)
            }
        }
    }

    /// Saves until the newest acknowledged position is stored or refused for good, retrying
    /// with `backoff`; the caller bounds it. Its waits are not cancellable on purpose: it runs
    /// on the way out, after the shutdown token fired, and the caller's deadline is what ends
    /// it.
    pub async fn save_until_done(&mut self, backoff: Backoff) {
        let mut retry = Retry::new("save_checkpoint", backoff);
        loop {
            match self.save().await {
                Ok(_) => return,
                Err(e) if e.is_retryable() => tokio::time::sleep(retry.next(reason(&e), &e)).await,
                Err(_) => return,
            }
        }
    }

    fn age(&self) {
        if let Some(wall) = self.saved_wall {
            let age =
                (DateTime::now().timestamp_millis() - wall.timestamp_millis()) as f64 / 1000.0;
            ::metrics::gauge!(names::CHECKPOINT_AGE).set(age.max(0.0));
        }
    }
}

/// The `reason` of a checkpoint operation's retry.
pub(crate) fn reason(e: &CheckpointError) -> &'static str {
    match e {
        CheckpointError::Mongo(e) => ordo_core::mongo::error_reason(e),
        _ => "refused",
    }
}

/// Watches the prefix: items waiting behind a front that has not moved for `stuck_after`
/// make the producer not ready until it moves again.
#[derive(Debug, Default)]
struct Stuck {
    since: Option<Instant>,
    fault: Option<Fault>,
}

impl Stuck {
    fn observe(
        &mut self,
        outstanding: usize,
        advanced: bool,
        stuck_after: Duration,
        readiness: &Arc<Readiness>,
    ) {
        ::metrics::gauge!(names::UNACKNOWLEDGED).set(outstanding as f64);
        if outstanding == 0 || advanced {
            self.since = None;
        } else {
            self.since.get_or_insert_with(Instant::now);
        }
        let stuck_for = self.since.map_or(Duration::ZERO, |s| s.elapsed());
        ::metrics::gauge!(names::CHECKPOINT_STUCK).set(stuck_for.as_secs_f64());
        if stuck_for >= stuck_after {
            if self.fault.is_none() {
                tracing::error!(
                    outstanding,
                    stuck_s = stuck_for.as_secs(),
                    "the checkpoint cannot advance: an item at the front is not acknowledged"
                );
            }
            readiness.hold(&mut self.fault, dependency::CHECKPOINT);
        } else {
            self.fault = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acks::{AckTracker, Position};
    use ordo_testkit::{wait_until, TestMongo};

    /// An idle save that fails is retried at `checkpoint_interval`, not after the idle
    /// interval: readiness, which the failure turned off, comes back as soon as MongoDB does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_idle_save_is_retried_at_the_checkpoint_interval() {
        let mongo = TestMongo::start().await.unwrap();
        let store = CheckpointStore::new(&mongo.database(), "ordo_checkpoints");
        let acks: Acks = Arc::new(std::sync::Mutex::new(AckTracker::new()));
        let readiness = Readiness::new();
        acks.lock().unwrap().push_acked_marker(Position::test(1));
        let stop = CancellationToken::new();
        let idle_interval = Duration::from_secs(5);
        let task = tokio::spawn(
            Checkpointer {
                store: store.clone(),
                stream: "s".into(),
                epoch: 1,
                acks: acks.clone(),
                saved_wall: None,
                published_before: 0,
                every: 1000,
                interval: Duration::from_millis(100),
                idle_interval,
                stuck_after: Duration::from_secs(600),
                readiness: readiness.clone(),
            }
            .run(stop.clone()),
        );
        let stored = |i: i64| {
            let store = store.clone();
            async move {
                store
                    .load("s")
                    .await
                    .ok()
                    .flatten()
                    .and_then(|cp| cp.wall_time)
                    == Some(DateTime::from_millis(i))
            }
        };
        wait_until(Duration::from_secs(10), || stored(1)).await;
        // The next position adds no event: it waits for the idle interval, and its save fails
        // three times. WriteConflict: transient, and neither retried by the driver nor making
        // it rediscover the server, so each failure is one round trip.
        mongo
            .configure_fail_point(
                "failCommand",
                mongodb::bson::doc! { "mode": { "times": 3 }, "data": { "failCommands": ["update"], "errorCode": 112 } },
            )
            .await
            .unwrap();
        acks.lock().unwrap().push_acked_marker(Position::test(2));
        wait_until(idle_interval * 3, || async {
            readiness.failing().contains(&dependency::MONGODB)
        })
        .await;
        let failed_at = Instant::now();
        wait_until(Duration::from_secs(10), || stored(2)).await;
        let recovered = failed_at.elapsed();
        assert!(
            recovered < idle_interval / 2,
            "the failed idle save was retried after {recovered:?}, not within checkpoint_interval"
        );
        assert!(readiness.failing().is_empty());
        stop.cancel();
        task.await.unwrap().unwrap();
    }
}
