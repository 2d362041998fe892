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
//! - [`task`]: the tasks of a term and what their early end means.
//! - `index_check`: the events collection's unique index, checked at start and every minute.
//! - `probe`: the broker probe that keeps `/readyz` honest while nothing is sent, also in
//!   standby.
//! - `term`: one active term: its tasks, the first to end, the bounded drain and final save.
//! - this file: the lease loop (standby ↔ active), the first position, shutdown.
//!
//! Life of the process: ping MongoDB and probe the broker for `/readyz` throughout; wait for
//! the stream's lease (standby; not taken while the broker refuses this producer), then,
//! holding it, load the checkpoint (saving the first position before reading, when there is
//! none) and run reader + workers + checkpointer + lease keeper. Losing the lease abandons all sends at
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
pub mod source;
pub mod task;
mod term;

use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{DateTime, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use mongodb::Database;
use ordo_core::checkpoint::{Checkpoint, CheckpointError, CheckpointStore};
use ordo_core::lease::{Lease, LeaseStore};
use ordo_core::metrics as names;
use ordo_core::retry::Backoff;
use ordo_core::servicebus::sender::{
    ModalPublisherFactory, PublisherFactory, SenderConnections, ServiceBusPublisherFactory,
};
use ordo_core::shutdown::Shutdown;
use ordo_core::telemetry::{self, Health};
use tokio_util::sync::CancellationToken;

pub use config::ProducerConfig;

use crate::dispatch::WorkerError;
use crate::source::{Source, SourceError, Start};
use crate::task::{AbortOnDrop, TaskFailed};
use crate::term::Term;
use ordo_core::readiness::{dependency, Fault, Readiness};

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
            connections: SenderConnections::shared(
                cfg.producer.connections.unwrap_or(cfg.producer.senders),
            ),
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
    ordo_core::mongo::close(client).await;
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
            readiness: {
                let readiness = Readiness::new();
                readiness.publish_to(health);
                readiness
            },
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
        let _pings = AbortOnDrop(tokio::spawn(ordo_core::mongo::probe(
            probe.database(self.cfg.mongodb.database()),
            cancel.clone(),
            self.readiness.follow(dependency::MONGODB),
        )));
        // The broker too, in standby as well as active: a standby that cannot publish (a wrong
        // key, no route to the namespace) must not look ready, nor take the lease.
        let _broker = AbortOnDrop(tokio::spawn(probe::probe_broker(
            factory.clone(),
            self.readiness.clone(),
            self.cfg.producer.probe_interval,
        )));
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
        let mut broker_announced = false;
        let mut fault = carried;
        loop {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            // A producer the broker refuses would hold the lease and publish nothing, while a
            // standby that can publish waits behind it.
            if self.readiness.failing().contains(&dependency::SERVICEBUS) {
                if !broker_announced {
                    broker_announced = true;
                    tracing::warn!(stream = %self.stream, holder = %self.holder, "standby: Service Bus refuses or does not answer this producer; not taking the lease until it does");
                }
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = cancel.cancelled() => return Ok(None),
                }
                continue;
            }
            broker_announced = false;
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
                        tracing::info!(stream = %self.stream, this_producer = %self.holder, "standby: another producer holds the lease");
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

    async fn release(&self, lease: &Lease) {
        ordo_core::shutdown::last_step("lease release", self.leases.release(lease)).await;
    }
}
