//! ordo-producer: tails the change stream of the events collection and publishes every event
//! to a partitioned Service Bus topic, keyed by aggregate.
//!
//! Module map:
//! - [`config`]: `[producer]` and the shared sections.
//! - [`acks`]: out-of-order acknowledgements → the contiguous prefix the checkpoint may cover.
//! - [`dispatch`]: per-session queues and the publishing workers (order per session,
//!   concurrency across sessions, bounded in-flight messages and bytes).
//! - [`source`]: change stream, collection scans (`beginning`, lost-history recovery).
//! - [`park`]: `ordo_parked`, for events that cannot be published.
//! - [`checkpointer`]: when the acknowledged prefix is saved; a prefix that stops moving.
//! - [`lease_keeper`]: renewing the lease while active.
//! - [`readiness`]: what `/readyz` says, per failing dependency.
//! - [`task`]: the tasks of a term and what their early end means.
//! - `index_check`: the events collection's unique index, checked at start and every minute.
//! - `probe`: the broker probe that keeps `/readyz` honest while nothing is sent.
//! - this file: the lease loop (standby ↔ active), the term's tasks, shutdown.
//!
//! Life of the process: wait for the stream's lease (standby), then, holding it, load the
//! checkpoint (saving the first position before reading, when there is none) and run reader +
//! workers + checkpointer + lease keeper + broker probe. Losing the lease abandons all sends at
//! once and goes back to standby. SIGTERM stops the reader, lets the workers drain within the
//! grace period, saves the checkpoint over what was acknowledged and releases the lease. Any
//! task of the term that fails or panics (other than a publishing worker, which is restarted)
//! stops the producer with an error: the process exits non-zero.

pub mod acks;
pub mod checkpointer;
pub mod config;
pub mod dispatch;
mod index_check;
pub mod lease_keeper;
pub mod park;
mod probe;
pub mod readiness;
pub mod source;
pub mod task;

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mongodb::bson::{DateTime, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use mongodb::Database;
use ordo_core::checkpoint::{Checkpoint, CheckpointError, CheckpointStore};
use ordo_core::lease::{Lease, LeaseStore};
use ordo_core::metrics as names;
use ordo_core::retry::Backoff;
use ordo_core::servicebus::sender::{
    ModalPublisherFactory, PublisherFactory, ServiceBusPublisherFactory,
};
use ordo_core::shutdown::Shutdown;
use ordo_core::telemetry::{self, Health};
use tokio_util::sync::CancellationToken;

pub use config::ProducerConfig;

use crate::acks::AckTracker;
use crate::checkpointer::{Checkpointer, CheckpointerEnd};
use crate::config::StartAt;
use crate::dispatch::{Acks, Dispatcher, WorkerContext, WorkerError};
use crate::lease_keeper::{LeaseEnd, LeaseKeeper};
use crate::park::Parker;
use crate::readiness::{dependency, Fault, Readiness};
use crate::source::{Source, SourceError, Start};
use crate::task::{stopped_within, AbortOnDrop, Ended, TaskFailed, TaskKind, TermTasks};

pub use park::PARKED_COLLECTION;

/// A stream position the checkpoint can point at.
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    /// Resume token, for `startAfter`; turned into a document only when a checkpoint is saved.
    pub token: ResumeToken,
    /// Cluster time of the event, when the position is an event.
    pub cluster_time: Option<Timestamp>,
    /// Wall time of the event (or of the read, for idle and scan markers).
    pub wall_time: DateTime,
}

#[cfg(test)]
impl Position {
    fn test(i: u64) -> Self {
        Position {
            token: mongodb::bson::from_document(mongodb::bson::doc! { "_data": i.to_string() })
                .expect("a resume token"),
            cluster_time: None,
            wall_time: DateTime::from_millis(i as i64),
        }
    }
}

