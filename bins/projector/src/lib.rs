//! ordo-projector: accepts Service Bus sessions (one session = one aggregate) and applies each
//! aggregate's events, in order, to MongoDB read models.
//!
//! Module map:
//! - [`cli`]: the command line as a function, so a binary can add projections written in Rust.
//! - [`config`]: `[projector]` and the shared sections.
//! - [`worker`]: the session loop (accept, receive, fold, guarded write, settle, renew).
//! - [`settle`]: the settlement rule, pure: complete, dead-letter, block or retry.
//! - `probes`: MongoDB and Service Bus checked for `/readyz` apart from the workers' accepts.
//! - [`supervise`]: the workers and the periodic tasks are respawned after a panic or an early
//!   return.
//! - [`store`]: read models with version guards, the events collection, `ordo_blocked`, and
//!   `latest`, what reconciliation reads over the whole events collection.
//! - [`reconcile`]: catches up read models behind the events collection (subcommand and
//!   periodic).
//! - [`repair`]: the `repair` subcommand.
//! - [`blocked_state`]: the session state a block writes, cleared by `repair`.
//! - [`rebuild`]: the `rebuild` subcommand.
//! - [`projections`]: loading the projections and the checks on them (names and collections
//!   unique, none on the events collection or ordo's own).
//! - [`error`]: [`ProjectorError`], what the entry points return when they fail.
//! - this file: [`run`] (the daemon's tasks started, its heartbeat and blocked-aggregates
//!   gauge, the events-index report, the drain), [`run_with`] (the same with custom
//!   projections written in Rust; [`cli`] runs it), [`spawn_workers`] (the
//!   supervised session workers over any session source), [`status`], [`open_store`].

pub mod blocked_state;
pub mod cli;
pub mod config;
pub mod error;
mod probes;
pub mod projections;
pub mod rebuild;
pub mod reconcile;
pub mod repair;
pub mod settle;
pub mod store;
pub mod supervise;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use ordo_core::servicebus::receiver::{ReceiveError, SessionConnections, SessionSource};
use ordo_core::shutdown::{Drained, Shutdown};
use ordo_core::status;
use ordo_core::telemetry;
use ordo_projection::Projection;

pub use config::ProjectorConfig;
pub use error::{ProjectionConflict, ProjectorError};
pub use projections::{load_projections, load_projections_with};
pub use store::Store;
pub use worker::Engine;

/// Connects to MongoDB and builds the store.
pub async fn open_store(cfg: &ProjectorConfig) -> Result<Store, ProjectorError> {
    let client = ordo_core::mongo::connect(&cfg.mongodb, "ordo-projector")
        .await
        .map_err(ProjectorError::Connect)?;
    Ok(Store::new(
        client.database(cfg.mongodb.database()),
        &cfg.mongodb.events_collection,
        &cfg.projector.blocked_collection,
        cfg.mongodb.fields.clone(),
    ))
}

/// Runs the projector until SIGTERM/SIGINT, then drains within the grace period.
pub async fn run(cfg: ProjectorConfig) -> Result<(), ProjectorError> {
    run_with(cfg, Vec::new()).await
}

/// [`run`] with `custom` projections written in Rust next to the declarative ones.
pub async fn run_with(
    cfg: ProjectorConfig,
    custom: Vec<Arc<dyn Projection>>,
) -> Result<(), ProjectorError> {
    telemetry::init_logging(&cfg.telemetry);
    let projections = load_projections_with(&cfg, custom)?;
    let shutdown = Shutdown::new();
    shutdown.listen_for_signals();
    let health = telemetry::start(cfg.telemetry.listen, shutdown.token.clone())
        .await
        .map_err(|source| ProjectorError::Telemetry {
            listen: cfg.telemetry.listen,
            source,
        })?;
    let store = open_store(&cfg).await?;
    let engine = Arc::new(Engine::new(
        projections,
        store.clone(),
        cfg.projector.clone(),
    ));
    engine.readiness.publish_to(health.clone());
    tracing::info!(
        workers = cfg.projector.max_concurrent_sessions,
        projections = engine.projections.len(),
        "projector starting"
    );
    spawn_service_bus_workers(&engine, &shutdown, &cfg);
    spawn_probes(&engine, &shutdown, &cfg).await?;
    spawn_upkeep(&engine, &shutdown, &cfg, &store);
    let instance = heartbeat(&engine, &shutdown);
    health.set_started();
    shutdown.token.cancelled().await;
    // At once, before the drain starts (the health server's own task sets it too, whenever
    // it next runs).
    health.set_stopping();
    stop(&engine, &shutdown, cfg.shutdown.grace_period, &instance).await;
    Ok(())
}

