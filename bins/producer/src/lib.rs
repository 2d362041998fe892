//! ordo-producer: tails the change stream of the events collection and publishes every event
//! to a partitioned Service Bus topic, keyed by aggregate.
//!
//! Module map:
//! - [`config`]: `[producer]` and the shared sections.
//! - [`acks`]: out-of-order acknowledgements → the contiguous prefix the checkpoint may cover.
//! - [`dispatch`]: per-session queues and the publishing workers (order per session,
//!   concurrency across sessions, bounded in-flight messages and bytes).
//! - [`source`]: change stream, collection scans (`beginning`, lost-history recovery), parking.
//! - this file: the lease loop (standby ↔ active), the checkpointer, shutdown.
//!
//! Life of the process: wait for the stream's lease (standby), then, holding it, load the
//! checkpoint and run reader + workers + checkpointer + lease renewal. Losing the lease abandons
//! all sends at once and goes back to standby. SIGTERM stops the reader, lets the workers drain
//! within the grace period, saves the checkpoint over what was acknowledged and releases the
//! lease.

pub mod acks;
pub mod config;
pub mod dispatch;
pub mod source;

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mongodb::bson::{DateTime, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use mongodb::Database;
use ordo_core::checkpoint::{Checkpoint, CheckpointError, CheckpointStore};
use ordo_core::lease::{Lease, LeaseError, LeaseStore};
use ordo_core::metrics as names;
use ordo_core::retry::Backoff;
use ordo_core::servicebus::sender::{PublisherFactory, ServiceBusPublisherFactory};
use ordo_core::shutdown::Shutdown;
use ordo_core::telemetry::{self, Health};
use tokio_util::sync::CancellationToken;

pub use config::ProducerConfig;

use crate::acks::AckTracker;
use crate::dispatch::{Acks, Dispatcher, WorkerContext, WorkerError};
use crate::source::{Source, SourceError, Start};

/// Where parked (invalid) events are recorded.
pub const PARKED_COLLECTION: &str = "ordo_parked";

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
    /// The client refused a message.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// A checkpoint or lease document is malformed.
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
    let client = ordo_core::mongo::connect(&cfg.mongodb, "ordo-producer").await?;
    let db = client.database(cfg.mongodb.database());
    let factory = Arc::new(ServiceBusPublisherFactory {
        connection_string: cfg.servicebus.connection_string().clone(),
        topic: cfg.servicebus.topic.clone(),
        identifier: format!("ordo-producer-{}", std::process::id()),
        max_batch_bytes: None,
        send_timeout: cfg.producer.send_timeout,
        connect_timeout: cfg.producer.send_timeout,
    });
    health.set_started();
    health.set_ready(true);
    let result = Producer::new(cfg, db, health, shutdown.clone())
        .run(factory)
        .await;
    client.shutdown().await;
    result
}

/// One producer process: the lease loop around the active pipeline.
#[derive(Debug)]
pub struct Producer {
    cfg: Arc<ProducerConfig>,
    db: Database,
    stream: String,
    holder: String,
    health: Arc<Health>,
    shutdown: Shutdown,
    leases: LeaseStore,
    checkpoints: CheckpointStore,
    backoff: Backoff,
}

/// How an active term ended.
enum Term {
    /// Shutdown requested; the lease was released.
    Stopped,
    /// The lease was taken over or could not be renewed in time.
    Lost,
}

impl Producer {
    /// A producer for `cfg` over `db`.
    pub fn new(cfg: ProducerConfig, db: Database, health: Arc<Health>, shutdown: Shutdown) -> Self {
        let stream = cfg.stream();
        let holder = format!(
            "{}:{}:{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into()),
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
            health,
            shutdown,
            backoff,
        }
    }

    /// Standby until the lease is ours, active until it is lost or shutdown.
    pub async fn run<F: PublisherFactory>(&self, factory: Arc<F>) -> Result<(), ProducerError> {
        let cancel = self.shutdown.token.clone();
        loop {
            ::metrics::gauge!(names::LEASE_HELD).set(0.0);
            let Some(lease) = self.acquire(&cancel).await? else {
                return Ok(());
            };
            ::metrics::gauge!(names::LEASE_HELD).set(1.0);
            tracing::info!(stream = %self.stream, holder = %self.holder, epoch = lease.epoch, "active: publishing");
            match self.active(lease, factory.clone()).await? {
                Term::Stopped => {
                    ::metrics::gauge!(names::LEASE_HELD).set(0.0);
                    return Ok(());
                }
                Term::Lost => {
                    tracing::warn!(stream = %self.stream, holder = %self.holder, "lease lost: publishing stopped, back to standby");
                }
            }
        }
    }

