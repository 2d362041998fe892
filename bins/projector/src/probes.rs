//! The readiness probes: MongoDB and Service Bus are checked on their own clock, so `/readyz`
//! follows them also while no work reaches the session workers.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use ordo_core::config::ServiceBusConfig;
use ordo_core::metrics as m;
use ordo_core::readiness::{dependency, Alarm};
use ordo_core::retry::Backoff;
use ordo_core::servicebus::receiver::{ReceiveError, SubscriptionProbe};

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
///
/// Its retry step is its own rather than [`ordo_core::retry::Retry`]: the `reason` label is the
/// broker's AMQP condition, a string known only at run time, where `Retry` takes a
/// `&'static str`; and it logs an outage once, when it begins, not every check (each worker's
/// failed accept is logged already).
pub(crate) async fn service_bus(
    engine: Arc<Engine>,
    sb: ServiceBusConfig,
    cancel: CancellationToken,
) {
    let every = engine.cfg.probe_interval;
    let mut probe = BrokerProbe::new(sb, every);
    let mut alarm = engine.readiness.alarm(dependency::SERVICEBUS);
    // While failing, the broker is tried again sooner (retry_initial, doubling up to
    // retry_max), so readiness returns soon after the broker does.
    let retry = Backoff {
        max: every.min(engine.cfg.retry_max),
        ..engine.cfg.backoff()
    };
    let mut delays = retry.delays();
    while !cancel.is_cancelled() {
        let checked = tokio::select! {
            r = probe.check() => r,
            _ = cancel.cancelled() => break,
        };
        match checked {
            Ok(()) => {
                delays = retry.delays();
                answered(&engine, &mut alarm);
            }
            Err((reason, error)) => {
                probe.discard();
                failed(&engine, &mut alarm, reason, &error);
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
    probe.close().await;
}

/// The broker answered a check: after an outage, readiness and the workers hear of it.
fn answered(engine: &Engine, alarm: &mut Alarm) {
    if alarm.is_raised() {
        tracing::info!("service bus answers the probe again");
        engine.broker_probe_recovered();
    }
    alarm.lower();
}

/// A check failed: readiness goes down (logged when an outage begins), the workers waiting in
/// an accept reconnect, and the retry is counted.
fn failed(engine: &Engine, alarm: &mut Alarm, reason: String, error: &str) {
    if !alarm.is_raised() {
        tracing::warn!(%error, "service bus probe failed; not ready");
    }
    alarm.raise();
    engine.broker_probe_failed();
    metrics::counter!(m::RETRIES, "operation" => "probe_servicebus", "reason" => reason)
        .increment(1);
}

/// The probe's standing connection to the subscription, opened again after a failure.
struct BrokerProbe {
    sb: ServiceBusConfig,
    identifier: String,
    /// How long a check (with the open before it) may take.
    bound: Duration,
    open: Option<SubscriptionProbe>,
}

impl BrokerProbe {
    fn new(sb: ServiceBusConfig, every: Duration) -> Self {
        Self {
            sb,
            identifier: format!("ordo-projector-{}-probe", std::process::id()),
            // Opening takes a TLS handshake and a token (from Entra ID, seconds at worst): a
            // short interval must not make every check fail.
            bound: every.max(PROBE_TIMEOUT_FLOOR),
            open: None,
        }
    }

    /// One check within the bound, opening the connection first when there is none. On failure,
    /// the `reason` label and the error.
    async fn check(&mut self) -> Result<(), (String, String)> {
        match tokio::time::timeout(self.bound, self.open_and_check()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err((e.reason(), e.to_string())),
            Err(_) => Err((
                "timeout".to_string(),
                format!("no answer within {}ms", self.bound.as_millis()),
            )),
        }
    }

    async fn open_and_check(&mut self) -> Result<(), ReceiveError> {
        let p = match self.open.as_mut() {
            Some(p) => p,
            None => self.open.insert(
                SubscriptionProbe::open(
                    self.sb.connection_string(),
                    &self.sb.topic,
                    &self.sb.subscription,
                    &self.identifier,
                )
                .await?,
            ),
        };
        p.check().await
    }

    /// Drops the connection after a failed check; the next check opens a new one.
    fn discard(&mut self) {
        if let Some(p) = self.open.take() {
            // Closing a dead connection can hang like the check did: bounded, aside.
            tokio::spawn(tokio::time::timeout(self.bound, p.close()));
        }
    }

    /// Closes the connection at shutdown, within the bound.
    async fn close(self) {
        if let Some(p) = self.open {
            let _ = tokio::time::timeout(self.bound, p.close()).await;
        }
    }
}