/// Starts the session workers ([`spawn_workers`]) on the Service Bus subscription, sharing
/// `[projector] connections` connections.
fn spawn_service_bus_workers(engine: &Arc<Engine>, shutdown: &Shutdown, cfg: &ProjectorConfig) {
    let sb = &cfg.servicebus;
    let connections = SessionConnections::new(
        sb.connection_string(),
        &sb.topic,
        &sb.subscription,
        &format!("ordo-projector-{}", std::process::id()),
        cfg.projector.prefetch,
        cfg.projector.connections,
    );
    spawn_workers(engine, shutdown, move |i| {
        let connections = connections.clone();
        async move { connections.source(i).await }
    });
}

/// Starts the readiness probes: MongoDB on a client of its own, and Service Bus.
async fn spawn_probes(
    engine: &Arc<Engine>,
    shutdown: &Shutdown,
    cfg: &ProjectorConfig,
) -> Result<(), ProjectorError> {
    let probe = ordo_core::mongo::connect_probe(&cfg.mongodb, "ordo-projector")
        .await
        .map_err(ProjectorError::Connect)?
        .database(cfg.mongodb.database());
    spawn_supervised(engine, shutdown, "readiness_probe", {
        let (engine, cancel) = (engine.clone(), shutdown.token.clone());
        move || probes::mongodb(engine.clone(), probe.clone(), cancel.clone())
    });
    spawn_supervised(engine, shutdown, "broker_probe", {
        let (engine, cancel) = (engine.clone(), shutdown.token.clone());
        let sb = cfg.servicebus.clone();
        move || probes::service_bus(engine.clone(), sb.clone(), cancel.clone())
    });
    Ok(())
}

/// Starts what keeps the read models and the reports in order beside the workers: the
/// blocked-aggregates gauge, periodic reconciliation when `reconcile_interval` is set, and the
/// one report on the events index.
fn spawn_upkeep(engine: &Arc<Engine>, shutdown: &Shutdown, cfg: &ProjectorConfig, store: &Store) {
    spawn_supervised(engine, shutdown, "blocked_gauge", {
        let (store, cancel) = (store.clone(), shutdown.token.clone());
        move || blocked_gauge(store.clone(), cancel.clone())
    });
    if let Some(every) = cfg.projector.reconcile_interval {
        tracing::info!(
            interval_ms = every.as_millis() as u64,
            "periodic reconciliation on"
        );
        spawn_supervised(engine, shutdown, "reconcile", {
            let (store, cancel) = (store.clone(), shutdown.token.clone());
            let projections = engine.projections.clone();
            move || reconcile::periodic(store.clone(), projections.clone(), every, cancel.clone())
        });
    }
    shutdown
        .tracker
        .spawn(report_event_index(store.clone(), cfg.mongodb.clone()));
}

/// After the signal, with readiness already off: releases the sessions within `grace`, removes
/// this process's heartbeat and closes the database client.
async fn stop(engine: &Engine, shutdown: &Shutdown, grace: Duration, instance: &str) {
    tracing::info!("shutting down: releasing sessions");
    match shutdown.drain(grace).await {
        Drained::Clean => tracing::info!("stopped"),
        Drained::TimedOut => {
            tracing::warn!("stopped with work still in flight; the broker redelivers it")
        }
    }
    ordo_core::shutdown::last_step(
        "heartbeat removal",
        status::retire(engine.store.database(), instance),
    )
    .await;
    ordo_core::mongo::close(engine.store.database().client().clone()).await;
}

/// Starts `max_concurrent_sessions` supervised session workers; `connect(i)` opens worker
/// `i`'s own session source. A worker that panics is replaced, so the pool keeps its size.
pub fn spawn_workers<S, C, Fut>(engine: &Arc<Engine>, shutdown: &Shutdown, connect: C)
where
    S: SessionSource + 'static,
    C: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<S, ReceiveError>> + Send + 'static,
{
    for i in 0..engine.cfg.max_concurrent_sessions {
        let (engine, connect, cancel) = (engine.clone(), connect.clone(), shutdown.token.clone());
        spawn_supervised(&engine.clone(), shutdown, "session_worker", move || {
            let connect = connect.clone();
            engine
                .clone()
                .run_worker(i, move || connect(i), cancel.clone())
        });
    }
}