/// Why the producer stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// The health server could not bind.
    #[error("telemetry server: {0}")]
    Telemetry(#[from] std::io::Error),
    /// The database client could not be created (bad URI options).
    #[error("mongodb: {0}")]
    Mongo(#[from] mongodb::error::Error),
    /// An invalid event with `on_invalid = "halt"`.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Publishing cannot go on (a refused message could not be parked).
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// A task of the term failed or panicked.
    #[error(transparent)]
    Task(#[from] TaskFailed),
    /// A checkpoint or lease document is malformed, or a save was refused for good.
    #[error("state: {0}")]
    State(String),
}

/// Runs the producer until SIGTERM/SIGINT.
pub async fn run(cfg: ProducerConfig) -> Result<(), ProducerError> {
    telemetry::init_logging(&cfg.telemetry);
    let recorder = telemetry::install_recorder();
    let shutdown = Shutdown::new();
    shutdown.listen_for_signals();
    let health = Health::new();
    telemetry::serve(
        cfg.telemetry.listen,
        health.clone(),
        Some(recorder),
        shutdown.token.clone(),
    )
    .await?;
    cfg.producer.warn_deprecated();
    let client = ordo_core::mongo::connect(&cfg.mongodb, "ordo-producer").await?;
    let db = client.database(cfg.mongodb.database());
    let factory = Arc::new(ModalPublisherFactory::new(
        ServiceBusPublisherFactory {
            connection_string: cfg.servicebus.connection_string().clone(),
            topic: cfg.servicebus.topic.clone(),
            identifier: format!("ordo-producer-{}", std::process::id()),
            max_batch_bytes: None,
            send_timeout: cfg.producer.send_timeout,
            connect_timeout: cfg.producer.send_timeout,
        },
        cfg.producer.send_mode,
    ));
    health.set_started();
    tokio::spawn(index_check::check_event_index(
        db.clone(),
        cfg.mongodb.clone(),
        cfg.producer.retry_max,
        shutdown.token.clone(),
    ));
    let result = Producer::new(cfg, db, health, shutdown.clone())
        .run(factory)
        .await;
    if let Err(e) = &result {
        tracing::error!(error = %e, "producer stopped");
    }
    // Ends server sessions and cursors; bounded, because a hung database never answers.
    if tokio::time::timeout(Duration::from_secs(2), client.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("mongodb client shutdown did not finish within 2 s");
    }
    result
}

/// One producer process: the lease loop around the active pipeline.
#[derive(Debug)]
pub struct Producer {
    cfg: Arc<ProducerConfig>,
    db: Database,
    stream: String,
    holder: String,
    readiness: Arc<Readiness>,
    shutdown: Shutdown,
    leases: LeaseStore,
    checkpoints: CheckpointStore,
    backoff: Backoff,
}

/// How an active term ended.
enum Term {
    /// Shutdown requested; the lease was released.
    Stopped,
    /// The lease was taken over or could not be renewed in time. A lease that ran out because
    /// the database stopped answering brings the fault its renewals held: the standby loop keeps
    /// it until the database answers, so the end of the term's own faults does not read as a
    /// recovery.
    Lost(Option<Fault>),
}

impl Producer {
    /// A producer for `cfg` over `db`.
    pub fn new(cfg: ProducerConfig, db: Database, health: Arc<Health>, shutdown: Shutdown) -> Self {
        let stream = cfg.stream();
        let holder = format!(
            "{}:{}:{}",
            ordo_core::status::host_name(),
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        );
        let backoff = Backoff {
            initial: cfg.producer.retry_initial,
            max: cfg.producer.retry_max,
        };
        Self {
            leases: LeaseStore::new(&db, ordo_core::lease::DEFAULT_COLLECTION),
            checkpoints: CheckpointStore::new(&db, ordo_core::checkpoint::DEFAULT_COLLECTION),
            cfg: Arc::new(cfg),
            db,
            stream,
            holder,
            readiness: Readiness::new(health),
            shutdown,
            backoff,
        }
    }

    /// Standby until the lease is ours, active until it is lost or shutdown.
    pub async fn run<F: PublisherFactory>(&self, factory: Arc<F>) -> Result<(), ProducerError> {
        let cancel = self.shutdown.token.clone();
        // `/readyz` follows the database on its own clock: the term's operations can wait
        // much longer on a hung server than the 10 s readiness promises.
        let probe = ordo_core::mongo::connect_probe(&self.cfg.mongodb, "ordo-producer").await?;
        let _pings = AbortOnDrop(tokio::spawn({
            let readiness = self.readiness.clone();
            let mut fault = None;
            let db = probe.database(self.cfg.mongodb.database());
            ordo_core::mongo::probe(db, cancel.clone(), move |reachable| {
                if reachable {
                    fault = None;
                } else {
                    readiness.hold(&mut fault, dependency::MONGODB);
                }
            })
        }));
        let mut carried = None;
        loop {
            ::metrics::gauge!(names::LEASE_HELD).set(0.0);
            let Some(lease) = self.acquire(&cancel, carried.take()).await? else {
                return Ok(());
            };
            ::metrics::gauge!(names::LEASE_HELD).set(1.0);
            tracing::info!(stream = %self.stream, holder = %self.holder, epoch = lease.epoch, "active: publishing");
            let term = self.active(lease, factory.clone()).await;
            ::metrics::gauge!(names::LEASE_HELD).set(0.0);
            match term? {
                Term::Stopped => return Ok(()),
                Term::Lost(fault) => {
                    tracing::warn!(stream = %self.stream, holder = %self.holder, database_failing = fault.is_some(), "lease lost: publishing stopped, back to standby");
                    carried = fault;
                }
            }
        }
    }

    /// Polls the lease until acquired; `None` on shutdown.
    ///
    /// Readiness stays true meanwhile unless the database fails: `/readyz` means "able to
    /// work or to stand by", so a two-replica Deployment becomes Available and rolling updates
    /// do not stall on the standby (deploy/k8s/base/producer.yaml). Holding the lease is shown
    /// by the `ordo_lease_held` gauge. `carried` is a database fault from the term before; the
    /// first answer of the database drops it, whatever the answer says about the lease.
    async fn acquire(
        &self,
        cancel: &CancellationToken,
        carried: Option<Fault>,
    ) -> Result<Option<Lease>, ProducerError> {
        let ttl = self.cfg.producer.lease_ttl;
        let poll = (ttl / 5).max(Duration::from_millis(100));
        let mut delays = self.backoff.delays();
        let mut announced = false;
        let mut fault = carried;
        loop {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            // Bounded, so an unreachable database turns readiness off in about a third of the
            // lease rather than after the driver's server-selection timeout.
            let attempt = async {
                match self
                    .leases
                    .try_acquire(&self.stream, &self.holder, ttl)
                    .await
                {
                    Ok(Some(lease)) => Ok(Some((
                        self.checkpoints.claim(&self.stream, lease.epoch).await,
                        lease,
                    ))),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                }
            };
            let bound = (ttl / 3).max(Duration::from_millis(500));
            let Ok(attempted) = tokio::time::timeout(bound, attempt).await else {
                self.readiness.hold(&mut fault, dependency::MONGODB);
                let e = format!("no answer within {bound:?}");
                let d = self.retry_delay(&mut delays, "acquire_lease", &e);
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = cancel.cancelled() => return Ok(None),
                }
                continue;
            };
            let wait = match attempted {
                Ok(Some((claimed, lease))) => match claimed {
                    Ok(()) => return Ok(Some(lease)),
                    Err(CheckpointError::Fenced { .. }) => {
                        fault = None;
                        poll
                    }
                    Err(e) if e.is_retryable() => {
                        self.readiness.hold(&mut fault, dependency::MONGODB);
                        self.retry_delay(&mut delays, "claim_checkpoint", &e)
                    }
                    Err(e) => return Err(ProducerError::State(e.to_string())),
                },
                Ok(None) => {
                    fault = None;
                    if !announced {
                        announced = true;
                        tracing::info!(stream = %self.stream, holder = %self.holder, "standby: another producer holds the lease");
                    }
                    poll
                }
                Err(e) if e.is_retryable() => {
                    self.readiness.hold(&mut fault, dependency::MONGODB);
                    self.retry_delay(&mut delays, "acquire_lease", &e)
                }
                Err(e) => return Err(ProducerError::State(e.to_string())),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return Ok(None),
            }
        }
    }

    fn retry_delay(
        &self,
        delays: &mut impl Iterator<Item = Duration>,
        op: &'static str,
        e: &dyn std::fmt::Display,
    ) -> Duration {
        let delay = delays.next().unwrap_or(self.backoff.max);
        ::metrics::counter!(names::RETRIES, "operation" => op, "reason" => "database").increment(1);
        tracing::warn!(op, delay_ms = delay.as_millis() as u64, error = %e, "retrying");
        delay
    }

    async fn load_start(
        &self,
        cancel: &CancellationToken,
    ) -> Result<Option<(Start, Option<DateTime>, u64)>, ProducerError> {
        let mut delays = self.backoff.delays();
        let mut fault = None;
        loop {
            match self.checkpoints.load(&self.stream).await {
                Ok(Some(cp)) => {
                    let wall = cp.wall_time;
                    let events = cp.events;
                    return Ok(Some(match cp.resume_token {
                        Some(token) => {
                            tracing::info!(stream = %self.stream, wall_time = ?wall, events, "resuming after the checkpoint");
                            (Start::After(token), wall, events)
                        }
                        None => (Start::Recover, wall, events),
                    }));
                }
                Ok(None) => {
                    let mode = self.cfg.producer.start_at();
                    tracing::info!(stream = %self.stream, start_at = %self.cfg.producer.start_at, "no checkpoint: applying the start mode");
                    return Ok(Some((Start::Mode(mode), None, 0)));
                }
                Err(e) if e.is_retryable() => {
                    self.readiness.hold(&mut fault, dependency::MONGODB);
                    let d = self.retry_delay(&mut delays, "load_checkpoint", &e);
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = cancel.cancelled() => return Ok(None),
                    }
                }
                Err(e) => return Err(ProducerError::State(e.to_string())),
            }
        }
    }

    /// Saves the position a fresh stream starts at as the checkpoint, before reading, so a
    /// restart before the first publish resumes here instead of at a new "now". `Ok(None)`
    /// when cancelled; a fenced save comes back as `Some(Err(Term::Lost(None)))`.
    async fn save_first_position(
        &self,
        source: &Source,
        epoch: i64,
        cancel: &CancellationToken,
    ) -> Result<Option<Result<Start, Term>>, ProducerError> {
        let Some(token) = source.current_position().await else {
            return Ok(None);
        };
        let mut cp = Checkpoint::new(self.stream.clone());
        cp.resume_token = Some(source::token_doc(&token));
        cp.wall_time = Some(DateTime::now());
        let mut delays = self.backoff.delays();
        let mut fault = None;
        loop {
            match self.checkpoints.save(&cp, epoch).await {
                Ok(()) => {
                    tracing::info!(stream = %self.stream, "first position saved before reading");
                    return Ok(Some(Ok(Start::After(source::token_doc(&token)))));
                }
                Err(CheckpointError::Fenced { .. }) => return Ok(Some(Err(Term::Lost(None)))),
                Err(e) if e.is_retryable() => {
                    self.readiness.hold(&mut fault, dependency::MONGODB);
                    let d = self.retry_delay(&mut delays, "save_checkpoint", &e);
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = cancel.cancelled() => return Ok(None),
                    }
                }
                Err(e) => return Err(ProducerError::State(e.to_string())),
            }
        }
    }

    /// One term as the active producer.
    async fn active<F: PublisherFactory>(
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
        let probe = AbortOnDrop(tokio::spawn(probe::probe_broker(
            factory,
            self.readiness.clone(),
            p.probe_interval,
        )));

        let (which, ended) = tasks.first_to_end().await;
        drop(probe);

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

    async fn release(&self, lease: &Lease) {
        match tokio::time::timeout(Duration::from_secs(2), self.leases.release(lease)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "lease release failed; it expires on its own"),
            Err(_) => tracing::warn!("lease release timed out; it expires on its own"),
        }
    }
}
