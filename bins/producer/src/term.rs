//! One term as the active producer: its tasks (reader, publishing workers, checkpointer,
//! lease keeper), how the first of them to end ends the others, and the bounded
//! drain, final save and release at its end.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ordo_core::lease::Lease;
use ordo_core::servicebus::sender::PublisherFactory;
use tokio_util::sync::CancellationToken;

use crate::acks::AckTracker;
use crate::checkpointer::{Checkpointer, CheckpointerEnd};
use crate::config::StartAt;
use crate::dispatch::{self, Acks, Dispatcher, WorkerContext};
use crate::lease_keeper::{LeaseEnd, LeaseKeeper};
use crate::park::Parker;

use crate::source::{Source, SourceError, Start};
use crate::task::{stopped_within, Ended, TaskFailed, TaskKind, TermTasks};
use crate::{Producer, ProducerError};
use ordo_core::readiness::Fault;

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

impl Producer {
    /// One term as the active producer.
    pub(crate) async fn active<F: PublisherFactory>(
        &self,
        lease: Lease,
        factory: Arc<F>,
    ) -> Result<Term, ProducerError> {
        let p = &self.cfg.producer;
        let root = self.shutdown.token.clone();
        // Stops the reader: shutdown or lease lost.
        let stop_reading = root.child_token();
        // Abandons sends at once: lease lost, a failed task, or the drain part of the grace
        // period is over.
        let abandon = CancellationToken::new();

        let Some((start, saved, published_before)) = self.load_start(&stop_reading).await? else {
            self.release(&lease).await;
            return Ok(Term::Stopped);
        };
        let saved_wall = Arc::new(Mutex::new(saved));
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
        let start = match start {
            Start::Mode(StartAt::Now) => {
                match self
                    .save_first_position(&source, lease.epoch, &stop_reading)
                    .await?
                {
                    Some(Ok(start)) => start,
                    Some(Err(term)) => return Ok(term),
                    None => {
                        self.release(&lease).await;
                        return Ok(Term::Stopped);
                    }
                }
            }
            other => other,
        };

        let ctx = WorkerContext {
            dispatcher: dispatcher.clone(),
            acks: acks.clone(),
            readiness: self.readiness.clone(),
            parking: Arc::new(parker),
            backoff: self.backoff,
            abandon: abandon.clone(),
            restarts: Arc::new(AtomicUsize::new(0)),
        };
        let keeper_stop = CancellationToken::new();
        let checkpointer_stop = CancellationToken::new();
        let mut tasks = TermTasks {
            publishers: tokio::spawn(dispatch::supervise(p.senders, factory.clone(), ctx)),
            reader: tokio::spawn(async move { source.run(start).await }),
            keeper: tokio::spawn(
                LeaseKeeper {
                    leases: self.leases.clone(),
                    lease: lease.clone(),
                    backoff: self.backoff,
                    readiness: self.readiness.clone(),
                    on_lost: vec![stop_reading.clone(), abandon.clone()],
                }
                .run(keeper_stop.clone()),
            ),
            checkpointer: tokio::spawn(
                Checkpointer {
                    store: self.checkpoints.clone(),
                    stream: self.stream.clone(),
                    epoch: lease.epoch,
                    acks: acks.clone(),
                    saved_wall,
                    published_before,
                    every: p.checkpoint_every_events,
                    interval: p.checkpoint_interval,
                    idle_interval: p.idle_checkpoint_interval,
                    stuck_after: p.checkpoint_stuck_after,
                    readiness: self.readiness.clone(),
                }
                .run(checkpointer_stop.clone()),
            ),
            stop_reading,
            abandon,
            stop_checkpointer: checkpointer_stop,
            stop_keeper: keeper_stop,
        };
        let (which, ended) = tasks.first_to_end().await;

        let read_result = match ended {
            Ended::Reader(r) => r,
            Ended::Lost(_) | Ended::Failed(_) => {
                let kept = tasks.stop_after(which).await;
                return match (ended, kept) {
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
                };
            }
        };
        let stopping = root.is_cancelled() || read_result.is_err();
        self.finish(tasks, &dispatcher, read_result, stopping).await
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
            mut publishers,
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
        let drained = tokio::time::timeout(drain_for, &mut publishers).await;
        let worker_result = match drained {
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
        let worker_error = match worker_result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(ProducerError::from(e)),
            Err(e) => Some(TaskFailed::joined(TaskKind::Publishers, e).into()),
        };

        // Both bounded: a save or renewal in flight may wait on a hung database.
        stop_checkpointer.cancel();
        let cp_end =
            stopped_within(TaskKind::Checkpointer, checkpointer, grace.mul_f64(0.1)).await?;
        stop_keeper.cancel();
        let lease_end = stopped_within(TaskKind::LeaseKeeper, keeper, grace.mul_f64(0.1)).await?;

        let (mut cp, lease) = match (cp_end, lease_end) {
            (Some(CheckpointerEnd::Stopped(cp)), Some(LeaseEnd::Stopped(lease))) => (cp, lease),
            (_, lease_end) => {
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
                return Ok(Term::Lost(fault));
            }
        };
        // The final save, over what was acknowledged.
        let saved = tokio::time::timeout(grace.mul_f64(0.2), cp.save_until_done()).await;
        if saved.is_err() {
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
}