/// Runs a task under [`supervise::supervise`], tracked for the drain.
fn spawn_supervised<F, Fut>(engine: &Arc<Engine>, shutdown: &Shutdown, task: &'static str, start: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let backoff = engine.backoff_for_restarts();
    let counted = engine.clone();
    shutdown.tracker.spawn(supervise::supervise(
        task,
        shutdown.token.clone(),
        backoff,
        start,
        move || {
            counted
                .activity
                .restarts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        },
    ));
}

/// Keeps `ordo_blocked_aggregates` up to date.
async fn blocked_gauge(store: Store, cancel: CancellationToken) {
    while !cancel.is_cancelled() {
        if let Ok(n) = store.blocked_count().await {
            metrics::gauge!(ordo_core::metrics::BLOCKED_AGGREGATES).set(n as f64);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(15)) => {}
            _ = cancel.cancelled() => {}
        }
    }
}

/// Reports this process in `ordo_projectors` every few seconds (sessions held, events applied)
/// for `ordo-projector status`; returns the instance id.
fn heartbeat(engine: &Arc<Engine>, shutdown: &Shutdown) -> String {
    let started_at_ms = mongodb::bson::DateTime::now().timestamp_millis();
    let host = status::host_name();
    let instance = format!("{host}:{}:{started_at_ms}", std::process::id());
    let (beating, cancel, id) = (engine.clone(), shutdown.token.clone(), instance.clone());
    spawn_supervised(engine, shutdown, "heartbeat", move || {
        beat(
            beating.clone(),
            id.clone(),
            host.clone(),
            started_at_ms,
            cancel.clone(),
        )
    });
    instance
}

async fn beat(
    engine: Arc<Engine>,
    instance: String,
    host: String,
    started_at_ms: i64,
    cancel: CancellationToken,
) {
    use std::sync::atomic::Ordering::Relaxed;
    while !cancel.is_cancelled() {
        let hb = status::ProjectorHeartbeat {
            instance: instance.clone(),
            host: host.clone(),
            sessions_held: engine.activity.sessions_held.load(Relaxed),
            applied: engine.activity.applied.load(Relaxed),
            started_at_ms,
            updated_at_ms: mongodb::bson::DateTime::now().timestamp_millis(),
        };
        if let Err(e) = status::beat(engine.store.database(), &hb).await {
            tracing::debug!(error = %e, "heartbeat not written");
        }
        tokio::select! {
            _ = tokio::time::sleep(status::HEARTBEAT_INTERVAL) => {}
            _ = cancel.cancelled() => {}
        }
    }
}

/// Reports once whether the events collection has the unique (aggregateId, eventId) index that
/// makes a duplicate version impossible; the projector never creates it (that is the producer's
/// `[mongodb] create_indexes`), and it blocks an aggregate with a duplicate either way.
async fn report_event_index(store: Store, mongo: ordo_core::config::MongoConfig) {
    let coll = store.database().collection(&mongo.events_collection);
    match ordo_core::indexes::event_index(&coll, &mongo.fields).await {
        Ok(state) if state.is_enforced() => {
            tracing::info!(collection = %mongo.events_collection, "events index: {state}")
        }
        Ok(state) => tracing::warn!(
            collection = %mongo.events_collection,
            "events index: {state}; duplicate versions can only be found by blocking their aggregate"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot check the events index"),
    }
}

/// `ordo-projector status`: the deployment as MongoDB and Service Bus see it.
pub async fn status(cfg: &ProjectorConfig, json: bool) -> Result<(), ProjectorError> {
    let store = open_store(cfg).await?;
    let gathered = status::gather(
        store.database(),
        &cfg.mongodb.events_collection,
        &cfg.mongodb.fields,
        &cfg.projector.blocked_collection,
    )
    .await;
    ordo_core::mongo::close(store.database().client().clone()).await;
    let mut report = gathered.map_err(ProjectorError::Status)?;
    match ordo_core::servicebus::dead_letter_depth(
        cfg.servicebus.connection_string(),
        &cfg.servicebus.topic,
        &cfg.servicebus.subscription,
        100_000,
    )
    .await
    {
        Ok(depth) => report.dead_letter_depth = Some(depth),
        Err(e) => report.dead_letter_error = Some(e.to_string()),
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
