//! Logs, the Prometheus recorder, and the `/healthz` `/readyz` `/metrics` server.
//!
//! `/healthz` answers 200 while the process runs (liveness). `/readyz` answers 200 only after
//! start-up completed, while the daemon can do its work, and never after shutdown began
//! (so a load balancer or Kubernetes stops routing before in-flight work is drained).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetryConfig};

/// Installs the global tracing subscriber. Safe to call more than once (later calls are no-ops).
pub fn init_logging(cfg: &TelemetryConfig) {
    let filter = EnvFilter::try_new(&cfg.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cfg.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// Installs the global Prometheus recorder with buckets suited to ordo's latencies.
pub fn install_recorder() -> PrometheusHandle {
    recorder_builder()
        .install_recorder()
        .expect("the Prometheus recorder is installed once per process")
}

/// The exporter as ordo configures it: which metrics are histograms and with what buckets.
fn recorder_builder() -> PrometheusBuilder {
    let buckets = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 300.0,
    ];
    // Messages per batch: a send holds one session's run, at most a few hundred messages.
    let batch_sizes = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
        .expect("non-empty buckets")
        .set_buckets_for_metric(
            Matcher::Full(crate::metrics::PUBLISH_BATCH_MESSAGES.into()),
            &batch_sizes,
        )
        .expect("non-empty buckets")
}

/// Liveness and readiness, shared by the daemon's tasks and the health server.
#[derive(Debug, Default)]
pub struct Health {
    started: AtomicBool,
    ready: AtomicBool,
    stopping: AtomicBool,
    /// Orders the gauge writes, so two concurrent changes cannot leave a stale `ordo_ready`.
    exporting: std::sync::Mutex<()>,
}

impl Health {
    /// A fresh state: not started, not ready.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Start-up completed.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::SeqCst);
        self.export();
    }

    /// The daemon can (true) or cannot (false) do its work right now.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.export();
    }

    /// Shutdown began: readiness is false from now on.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.export();
    }

    /// `ordo_ready`: what `/readyz` answers, for alerting where nothing probes it.
    fn export(&self) {
        let _order = self.exporting.lock().unwrap_or_else(|e| e.into_inner());
        let ready = if self.is_ready() { 1.0 } else { 0.0 };
        metrics::gauge!(crate::metrics::READY).set(ready);
    }

    /// What `/readyz` answers.
    pub fn is_ready(&self) -> bool {
        self.started.load(Ordering::SeqCst)
            && self.ready.load(Ordering::SeqCst)
            && !self.stopping.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
}

/// The health and metrics router (exposed for in-process tests).
pub fn router(health: Arc<Health>, metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<AppState>| async move {
                if s.health.is_ready() {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move {
                match &s.metrics {
                    Some(h) => (StatusCode::OK, h.render()),
                    None => (StatusCode::NOT_FOUND, String::new()),
                }
            }),
        )
        .with_state(AppState { health, metrics })
}

/// A daemon's start, after its logging: the Prometheus recorder installed and `/healthz`,
/// `/readyz`, `/metrics` served on `listen` until `cancel` ([`serve`]). Returns the health
/// flags the daemon drives.
pub async fn start(listen: SocketAddr, cancel: CancellationToken) -> std::io::Result<Arc<Health>> {
    let recorder = install_recorder();
    let health = Health::new();
    serve(listen, health.clone(), Some(recorder), cancel).await?;
    Ok(health)
}

/// Binds `listen` and serves the health router until `cancel`; readiness flips to false the
/// moment `cancel` fires. Returns the bound address (useful with port 0).
pub async fn serve(
    listen: SocketAddr,
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
    cancel: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = router(health.clone(), metrics);
    let stop = cancel.clone();
    tokio::spawn(async move {
        stop.cancelled().await;
        health.set_stopping();
    });
    let handle = tokio::spawn(async move {
        // The server outlives the token by a little: probes keep getting 503 while the daemon
        // drains; it ends when the process exits.
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "health server failed");
        }
    });
    tracing::info!(addr = %addr, "health and metrics server listening");
    Ok((addr, handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_status(addr: SocketAddr, path: &str) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        buf.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn readiness_follows_startup_and_shutdown() {
        let health = Health::new();
        let cancel = CancellationToken::new();
        let (addr, _h) = serve(
            "127.0.0.1:0".parse().unwrap(),
            health.clone(),
            None,
            cancel.clone(),
        )
        .await
        .unwrap();
        assert_eq!(get_status(addr, "/healthz").await, 200);
        assert_eq!(
            get_status(addr, "/readyz").await,
            503,
            "before start-up completes"
        );
        health.set_started();
        health.set_ready(true);
        assert_eq!(get_status(addr, "/readyz").await, 200);
        health.set_ready(false);
        assert_eq!(
            get_status(addr, "/readyz").await,
            503,
            "while it cannot work"
        );
        health.set_ready(true);
        cancel.cancel();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while get_status(addr, "/readyz").await != 503 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "readiness never flipped"
            );
            tokio::task::yield_now().await;
        }
        assert_eq!(
            get_status(addr, "/healthz").await,
            200,
            "alive while draining"
        );
        assert_eq!(
            get_status(addr, "/metrics").await,
            404,
            "no recorder in this test"
        );
    }

    /// Every metric docs/metrics.md calls a histogram is exported with buckets, so
    /// `histogram_quantile` works on it; a summary would export quantiles and no `_bucket`.
    #[test]
    fn batch_sizes_and_latencies_are_exported_as_histograms() {
        let recorder = recorder_builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!(crate::metrics::PUBLISH_BATCH_MESSAGES).record(7.0);
            metrics::histogram!(crate::metrics::PUBLISH_LATENCY).record(0.003);
        });
        let text = handle.render();
        for name in [
            crate::metrics::PUBLISH_BATCH_MESSAGES,
            crate::metrics::PUBLISH_LATENCY,
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} histogram")),
                "{name} is not a histogram:\n{text}"
            );
        }
        assert!(
            text.contains("ordo_publish_batch_messages_bucket{le=\"10\"} 1"),
            "7 messages falls in the bucket up to 10:\n{text}"
        );
    }

    /// `ordo_ready` follows what `/readyz` answers through start, faults and shutdown.
    #[test]
    fn the_ready_gauge_follows_readiness() {
        let recorder = recorder_builder().build_recorder();
        let handle = recorder.handle();
        let gauge = || {
            let text = handle.render();
            text.lines()
                .find_map(|l| l.strip_prefix("ordo_ready "))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no ordo_ready in:\n{text}"))
        };
        metrics::with_local_recorder(&recorder, || {
            let health = Health::new();
            health.set_ready(true);
            assert_eq!(gauge(), "0", "not started yet");
            health.set_started();
            assert_eq!(gauge(), "1");
            health.set_ready(false);
            assert_eq!(gauge(), "0", "a fault");
            health.set_ready(true);
            assert_eq!(gauge(), "1", "recovered");
            health.set_stopping();
            assert_eq!(gauge(), "0", "draining");
        });
    }
}
