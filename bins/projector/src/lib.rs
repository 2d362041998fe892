//! ordo-projector: accepts Service Bus sessions (one session = one aggregate) and applies each
//! aggregate's events, in order, to MongoDB read models.
//!
//! Module map:
//! - [`config`]: `[projector]` and the shared sections.
//! - [`worker`]: the session loop (accept, receive, fold, guarded write, settle, renew).
//! - [`store`]: read models with version guards, the events collection, `ordo_blocked`.
//! - [`reconcile`]: heals read models behind the events collection (subcommand and periodic).
//! - [`repair`]: the `repair` subcommand.
//! - [`rebuild`]: the `rebuild` subcommand.

pub mod config;
pub mod rebuild;
pub mod reconcile;
pub mod repair;
pub mod store;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use ordo_core::projection::{Projection, ProjectionsFile};
use ordo_core::servicebus::receiver::AzureSessionSource;
use ordo_core::shutdown::{Drained, Shutdown};
use ordo_core::status;
use ordo_core::telemetry;

pub use config::ProjectorConfig;
pub use store::Store;
pub use worker::Engine;

/// Loads and checks the declarative projections named by the configuration.
pub fn load_projections(cfg: &ProjectorConfig) -> anyhow::Result<Vec<Arc<dyn Projection>>> {
    let path = &cfg.projector.projections_file;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("projector.projections_file: cannot read {}", path.display()))?;
    let compiled = ProjectionsFile::load_str(&text)
        .with_context(|| format!("projections file {}", path.display()))?;
    if compiled.is_empty() {
        anyhow::bail!("projections file {}: defines no projection", path.display());
    }
    let projections: Vec<Arc<dyn Projection>> = compiled
        .into_iter()
        .map(|p| Arc::new(p) as Arc<dyn Projection>)
        .collect();
    rebuild::check_projections(
        &projections,
        &cfg.mongodb.events_collection,
        &cfg.projector.blocked_collection,
    )
    .with_context(|| format!("projections file {}", path.display()))?;
    Ok(projections)
}

/// Connects to MongoDB and builds the store.
pub async fn open_store(cfg: &ProjectorConfig) -> anyhow::Result<Store> {
    let client = ordo_core::mongo::connect(&cfg.mongodb, "ordo-projector")
        .await
        .context("connecting to mongodb")?;
    Ok(Store::new(
        client.database(cfg.mongodb.database()),
        &cfg.mongodb.events_collection,
        &cfg.projector.blocked_collection,
        cfg.mongodb.fields.clone(),
    ))
}

/// Runs the projector until SIGTERM/SIGINT, then drains within the grace period.
pub async fn run(cfg: ProjectorConfig) -> anyhow::Result<()> {
    telemetry::init_logging(&cfg.telemetry);
    let projections = load_projections(&cfg)?;
    let recorder = telemetry::install_recorder();
    let health = telemetry::Health::new();
    let shutdown = Shutdown::new();
    shutdown.listen_for_signals();
    telemetry::serve(
        cfg.telemetry.listen,
        health.clone(),
        Some(recorder),
        shutdown.token.clone(),
    )
    .await
    .with_context(|| format!("telemetry.listen: cannot bind {}", cfg.telemetry.listen))?;
    let store = open_store(&cfg).await?;
    let engine = Arc::new(Engine {
        projections,
        store: store.clone(),
        cfg: cfg.projector.clone(),
        activity: Default::default(),
    });
    let workers = cfg.projector.max_concurrent_sessions;
    tracing::info!(
        workers,
        projections = engine.projections.len(),
        "projector starting"
    );
    for i in 0..workers {
        let engine = engine.clone();
        let sb = cfg.servicebus.clone();
        let prefetch = cfg.projector.prefetch;
        let cancel = shutdown.token.clone();
        let identifier = format!("ordo-projector-{}-{i}", std::process::id());
        shutdown.tracker.spawn(async move {
            let connect = || {
                AzureSessionSource::connect(
                    sb.connection_string(),
                    &sb.topic,
                    &sb.subscription,
                    &identifier,
                    prefetch,
                )
            };
            engine.run_worker(i, connect, cancel).await;
        });
    }
    {
        let store = store.clone();
        let cancel = shutdown.token.clone();
        tokio::spawn(async move {
            while !cancel.is_cancelled() {
                if let Ok(n) = store.blocked_count().await {
                    metrics::gauge!(ordo_core::metrics::BLOCKED_AGGREGATES).set(n as f64);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(15)) => {}
                    _ = cancel.cancelled() => {}
                }
            }
        });
    }
    if let Some(every) = cfg.projector.reconcile_interval {
        tracing::info!(
            interval_ms = every.as_millis() as u64,
            "periodic reconciliation on"
        );
        shutdown.tracker.spawn(reconcile::periodic(
            store.clone(),
            engine.projections.clone(),
            every,
            shutdown.token.clone(),
        ));
    }
    let instance = heartbeat(&engine, &shutdown);
    health.set_started();
    health.set_ready(true);
    shutdown.token.cancelled().await;
    health.set_stopping();
    tracing::info!("shutting down: releasing sessions");
    match shutdown.drain(cfg.shutdown.grace_period).await {
        Drained::Clean => tracing::info!("stopped"),
        Drained::TimedOut => {
            tracing::warn!("stopped with work still in flight; the broker redelivers it")
        }
    }
    if let Err(e) = status::retire(engine.store.database(), &instance).await {
        tracing::warn!(error = %e, "could not remove this projector's heartbeat");
    }
    Ok(())
}

/// Reports this process in `ordo_projectors` every few seconds (sessions held, events applied)
/// for `ordo-projector status`; returns the instance id.
fn heartbeat(engine: &Arc<Engine>, shutdown: &Shutdown) -> String {
    let started_at_ms = mongodb::bson::DateTime::now().timestamp_millis();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let instance = format!("{host}:{}:{started_at_ms}", std::process::id());
    let engine = engine.clone();
    let cancel = shutdown.token.clone();
    let id = instance.clone();
    tokio::spawn(async move {
        use std::sync::atomic::Ordering::Relaxed;
        while !cancel.is_cancelled() {
            let hb = status::ProjectorHeartbeat {
                instance: id.clone(),
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
    });
    instance
}

/// `ordo-projector status`: the deployment as MongoDB and Service Bus see it.
pub async fn status(cfg: &ProjectorConfig, json: bool) -> anyhow::Result<()> {
    let store = open_store(cfg).await?;
    let mut report = status::gather(
        store.database(),
        &cfg.mongodb.events_collection,
        &cfg.projector.blocked_collection,
    )
    .await
    .context("reading status from mongodb")?;
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
