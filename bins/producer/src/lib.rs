//! ordo-producer: tails the change stream of the events collection and publishes every event
//! to a partitioned Service Bus topic, keyed by aggregate.
//!
//! Module map:
//! - [`config`]: `[producer]` and the shared sections.
//! - [`acks`]: out-of-order acknowledgements → the contiguous prefix the checkpoint may cover;
//!   the stream [`Position`].
//! - [`dispatch`]: per-session queues and the publishing workers (order per session,
//!   concurrency across sessions, bounded in-flight messages and bytes).
//! - [`source`]: change stream, collection scans (`beginning`, lost-history recovery).
//! - [`park`]: `ordo_parked`, for events that cannot be published.
//! - [`checkpointer`]: when the acknowledged prefix is saved; a prefix that stops moving.
//! - [`lease_keeper`]: renewing the lease while active.
//! - [`task`]: the tasks of a term and what their early end means.
//! - `standby`: polling the lease until it is ours, and claiming the checkpoint under it.
//! - `start`: where a term starts reading (the checkpoint, or the start mode and the first
//!   position saved before reading).
//! - `term`: one active term: its tasks, the first to end, the bounded drain and final save.
//! - `index_check`: the events collection's unique index, checked at start and every
//!   `index_check_interval`.
//! - `probe`: the broker probe that keeps `/readyz` honest while nothing is sent, also in
//!   standby.
//! - this file: the process (its tasks on the shutdown tracker, the bounded drain at the end)
//!   and the lease loop (standby ↔ active).
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
mod standby;
mod start;
pub mod task;
mod term;

use std::sync::Arc;
use std::time::Duration;

use mongodb::Database;
use ordo_core::checkpoint::CheckpointStore;
use ordo_core::lease::{Lease, LeaseStore};
use ordo_core::metrics as names;
use ordo_core::readiness::{dependency, Readiness};
use ordo_core::retry::Backoff;
use ordo_core::servicebus::sender::{
    ModalPublisherFactory, PublisherFactory, SenderConnections, ServiceBusPublisherFactory,
};
use ordo_core::shutdown::{Drained, Shutdown, LAST_STEP};
use ordo_core::telemetry::{self, Health};
use tokio::task::JoinHandle;
use tokio_util::sync::DropGuard;

pub use acks::Position;
pub use config::ProducerConfig;

use crate::dispatch::WorkerError;
use crate::source::SourceError;
use crate::task::TaskFailed;
use crate::term::Term;

pub use park::PARKED_COLLECTION;

/// Why the producer stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// The health server could not bind. Not `#[from]`: only that bind maps here, so no
    /// other I/O error can pass for it.
    #[error("telemetry server: {0}")]
    Telemetry(#[source] std::io::Error),
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
    /// A lease document is malformed, or a lease operation failed for good.
    #[error(transparent)]
    Lease(#[from] ordo_core::lease::LeaseError),
    /// A checkpoint document is malformed, or a save was refused for good.
    #[error(transparent)]
    Checkpoint(#[from] ordo_core::checkpoint::CheckpointError),
}

/// Runs the producer until SIGTERM/SIGINT.
pub async fn run(cfg: ProducerConfig) -> Result<(), ProducerError> {
    telemetry::init_logging(&cfg.telemetry);
    let shutdown = Shutdown::new();
    shutdown.listen_for_signals();
    let health = telemetry::start(cfg.telemetry.listen, shutdown.token.clone())
        .await
        .map_err(ProducerError::Telemetry)?;
    cfg.producer.warn_deprecated();
    let client = ordo_core::mongo::connect(&cfg.mongodb, "ordo-producer").await?;
    let db = client.database(cfg.mongodb.database());
    let factory = Arc::new(publisher_factory(&cfg));
    health.set_started();
    shutdown.tracker.spawn(index_check::check_event_index(
        db.clone(),
        cfg.mongodb.clone(),
        cfg.producer.index_check_interval,
        cfg.producer.backoff(),
        shutdown.token.clone(),
    ));
    let grace = cfg.shutdown.grace_period;
    let producer = Producer::new(cfg, db, health, shutdown.clone());
    let running = shutdown
        .tracker
        .spawn(async move { producer.run(factory).await });
    let result = stop(&shutdown, running, grace).await;
    if let Err(e) = &result {
        tracing::error!(error = %e, "producer stopped");
    }
    ordo_core::mongo::close(client).await;
    result
}

/// The publishers of the configured topic, in the configured send mode.
fn publisher_factory(cfg: &ProducerConfig) -> ModalPublisherFactory {
    ModalPublisherFactory::new(
        ServiceBusPublisherFactory {
            connection_string: cfg.servicebus.connection_string().clone(),
            topic: cfg.servicebus.topic.clone(),
            identifier: format!("ordo-producer-{}", std::process::id()),
            max_batch_bytes: None,
            send_timeout: cfg.producer.send_timeout,
            connect_timeout: cfg.producer.send_timeout,
            connections: SenderConnections::shared(cfg.producer.connections),
        },
        cfg.producer.send_mode,
    )
}

/// Waits for shutdown or for the producer to stop on its own (an error), stops the rest, and
/// drains the shutdown tracker. Returns how the producer ended.
async fn stop(
    shutdown: &Shutdown,
    mut running: JoinHandle<Result<(), ProducerError>>,
    grace: Duration,
) -> Result<(), ProducerError> {
    let ended = tokio::select! {
        joined = &mut running => Some(joined),
        _ = shutdown.token.cancelled() => None,
    };
    // After an error too: the probes and the index check end with the producer.
    shutdown.token.cancel();
    // The term stops in order within the grace period, then releases the lease (one
    // LAST_STEP); the second LAST_STEP is margin, so the bound never cuts that order short.
    let drained = shutdown.drain(grace + 2 * LAST_STEP).await;
    let joined = match ended {
        Some(joined) => joined,
        None if drained == Drained::Clean => running.await,
        // The drain logged what is still running; the process exits without it.
        None => return Ok(()),
    };
    match joined {
        Ok(result) => result,
        // A panic of the producer is `run`'s own, as when it ran inline; nothing aborts it.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
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
        let backoff = cfg.producer.backoff();
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
        let _probes = self.spawn_probes(&factory).await?;
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

    /// Starts the readiness probes of the database and the broker on the shutdown tracker;
    /// they end at shutdown, or when the returned guard is dropped (when [`Producer::run`]
    /// returns).
    async fn spawn_probes<F: PublisherFactory>(
        &self,
        factory: &Arc<F>,
    ) -> Result<DropGuard, ProducerError> {
        let stop = self.shutdown.token.child_token();
        // `/readyz` follows the database on its own clock: the term's operations can wait
        // much longer on a hung server than the 10 s readiness promises.
        let probe = ordo_core::mongo::connect_probe(&self.cfg.mongodb, "ordo-producer").await?;
        self.shutdown.tracker.spawn(ordo_core::mongo::probe(
            probe.database(self.cfg.mongodb.database()),
            stop.clone(),
            self.readiness.follow(dependency::MONGODB),
        ));
        // The broker too, in standby as well as active: a standby that cannot publish (a wrong
        // key, no route to the namespace) must not look ready, nor take the lease.
        self.shutdown.tracker.spawn(probe::probe_broker(
            factory.clone(),
            self.readiness.clone(),
            self.cfg.producer.probe_interval,
            stop.clone(),
        ));
        Ok(stop.drop_guard())
    }

    async fn release(&self, lease: &Lease) {
        ordo_core::shutdown::last_step("lease release", self.leases.release(lease)).await;
    }
}
