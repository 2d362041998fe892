//! `ordo-projector`'s configuration: the shared sections plus `[projector]`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use ordo_core::config::{
    check_duration, check_not_empty, check_range, ConfigError, MongoConfig, ServiceBusConfig,
    ShutdownConfig, TelemetryConfig, Validate,
};
use ordo_core::retry::Backoff;

/// AMQP connections the session workers share by default. Measured with `ordo-bench`
/// (docs/configuration.md), against one connection per worker: the same churn and
/// hot-aggregate rates and half the p99 at steady load, with 4 connections per projector (its
/// probe included) instead of 33.
const DEFAULT_CONNECTIONS: usize = 3;

/// The shortest `projector.lock_renewal_interval`, and the shortest period a worker renews at
/// when the broker grants a lock too short for the interval (`worker/renewal.rs`).
pub(crate) const MIN_LOCK_RENEWAL_INTERVAL: Duration = Duration::from_millis(100);

/// The whole configuration file of `ordo-projector`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorConfig {
    /// Source events and ordo's own collections.
    pub mongodb: MongoConfig,
    /// The topic and the session-enabled subscription to read.
    pub servicebus: ServiceBusConfig,
    /// Logs, metrics, health port.
    pub telemetry: TelemetryConfig,
    /// SIGTERM handling.
    pub shutdown: ShutdownConfig,
    /// Session workers, batching, locks, faults.
    pub projector: ProjectorSection,
}

/// `[projector]`: how sessions are worked.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorSection {
    /// The declarative projections (TOML), relative to the working directory.
    pub projections_file: PathBuf,
    /// Sessions (aggregates) this process works at once.
    pub max_concurrent_sessions: usize,
    /// AMQP connections the session workers share (one more serves the readiness probe); 3 by
    /// default, so a projector holds 4 whatever `max_concurrent_sessions` is. One accept at a
    /// time runs on a connection; held sessions are worked concurrently on it. Set it to
    /// `max_concurrent_sessions` for one connection per worker (docs/configuration.md has both
    /// measured).
    pub connections: usize,
    /// Most messages folded into one read-model write.
    pub batch_size: u32,
    /// Longest wait for the first message of a batch; keep it well under the lock duration.
    #[serde(with = "humantime_serde")]
    pub receive_wait: Duration,
    /// Longest wait for the broker to hand out a session before asking again. The broker is told
    /// it (`com.microsoft:timeout`) and answers "no session available" after it; an accept the
    /// broker leaves unanswered for 2 s more retires its connection.
    #[serde(with = "humantime_serde")]
    pub accept_timeout: Duration,
    /// How often Service Bus is probed for `/readyz` (one connection, a peek on the
    /// subscription's dead-letter queue); a probe is bounded by it as well. A failed probe also
    /// sends workers waiting in an accept to reconnect: an accept can wait on a dead connection.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// A session with no message for this long is released so other aggregates get a worker.
    /// One session is one aggregate, and most aggregates receive a few events at a time: a short
    /// timeout keeps workers moving (measured with the demo, 300 aggregates at 300 events/s:
    /// 2 s gave 53 events/s and p50 latency 22 s; 300 ms with 32 sessions gave 244 events/s,
    /// the whole write rate, and p50 1.0 s).
    #[serde(with = "humantime_serde")]
    pub session_idle_timeout: Duration,
    /// The idle timeout while other aggregates wait at the broker (the process's last accepts
    /// were each handed a session): an idle session keeps one of them from a worker. At most
    /// `session_idle_timeout` (set it to that to hold every session as long).
    #[serde(with = "humantime_serde")]
    pub busy_session_idle_timeout: Duration,
    /// Session lock renewal period; well under the subscription's lock duration (a third).
    #[serde(with = "humantime_serde")]
    pub lock_renewal_interval: Duration,
    /// How long missing events are looked for in the events collection before the aggregate is
    /// blocked (the producer may not have written them yet when a message overtakes them).
    #[serde(with = "humantime_serde")]
    pub gap_timeout: Duration,
    /// Retries of a batch for a fault that is not its events' own (database down, fail points,
    /// guard-conflict storms) before the fault counts as an outage and `/readyz` turns 503. The
    /// batch is retried in place for as long as the fault lasts, never abandoned for it.
    pub transient_retry_limit: u32,
    /// First delay between transient retries.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Largest delay between transient retries.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Collection of blocked aggregates.
    pub blocked_collection: String,
    /// Messages the broker may push ahead of the receive calls (0: credit per receive call).
    pub prefetch: u32,
    /// A pause added to every batch apply, to exercise lock renewal under slow projections in
    /// tests and drills; 0 in production.
    #[serde(with = "humantime_serde")]
    pub apply_delay: Duration,
    /// Reconciliation period in the daemon (off when absent): catches up aggregates whose
    /// read model is behind the events collection, whatever lost their events upstream.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Option<Duration>,
}

