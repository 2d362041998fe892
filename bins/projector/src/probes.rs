//! The readiness probes: MongoDB and Service Bus are checked on their own clock, so `/readyz`
//! follows them also while no work reaches the session workers.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use ordo_core::config::ServiceBusConfig;
use ordo_core::metrics as m;
use ordo_core::retry::Backoff;
use ordo_core::servicebus::receiver::SubscriptionProbe;

use crate::Engine;

/// How often MongoDB is pinged for `/readyz`, and how long a ping may take: a dead database
/// turns the projector unready within a few seconds, a recovered one ready within one interval.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Pings MongoDB for the readiness verdict.
pub(crate) async fn mongodb(engine: Arc<Engine>, cancel: CancellationToken) {
    let mut was_reachable = true;
    while !cancel.is_cancelled() {
        let ping = engine
            .store
            .database()
            .run_command(mongodb::bson::doc! { "ping": 1 });
        let reachable = match tokio::time::timeout(PROBE_TIMEOUT, ping).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                if was_reachable {
                    tracing::warn!(error = %e, "mongodb unreachable; not ready");
                }
                false
            }
            Err(_) => {
                if was_reachable {
                    tracing::warn!(
                        timeout_ms = PROBE_TIMEOUT.as_millis() as u64,
                        "mongodb did not answer a ping; not ready"
                    );
                }
                false
            }
        };
        if reachable && !was_reachable {
            tracing::info!("mongodb reachable again");
        }
        was_reachable = reachable;
        engine.readiness.set_database_reachable(reachable);
        tokio::select! {
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            _ = cancel.cancelled() => {}
        }
    }
}

/// The shortest wait for a probe's answer, whatever `probe_interval` is.
const PROBE_TIMEOUT_FLOOR: Duration = Duration::from_secs(5);

/// Probes Service Bus every `probe_interval`, each check bounded by it (at least
/// [`PROBE_TIMEOUT_FLOOR`]; see [`SubscriptionProbe`]); after a failure, on the retry
/// backoff. A failure holds `/readyz` at 503 until a check succeeds, is counted in
/// `ordo_retries_total{operation="probe_servicebus"}`, and sends the workers waiting in an
/// accept to reconnect.
pub(crate) async fn service_bus(
    engine: Arc<Engine>,
    sb: ServiceBusConfig,
    cancel: CancellationToken,
) {
    let every = engine.cfg.probe_interval;
    // Opening takes a TLS handshake and a token (from Entra ID, seconds at worst): a short
    // interval must not make every check fail.
    let bound = every.max(PROBE_TIMEOUT_FLOOR);
    let mut alarm = engine.readiness.broker_alarm();
    let mut probe: Option<SubscriptionProbe> = None;
    let identifier = format!("ordo-projector-{}-probe", std::process::id());
    // While failing, the broker is tried again sooner (retry_initial, doubling up to
    // retry_max), so readiness returns soon after the broker does.
    let retry = Backoff {
        initial: engine.cfg.retry_initial,
        max: every.min(engine.cfg.retry_max),
    };
    let mut delays = retry.delays();
    while !cancel.is_cancelled() {
        let check = async {
            let p = match probe.as_mut() {
                Some(p) => p,
                None => probe.insert(
                    SubscriptionProbe::open(
                        sb.connection_string(),
                        &sb.topic,
                        &sb.subscription,
                        &identifier,
                    )
                    .await?,
                ),
            };
            p.check().await
        };
        let checked = tokio::select! {
            r = tokio::time::timeout(bound, check) => r,
            _ = cancel.cancelled() => break,
        };
        let failure = match checked {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some((e.reason(), e.to_string())),
            Err(_) => Some((
                "timeout".to_string(),
                format!("no answer within {}ms", bound.as_millis()),
            )),
        };
        match failure {
            None => {
                delays = retry.delays();
                if alarm.is_raised() {
                    tracing::info!("service bus answers the probe again");
                }
                alarm.lower();
            }
            Some((reason, error)) => {
                if let Some(p) = probe.take() {
                    // Closing a dead connection can hang like the check did: bounded, aside.
                    tokio::spawn(tokio::time::timeout(bound, p.close()));
                }
                if !alarm.is_raised() {
                    tracing::warn!(%error, "service bus probe failed; not ready");
                }
                alarm.raise();
                engine.broker_probe_failed();
                metrics::counter!(m::RETRIES, "operation" => "probe_servicebus", "reason" => reason)
                    .increment(1);
            }
        }
        let delay = if alarm.is_raised() {
            delays.next().unwrap_or(every)
        } else {
            every
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => {}
        }
    }
    if let Some(p) = probe {
        let _ = tokio::time::timeout(bound, p.close()).await;
    }
}
