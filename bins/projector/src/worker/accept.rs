//! The accept loop of one worker: connect, accept sessions and work them, and while the
//! broker fails, hold readiness down, pass the [`BrokerGate`] one worker at a time, and retry
//! with backoff. The broker probe's verdicts end accepts and connects that may hang.

use super::gate::PROBE_ACCEPT_WAIT;
use super::release::Releasing;
use super::{Counted, Engine};
use ordo_core::metrics as m;
use ordo_core::readiness::{dependency, Alarm};
use ordo_core::servicebus::receiver::{Accepted, ReceiveError, SessionSource};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

impl Engine {
    /// The broker probe answers again after failing. Once an accept has been answered since
    /// start (so the subscription is known to take session receivers, which the probe's
    /// dead-letter peek does not show), this ends the outage as an accept's answer would: the
    /// gate opens, and a worker still connecting starts over on a fresh connection, because a
    /// connection begun while the broker was down can hang like an accept does.
    pub fn broker_probe_recovered(&self) {
        if self.has_broker_answered() {
            self.gate.up();
            self.probe_recoveries.send_modify(|n| *n += 1);
        }
    }

    /// Whether a worker's accept has been answered since start.
    pub fn has_broker_answered(&self) -> bool {
        self.unanswered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none()
    }

    /// The broker probe failed: every worker waiting in an accept reconnects, as after a
    /// failed accept of its own (an accept does not always notice its connection drop).
    pub fn broker_probe_failed(&self) {
        self.probe_failures.send_modify(|n| *n += 1);
    }

    /// One worker: accepts sessions until `cancel`, then returns after releasing its session.
    /// While its connect or accept fails it holds readiness down and counts its retries.
    pub async fn run_worker<S, F, Fut>(
        self: Arc<Self>,
        index: usize,
        connect: F,
        cancel: CancellationToken,
    ) where
        S: SessionSource,
        S::Session: 'static,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<S, ReceiveError>>,
    {
        let _alive = Counted::new(&self.activity.workers, None);
        let mut worker = Worker {
            source: None,
            releasing: Releasing::default(),
            verdicts: ProbeVerdicts {
                failed: self.probe_failures.subscribe(),
                recovered: self.probe_recoveries.subscribe(),
            },
            alarm: self.readiness.alarm(dependency::SERVICEBUS),
        };
        let mut delays = self.backoff().delays();
        while !cancel.is_cancelled() {
            // Held from a connect through the backoff after its failure (see `BrokerGate`).
            let mut probe = None;
            match self
                .attempt(index, &mut worker, &connect, &mut probe, &cancel)
                .await
            {
                Attempt::Answered => delays = self.backoff().delays(),
                Attempt::Again => {}
                Attempt::Unclear => {
                    let delay = delays.next().unwrap_or(self.cfg.retry_max);
                    if !self.wait_after_unclear(delay, &cancel).await {
                        break;
                    }
                }
                Attempt::Failed(op, error) => {
                    worker.alarm.raise();
                    let recovered = &mut worker.verdicts.recovered;
                    if !self.back_off(index, op, &error, recovered, &cancel).await {
                        break;
                    }
                }
                Attempt::Stopped => break,
            }
        }
        worker.releasing.finish(&self.activity).await;
        tracing::debug!(worker = index, "worker stopped");
    }