impl Default for ProjectorSection {
    fn default() -> Self {
        Self {
            projections_file: PathBuf::from("config/projections.toml"),
            max_concurrent_sessions: 32,
            connections: DEFAULT_CONNECTIONS,
            batch_size: 100,
            receive_wait: Duration::from_millis(200),
            accept_timeout: Duration::from_secs(5),
            probe_interval: Duration::from_secs(5),
            session_idle_timeout: Duration::from_millis(100),
            busy_session_idle_timeout: Duration::from_millis(20),
            lock_renewal_interval: Duration::from_secs(10),
            gap_timeout: Duration::from_secs(10),
            transient_retry_limit: 10,
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_secs(2),
            blocked_collection: "ordo_blocked".into(),
            prefetch: 0,
            apply_delay: Duration::ZERO,
            reconcile_interval: None,
        }
    }
}

impl Validate for ProjectorSection {
    fn validate(&mut self) -> Result<(), ConfigError> {
        self.check_sizes()?;
        self.check_session_timings()?;
        self.check_retries()?;
        self.check_extras()?;
        self.check_consistency()
    }
}

impl ProjectorSection {
    /// The backoff of every retry loop: `retry_initial`, doubling up to `retry_max`.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.retry_initial,
            max: self.retry_max,
        }
    }

    /// Workers, connections and batch size.
    fn check_sizes(&self) -> Result<(), ConfigError> {
        check_range(
            "projector.max_concurrent_sessions",
            self.max_concurrent_sessions,
            1,
            1024,
        )?;
        check_range("projector.connections", self.connections, 1, 1024)?;
        check_range("projector.batch_size", self.batch_size, 1, 5000)
    }

    /// How long a worker waits on the broker, holds an idle session, renews its lock and waits
    /// for the missing events of a gap to appear.
    fn check_session_timings(&self) -> Result<(), ConfigError> {
        let (ms, s) = (Duration::from_millis, Duration::from_secs);
        // A receive that waits longer than the client gives an operation fails as timed out.
        let receive_max = ordo_core::servicebus::MAX_RECEIVE_WAIT;
        check_duration(
            "projector.receive_wait",
            self.receive_wait,
            ms(10),
            receive_max,
        )?;
        check_duration(
            "projector.accept_timeout",
            self.accept_timeout,
            ms(100),
            s(300),
        )?;
        check_duration("projector.probe_interval", self.probe_interval, s(1), s(30))?;
        check_duration(
            "projector.session_idle_timeout",
            self.session_idle_timeout,
            ms(10),
            s(3600),
        )?;
        check_duration(
            "projector.busy_session_idle_timeout",
            self.busy_session_idle_timeout,
            ms(10),
            s(3600),
        )?;
        check_duration(
            "projector.lock_renewal_interval",
            self.lock_renewal_interval,
            MIN_LOCK_RENEWAL_INTERVAL,
            s(120),
        )?;
        check_duration("projector.gap_timeout", self.gap_timeout, ms(0), s(3600))
    }

    /// The retry budget and backoff.
    fn check_retries(&self) -> Result<(), ConfigError> {
        let (ms, s) = (Duration::from_millis, Duration::from_secs);
        check_range(
            "projector.transient_retry_limit",
            self.transient_retry_limit,
            0,
            1_000_000,
        )?;
        check_duration("projector.retry_initial", self.retry_initial, ms(1), s(60))?;
        check_duration(
            "projector.retry_max",
            self.retry_max,
            self.retry_initial,
            s(600),
        )
    }

    /// The apply delay (tests and drills) and periodic reconciliation.
    fn check_extras(&self) -> Result<(), ConfigError> {
        let (ms, s) = (Duration::from_millis, Duration::from_secs);
        check_duration("projector.apply_delay", self.apply_delay, ms(0), s(600))?;
        if let Some(every) = self.reconcile_interval {
            check_duration(
                "projector.reconcile_interval",
                every,
                ms(100),
                s(7 * 86_400),
            )?;
        }
        Ok(())
    }

    /// What holds between keys, and the blocked collection's name.
    fn check_consistency(&self) -> Result<(), ConfigError> {
        if self.receive_wait >= self.lock_renewal_interval * 3 {
            return Err(ConfigError::invalid(
                "projector.receive_wait",
                "must be shorter than the lock renewal period, or the lock can expire during a receive",
            ));
        }
        check_not_empty(
            "projector.blocked_collection",
            self.blocked_collection.is_empty(),
        )
    }
}

impl Validate for ProjectorConfig {
    fn validate(&mut self) -> Result<(), ConfigError> {
        self.mongodb.validate()?;
        self.servicebus.validate()?;
        self.telemetry.validate()?;
        self.shutdown.validate()?;
        self.projector.validate()
    }
}