    /// Polls the lease until acquired; `None` on shutdown.
    ///
    /// Readiness stays true meanwhile: `/readyz` means "able to work or to stand by", so a
    /// two-replica Deployment becomes Available and rolling updates do not stall on the standby
    /// (deploy/k8s/base/producer.yaml). Holding the lease is shown by the `ordo_lease_held` gauge.
    async fn acquire(&self, cancel: &CancellationToken) -> Result<Option<Lease>, ProducerError> {
        let ttl = self.cfg.producer.lease_ttl;
        let poll = (ttl / 5).max(Duration::from_millis(100));
        let mut delays = self.backoff.delays();
        let mut announced = false;
        loop {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            let wait = match self
                .leases
                .try_acquire(&self.stream, &self.holder, ttl)
                .await
            {
                Ok(Some(lease)) => match self.checkpoints.claim(&self.stream, lease.epoch).await {
                    Ok(()) => return Ok(Some(lease)),
                    Err(CheckpointError::Fenced { .. }) => poll,
                    Err(e) if e.is_retryable() => {
                        self.retry_delay(&mut delays, "claim_checkpoint", &e)
                    }
                    Err(e) => return Err(ProducerError::State(e.to_string())),
                },
                Ok(None) => {
                    if !announced {
                        announced = true;
                        tracing::info!(stream = %self.stream, holder = %self.holder, "standby: another producer holds the lease");
                    }
                    poll
                }
                Err(e) if e.is_retryable() => self.retry_delay(&mut delays, "acquire_lease", &e),
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
        ::metrics::counter!(names::RETRIES, "op" => op).increment(1);
        tracing::warn!(op, delay_ms = delay.as_millis() as u64, error = %e, "retrying");
        delay
    }

    async fn load_start(
        &self,
        cancel: &CancellationToken,
    ) -> Result<Option<(Start, Option<DateTime>, u64)>, ProducerError> {
        let mut delays = self.backoff.delays();
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
                        None => {
                            let since = wall.unwrap_or_else(DateTime::now);
                            (Start::Recover { since }, wall, events)
                        }
                    }));
                }
                Ok(None) => {
                    let mode = self.cfg.producer.start_at();
                    tracing::info!(stream = %self.stream, start_at = %self.cfg.producer.start_at, "no checkpoint: applying the start mode");
                    return Ok(Some((Start::Mode(mode), None, 0)));
                }
                Err(e) if e.is_retryable() => {
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
        // Abandons sends at once: lease lost, or the drain part of the grace period is over.
        let abandon = CancellationToken::new();
        let lost = CancellationToken::new();

        let Some((start, saved, published_before)) = self.load_start(&stop_reading).await? else {
            self.release(&lease).await;
            return Ok(Term::Stopped);
        };
        let saved_wall = Arc::new(Mutex::new(saved));
        let acks: Acks = Arc::new(Mutex::new(AckTracker::new()));
        let dispatcher = Dispatcher::new(
            p.max_in_flight_messages,
            p.max_in_flight_bytes,
            p.max_batch_messages,
        );
        let failing = Arc::new(AtomicUsize::new(0));
        self.health.set_ready(true);

        let ctx = WorkerContext {
            dispatcher: dispatcher.clone(),
            acks: acks.clone(),
            health: self.health.clone(),
            failing: failing.clone(),
            backoff: self.backoff,
            abandon: abandon.clone(),
        };
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..p.senders {
            workers.spawn(dispatch::worker(factory.clone(), ctx.clone()));
        }

        let source = Source::new(
            self.cfg.clone(),
            &self.db,
            self.stream.clone(),
            dispatcher.clone(),
            acks.clone(),
            saved_wall.clone(),
            self.health.clone(),
            failing.clone(),
            stop_reading.clone(),
        );
        let reader = tokio::spawn(async move { source.run(start).await });

        // Lease renewal at ttl/3; a takeover or a lease that runs out unrenewed ends the term.
        let renewer = {
            let leases = self.leases.clone();
            let lease = lease.clone();
            let lost = lost.clone();
            let stop = stop_reading.clone();
            let abandon = abandon.clone();
            let backoff = self.backoff;
            let done = CancellationToken::new();
            let done_inner = done.clone();
            let handle = tokio::spawn(async move {
                let mut lease = lease;
                let every = lease.ttl / 3;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = done_inner.cancelled() => return lease,
                    }
                    let mut delays = backoff.delays();
                    loop {
                        match leases.renew(&lease).await {
                            Ok(l) => {
                                lease = l;
                                break;
                            }
                            Err(LeaseError::Lost { .. }) => {
                                lost.cancel();
                                stop.cancel();
                                abandon.cancel();
                                return lease;
                            }
                            Err(e) => {
                                if lease.is_expired() {
                                    tracing::error!(error = %e, "lease expired before it could be renewed: stopping");
                                    lost.cancel();
                                    stop.cancel();
                                    abandon.cancel();
                                    return lease;
                                }
                                let d = delays.next().unwrap_or(backoff.max).min(lease.remaining());
                                ::metrics::counter!(names::RETRIES, "op" => "renew_lease")
                                    .increment(1);
                                tracing::warn!(error = %e, "lease renewal failed, retrying");
                                tokio::time::sleep(d).await;
                            }
                        }
                    }
                }
            });
            (handle, done)
        };

        let checkpointer = {
            let this = Checkpointer {
                store: self.checkpoints.clone(),
                stream: self.stream.clone(),
                epoch: lease.epoch,
                acks: acks.clone(),
                saved_wall: saved_wall.clone(),
                published_before,
                every: p.checkpoint_every_events,
                interval: p.checkpoint_interval,
            };
            let stop = CancellationToken::new();
            let stop_inner = stop.clone();
            let lost = lost.clone();
            let stop_reading = stop_reading.clone();
            let abandon = abandon.clone();
            let handle = tokio::spawn(async move {
                let mut this = this;
                let mut last = Instant::now();
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                        _ = stop_inner.cancelled() => return this,
                    }
                    let due = {
                        let a = this.acks.lock().expect("ack lock");
                        a.advanced_by() >= this.every || last.elapsed() >= this.interval
                    };
                    if due {
                        last = Instant::now();
                        if let Err(CheckpointError::Fenced { .. }) = this.save().await {
                            lost.cancel();
                            stop_reading.cancel();
                            abandon.cancel();
                            return this;
                        }
                    }
                    this.age();
                }
            });
            (handle, stop)
        };

        // Wait for the reader: it ends on shutdown, lease loss, or a halt.
        let read_result = match reader.await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "reader task failed");
                Ok(())
            }
        };
        let stopping = root.is_cancelled() || read_result.is_err();
        dispatcher.close();

        // Drain what was read, bounded by a share of the grace period (the rest is for the
        // last checkpoint and the lease release); abandon what is left.
        let grace = self.cfg.shutdown.grace_period;
        let drain_for = if lost.is_cancelled() {
            Duration::ZERO
        } else {
            grace.mul_f64(0.6)
        };
        let mut worker_error = None;
        let drained = tokio::time::timeout(drain_for, async {
            while let Some(r) = workers.join_next().await {
                if let Ok(Err(e)) = r {
                    worker_error.get_or_insert(e);
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                queued = dispatcher.queued(),
                "grace period: abandoning unacknowledged sends"
            );
            abandon.cancel();
            while workers.join_next().await.is_some() {}
        }

        checkpointer.1.cancel();
        let mut cp = checkpointer
            .0
            .await
            .map_err(|e| ProducerError::State(e.to_string()))?;
        renewer.1.cancel();
        let lease = renewer
            .0
            .await
            .map_err(|e| ProducerError::State(e.to_string()))?;
        self.health.set_ready(!stopping);

        if lost.is_cancelled() {
            return Ok(Term::Lost);
        }
        // The final save, over what was acknowledged.
        let saved = tokio::time::timeout(grace.mul_f64(0.3), cp.save_until_done()).await;
        if saved.is_err() {
            tracing::error!(stream = %self.stream, "final checkpoint could not be saved within the grace period");
        }
        self.release(&lease).await;
        ::metrics::gauge!(names::LEASE_HELD).set(0.0);
        read_result?;
        if let Some(e) = worker_error {
            return Err(e.into());
        }
        if !stopping {
            // Cannot happen: the reader only ends on cancel or error.
            return Ok(Term::Lost);
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

/// Saves the acknowledged prefix, throttled by time and count.
#[derive(Debug)]
struct Checkpointer {
    store: CheckpointStore,
    stream: String,
    epoch: i64,
    acks: Acks,
    saved_wall: Arc<Mutex<Option<DateTime>>>,
    /// Events published before this term (from the loaded checkpoint); the saved count is this
    /// plus the events the tracker counted up to the saved position.
    published_before: u64,
    every: u64,
    interval: Duration,
}

impl Checkpointer {
    async fn save(&mut self) -> Result<(), CheckpointError> {
        let taken = self.acks.lock().expect("ack lock").take();
        let Some((position, events)) = taken else {
            return Ok(());
        };
        let mut cp = Checkpoint::new(self.stream.clone());
        cp.resume_token = Some(source::token_doc(&position.token));
        cp.cluster_time = position.cluster_time;
        cp.wall_time = Some(position.wall_time);
        cp.events = self.published_before + events;
        match self.store.save(&cp, self.epoch).await {
            Ok(()) => {
                *self.saved_wall.lock().expect("saved wall lock") = Some(position.wall_time);
                ::metrics::counter!(names::CHECKPOINTS_SAVED).increment(1);
                tracing::debug!(stream = %self.stream, wall_time = %position.wall_time, "checkpoint saved");
                Ok(())
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
                tracing::warn!(stream = %self.stream, error = %e, "checkpoint save failed, will retry");
                self.acks
                    .lock()
                    .expect("ack lock")
                    .restore(position, events);
                Err(e)
            }
        }
    }

    /// Saves until the newest acknowledged position is stored or refused for good.
    async fn save_until_done(&mut self) {
        loop {
            match self.save().await {
                Ok(()) => return,
                Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(_) => return,
            }
        }
    }

    fn age(&self) {
        if let Some(wall) = *self.saved_wall.lock().expect("saved wall lock") {
            let age =
                (DateTime::now().timestamp_millis() - wall.timestamp_millis()) as f64 / 1000.0;
            ::metrics::gauge!(names::CHECKPOINT_AGE).set(age.max(0.0));
        }
    }
}