    /// One try of a worker: connect when it has no connection, accept once, and work the
    /// session the broker gives, if any. `probe` receives the [`BrokerGate`]'s pass, if the
    /// connect needed one.
    async fn attempt<S, F, Fut>(
        &self,
        index: usize,
        worker: &mut Worker<S>,
        connect: &F,
        probe: &mut Option<tokio::sync::OwnedMutexGuard<()>>,
        cancel: &CancellationToken,
    ) -> Attempt
    where
        S: SessionSource,
        S::Session: 'static,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<S, ReceiveError>>,
    {
        let src = match worker.source.as_mut() {
            // A probe failure since this connection was opened ends its accept: one signalled
            // between two accepts (or while a session was worked) is not lost.
            Some(s) => s,
            None => match self
                .open(
                    connect,
                    probe,
                    &mut worker.verdicts,
                    &mut worker.alarm,
                    cancel,
                )
                .await
            {
                Opened::Connected(s) => worker.source.insert(s),
                Opened::Failed(e) => return Attempt::Failed("connect", e),
                Opened::Again => return Attempt::Again,
                Opened::Stopped => return Attempt::Stopped,
            },
        };
        let probing = probe.is_some();
        let accepting = self.accept_once(src, probing, &mut worker.verdicts.failed, cancel);
        let answer = match accepting.await {
            None => return Attempt::Stopped,
            Some(Err(e)) => {
                worker.source = None;
                return Attempt::Failed("accept", e);
            }
            Some(Ok(Accepted::Unclear)) => return Attempt::Unclear,
            Some(Ok(answer)) => answer,
        };
        // Any other answer proves the connection, the credentials and the subscription.
        self.answered(&mut worker.alarm);
        match answer {
            Accepted::Session(mut session) => {
                self.activity.sessions_in_a_row.fetch_add(1, Relaxed);
                drop(probe.take());
                self.hold_session(&mut session, cancel).await;
                worker.releasing.release(session, &self.activity).await;
            }
            Accepted::GaveUp => {
                // The broker left the attach unanswered past its own timeout: the
                // connection is retired, and the next accept opens a new one.
                tracing::debug!(
                    worker = index,
                    "accept unanswered by the broker; reconnecting"
                );
                worker.source = None;
            }
            Accepted::Idle => self.activity.sessions_in_a_row.store(0, Relaxed),
            Accepted::Unclear => {}
        }
        Attempt::Answered
    }

    /// Counts an unclear refusal of an accept and waits `delay`; false when cancelled. Such an
    /// answer is neither proof of health nor of a fault: readiness stays as the last clear
    /// answer left it.
    async fn wait_after_unclear(&self, delay: Duration, cancel: &CancellationToken) -> bool {
        metrics::counter!(m::RETRIES, "operation" => "accept", "reason" => "unclear_refusal")
            .increment(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = cancel.cancelled() => false,
        }
    }

    /// Waits at the [`BrokerGate`] and connects. The gate's pass goes to `probe`, where the
    /// caller holds it through the accept or the backoff after a failure.
    async fn open<S, F, Fut>(
        &self,
        connect: &F,
        probe: &mut Option<tokio::sync::OwnedMutexGuard<()>>,
        verdicts: &mut ProbeVerdicts,
        alarm: &mut Alarm,
        cancel: &CancellationToken,
    ) -> Opened<S>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<S, ReceiveError>>,
    {
        *probe = tokio::select! {
            p = self.gate.pass() => p,
            _ = cancel.cancelled() => return Opened::Stopped,
        };
        // A probe failure from now on (not one from the wait at the gate) ends this attempt's
        // accept, also one signalled while connecting.
        verdicts.failed.mark_unchanged();
        if probe.is_none() {
            // The gate is open: the broker answered someone since this worker failed, so its
            // alarm need not wait for an accept of its own (up to `accept_timeout` on an idle
            // broker) to come down.
            alarm.lower();
        }
        verdicts.recovered.mark_unchanged();
        let connected = tokio::select! {
            r = connect() => r,
            // The broker is back and this connect began before: start over.
            _ = verdicts.recovered.changed() => return Opened::Again,
            _ = cancel.cancelled() => return Opened::Stopped,
        };
        match connected {
            Ok(s) => Opened::Connected(s),
            Err(e) => Opened::Failed(e),
        }
    }

