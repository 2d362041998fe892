//! One term as the active producer: its tasks (reader, publishing workers, checkpointer,
//! lease keeper), how the first of them to end ends the others, and the bounded
//! drain, final save and release at its end.
//!
//! The tasks are spawned on the daemon's shutdown tracker, so its drain waits for them too,
//! but the term keeps their handles: it stops them one after another and needs what they hand
//! back (the checkpointer's state for the final save, the lease to release).

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mongodb::bson::DateTime;
use ordo_core::lease::Lease;
use ordo_core::readiness::Fault;
use ordo_core::servicebus::sender::PublisherFactory;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::acks::{AckTracker, Acks};
use crate::checkpointer::{Checkpointer, CheckpointerEnd};
use crate::config::StartAt;
use crate::dispatch::{self, Dispatcher, WorkerContext, WorkerError};
use crate::lease_keeper::{LeaseEnd, LeaseKeeper};
use crate::park::Parker;
use crate::source::{Source, SourceError, Start};
use crate::start::{FirstPosition, Loaded};
use crate::task::{stopped_within, Ended, TaskFailed, TaskKind, TermTasks};
use crate::{Producer, ProducerError};

/// How an active term ended.
pub(crate) enum Term {
    /// Shutdown requested; the lease was released.
    Stopped,
    /// The lease was taken over or could not be renewed in time. A lease that ran out because
    /// the database stopped answering brings the fault its renewals held: the standby loop keeps
    /// it until the database answers, so the end of the term's own faults does not read as a
    /// recovery.
    Lost(Option<Fault>),
}

/// What a term's tasks share, made before they start.
struct Parts {
    /// Stops the reader: shutdown or lease lost.
    stop_reading: CancellationToken,
    /// Abandons sends at once: lease lost, a failed task, or the drain part of the grace
    /// period is over.
    abandon: CancellationToken,
    acks: Acks,
    dispatcher: Arc<Dispatcher>,
    parker: Parker,
    source: Source,
    /// Wall time of the last saved checkpoint.
    saved_wall: Option<DateTime>,
    /// Events published before this term.
    published_before: u64,
}

impl Producer {
    /// One term as the active producer.
    pub(crate) async fn active<F: PublisherFactory>(
        &self,
        lease: Lease,
        factory: Arc<F>,
    ) -> Result<Term, ProducerError> {
        let stop_reading = self.shutdown.token.child_token();
        let Some(loaded) = self.load_start(&stop_reading).await? else {
            self.release(&lease).await;
            return Ok(Term::Stopped);
        };
        let parts = self.parts(stop_reading, &loaded);
        let start = match loaded.start {
            Start::Mode(StartAt::Now) => {
                match self
                    .save_first_position(&parts.source, lease.epoch, &parts.stop_reading)
                    .await?
                {
                    FirstPosition::Saved(start) => start,
                    FirstPosition::Fenced => return Ok(Term::Lost(None)),
                    FirstPosition::Cancelled => {
                        self.release(&lease).await;
                        return Ok(Term::Stopped);
                    }
                }
            }
            other => other,
        };
        let dispatcher = parts.dispatcher.clone();
        let mut tasks = self.spawn_tasks(factory, &lease, parts, start);
        match tasks.first_to_end().await {
            (_, Ended::Reader(read_result)) => {
                let stopping = self.shutdown.token.is_cancelled() || read_result.is_err();
                self.finish(tasks, &dispatcher, read_result, stopping).await
            }
            (which, ended) => self.ended_early(tasks, which, ended).await,
        }
    }

    /// The queues, the tracker, the parker and the reader of a term starting from `loaded`.
    fn parts(&self, stop_reading: CancellationToken, loaded: &Loaded) -> Parts {
        let p = &self.cfg.producer;
        let abandon = CancellationToken::new();
        let acks: Acks = Arc::new(Mutex::new(AckTracker::bounded(p.max_unacknowledged)));
        let dispatcher = Dispatcher::new(
            p.max_in_flight_messages,
            p.max_in_flight_bytes,
            p.max_batch_messages,
        );
        let parker = Parker::new(
            &self.db,
            self.stream.clone(),
            self.backoff,
            self.readiness.clone(),
            abandon.clone(),
        );
        let source = Source::new(
            self.cfg.clone(),
            &self.db,
            self.stream.clone(),
            dispatcher.clone(),
            acks.clone(),
            parker.clone(),
            self.readiness.clone(),
            stop_reading.clone(),
        );
        Parts {
            stop_reading,
            abandon,
            acks,
            dispatcher,
            parker,
            source,
            saved_wall: loaded.saved_wall,
            published_before: loaded.published_before,
        }
    }

