//! The readiness probes: MongoDB and Service Bus are checked on their own clock, so `/readyz`
//! follows them also while no work reaches the session workers.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use ordo_core::config::ServiceBusConfig;
use ordo_core::metrics as m;
use ordo_core::readiness::dependency;
use ordo_core::retry::Backoff;
use ordo_core::servicebus::receiver::SubscriptionProbe;

use crate::Engine;

/// Pings MongoDB for the readiness verdict ([`ordo_core::mongo::probe`]).
/// `db` is over a client of its own ([`ordo_core::mongo::connect_probe`]).
pub(crate) async fn mongodb(engine: Arc<Engine>, db: mongodb::Database, cancel: CancellationToken) {
    ordo_core::mongo::probe(db, cancel, engine.readiness.follow(dependency::MONGODB)).await
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
    let mut alarm = engine.readiness.alarm(dependency::SERVICEBUS);
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
                    engine.broker_probe_recovered();
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