    /// One accept, shorter while this worker probes the broker ([`PROBE_ACCEPT_WAIT`]). A
    /// broker probe failure meanwhile ends it as a failed accept; `None` on shutdown.
    async fn accept_once<S: SessionSource>(
        &self,
        src: &mut S,
        probing: bool,
        probe_failed: &mut tokio::sync::watch::Receiver<u64>,
        cancel: &CancellationToken,
    ) -> Option<Result<Accepted<S::Session>, ReceiveError>> {
        let wait = if probing {
            self.cfg.accept_timeout.min(PROBE_ACCEPT_WAIT)
        } else {
            self.cfg.accept_timeout
        };
        tokio::select! {
            r = src.accept_next(wait) => Some(r),
            _ = probe_failed.changed() => Some(Err(ReceiveError::Broker(
                "the broker probe failed while this accept waited".into(),
            ))),
            _ = cancel.cancelled() => None,
        }
    }

    /// After a failed connect or accept: counts the retry and waits out the backoff (shorter
    /// when the broker probe answers again); false when cancelled.
    ///
    /// This step is its own rather than [`ordo_core::retry::Retry`], which would change what it
    /// does: the delay is the process's, indexed by the failures of every worker since the
    /// broker last answered ([`BrokerGate`]), not the next one of this worker's own sequence;
    /// the wait also ends when the broker probe answers again; and the `reason` label is the
    /// broker's AMQP condition, known only at run time, where `Retry` takes a `&'static str`.
    async fn back_off(
        &self,
        index: usize,
        op: &'static str,
        error: &ReceiveError,
        probe_recovered: &mut tokio::sync::watch::Receiver<u64>,
        cancel: &CancellationToken,
    ) -> bool {
        let failures = self.gate.failed();
        let delay = (self.backoff().delays())
            .nth(failures.min(64) as usize)
            .unwrap_or(self.cfg.retry_max);
        metrics::counter!(m::RETRIES, "operation" => op, "reason" => error.reason()).increment(1);
        tracing::warn!(worker = index, op, error = %error, delay_ms = delay.as_millis() as u64, "service bus unavailable; retrying");
        probe_recovered.mark_unchanged();
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            // The broker is back: no need to wait out a long `retry_max`.
            _ = probe_recovered.changed() => true,
            _ = cancel.cancelled() => false,
        }
    }

    /// The broker answered a worker's accept: readiness may count on it, the gate opens for
    /// every worker, and this worker's alarm comes down.
    fn answered(&self, alarm: &mut Alarm) {
        self.unanswered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        self.gate.up();
        alarm.lower();
    }
}

/// What one worker keeps from one attempt to the next.
struct Worker<S: SessionSource> {
    /// The connection sessions are accepted on; none after it failed.
    source: Option<S>,
    /// Sessions this worker is done with, being released.
    releasing: Releasing<S::Session>,
    /// The broker probe's verdicts this worker has not acted on yet.
    verdicts: ProbeVerdicts,
    /// Readiness, held down while this worker's connect or accept fails.
    alarm: Alarm,
}

/// How one attempt of a worker ended, and so what the worker does next.
enum Attempt {
    /// The broker answered (with a session, now worked and released, or none): try again at
    /// once, and start the backoff over.
    Answered,
    /// The broker refused an accept without a clear reason: count it and wait a little.
    Unclear,
    /// The connect or the accept failed (`"connect"` or `"accept"`): back off.
    Failed(&'static str, ReceiveError),
    /// The broker came back while connecting: start over on a fresh connection.
    Again,
    /// Shutdown.
    Stopped,
}

/// What a worker hears from the broker probe: its failures and its recoveries, counted.
struct ProbeVerdicts {
    failed: tokio::sync::watch::Receiver<u64>,
    recovered: tokio::sync::watch::Receiver<u64>,
}

/// How a worker's connect ended.
enum Opened<S> {
    /// Connected.
    Connected(S),
    /// The connect failed.
    Failed(ReceiveError),
    /// The broker came back while connecting: start over on a fresh connection.
    Again,
    /// Shutdown.
    Stopped,
}