    /// Starts the reader (from `start`), the publishing workers, the lease keeper and the
    /// checkpointer on the shutdown tracker.
    fn spawn_tasks<F: PublisherFactory>(
        &self,
        factory: Arc<F>,
        lease: &Lease,
        parts: Parts,
        start: Start,
    ) -> TermTasks {
        let p = &self.cfg.producer;
        let tracker = &self.shutdown.tracker;
        let ctx = WorkerContext {
            dispatcher: parts.dispatcher,
            acks: parts.acks.clone(),
            readiness: self.readiness.clone(),
            parking: Arc::new(parts.parker),
            backoff: self.backoff,
            abandon: parts.abandon.clone(),
            restarts: Arc::new(AtomicUsize::new(0)),
        };
        let keeper = LeaseKeeper {
            leases: self.leases.clone(),
            lease: lease.clone(),
            backoff: self.backoff,
            readiness: self.readiness.clone(),
            on_lost: vec![parts.stop_reading.clone(), parts.abandon.clone()],
        };
        let checkpointer = Checkpointer {
            store: self.checkpoints.clone(),
            stream: self.stream.clone(),
            epoch: lease.epoch,
            acks: parts.acks,
            saved_wall: parts.saved_wall,
            published_before: parts.published_before,
            every: p.checkpoint_every_events,
            interval: p.checkpoint_interval,
            idle_interval: p.idle_checkpoint_interval,
            stuck_after: p.checkpoint_stuck_after,
            readiness: self.readiness.clone(),
        };
        let stop_keeper = CancellationToken::new();
        let stop_checkpointer = CancellationToken::new();
        let source = parts.source;
        TermTasks {
            publishers: tracker.spawn(dispatch::supervise(p.senders, factory, ctx)),
            reader: tracker.spawn(async move { source.run(start).await }),
            keeper: tracker.spawn(keeper.run(stop_keeper.clone())),
            checkpointer: tracker.spawn(checkpointer.run(stop_checkpointer.clone())),
            stop_reading: parts.stop_reading,
            abandon: parts.abandon,
            stop_checkpointer,
            stop_keeper,
        }
    }

    /// After a task other than the reader ended the term (the lease lost, a task failed):
    /// stops the others at once and releases the lease if it is still ours.
    async fn ended_early(
        &self,
        tasks: TermTasks,
        which: TaskKind,
        ended: Ended,
    ) -> Result<Term, ProducerError> {
        let kept = tasks.stop_after(which).await;
        match (ended, kept) {
            (Ended::Failed(e), kept) => {
                tracing::error!(task = %which, error = %e, "a task of the term failed: stopping");
                if let Some(LeaseEnd::Stopped(lease)) = kept {
                    self.release(&lease).await;
                }
                Err(e)
            }
            (_, Some(LeaseEnd::Expired(fault))) => Ok(Term::Lost(Some(fault))),
            (Ended::Lost(fault), _) => Ok(Term::Lost(fault)),
            (Ended::Reader(_), _) => Ok(Term::Lost(None)),
        }
    }

    /// The end of a term whose reader stopped (shutdown, or a halt): drains the publishers
    /// within a share of the grace period, saves the checkpoint over what was acknowledged and
    /// releases the lease.
    async fn finish(
        &self,
        tasks: TermTasks,
        dispatcher: &Dispatcher,
        read_result: Result<(), SourceError>,
        stopping: bool,
    ) -> Result<Term, ProducerError> {
        let TermTasks {
            publishers,
            checkpointer,
            keeper,
            abandon,
            stop_checkpointer,
            stop_keeper,
            ..
        } = tasks;
        dispatcher.close();
        // Drain what was read, bounded by a share of the grace period (the rest is for the
        // last checkpoint and the lease release); abandon what is left.
        let grace = self.cfg.shutdown.grace_period;
        let drain_for = if abandon.is_cancelled() {
            Duration::ZERO
        } else {
            grace.mul_f64(0.6)
        };
        let worker_error = drain_publishers(publishers, dispatcher, &abandon, drain_for).await;

        // Both bounded: a save or renewal in flight may wait on a hung database.
        stop_checkpointer.cancel();
        let cp_end =
            stopped_within(TaskKind::Checkpointer, checkpointer, grace.mul_f64(0.1)).await?;
        stop_keeper.cancel();
        let lease_end = stopped_within(TaskKind::LeaseKeeper, keeper, grace.mul_f64(0.1)).await?;
        let (mut cp, lease) = match (cp_end, lease_end) {
            (Some(CheckpointerEnd::Stopped(cp)), Some(LeaseEnd::Stopped(lease))) => (cp, lease),
            (_, lease_end) => return self.nothing_to_save(lease_end, read_result).await,
        };
        // The final save, over what was acknowledged.
        let saved = tokio::time::timeout(grace.mul_f64(0.2), cp.save_until_done(self.backoff));
        if saved.await.is_err() {
            tracing::error!(stream = %self.stream, "final checkpoint could not be saved within the grace period");
        }
        self.release(&lease).await;
        read_result?;
        if let Some(e) = worker_error {
            return Err(e);
        }
        if !stopping {
            // Cannot happen: the reader only ends on cancel or error.
            return Ok(Term::Lost(None));
        }
        Ok(Term::Stopped)
    }

    /// The end of a term whose checkpointer or lease keeper did not hand back what the final
    /// save needs: the lease is released when it is still ours, nothing more is saved.
    async fn nothing_to_save(
        &self,
        lease_end: Option<LeaseEnd>,
        read_result: Result<(), SourceError>,
    ) -> Result<Term, ProducerError> {
        let fault = match lease_end {
            Some(LeaseEnd::Expired(fault)) => Some(fault),
            Some(LeaseEnd::Stopped(lease)) => {
                // Still ours, but nothing more can be saved: let the next holder in.
                self.release(&lease).await;
                None
            }
            _ => None,
        };
        // A halt error is the operator's to see, even when the lease went too.
        read_result?;
        Ok(Term::Lost(fault))
    }
}

/// Waits up to `within` for the publishers to send what was read, then abandons what is left;
/// returns how publishing ended when it was not by draining.
async fn drain_publishers(
    mut publishers: JoinHandle<Result<(), WorkerError>>,
    dispatcher: &Dispatcher,
    abandon: &CancellationToken,
    within: Duration,
) -> Option<ProducerError> {
    let worker_result = match tokio::time::timeout(within, &mut publishers).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(
                queued = dispatcher.queued(),
                "grace period: abandoning unacknowledged sends"
            );
            abandon.cancel();
            publishers.await
        }
    };
    match worker_result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(ProducerError::from(e)),
        Err(e) => Some(TaskFailed::joined(TaskKind::Publishers, e).into()),
    }
}
