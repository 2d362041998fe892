//! `ordo-producer`'s configuration: the shared sections plus `[producer]`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use ordo_core::config::{
    check_duration, check_not_empty, check_range, ConfigError, MongoConfig, ServiceBusConfig,
    ShutdownConfig, TelemetryConfig, Validate,
};
use ordo_core::retry::Backoff;

/// AMQP connections the senders share by default: 3 instead of one per sender (8 senders then),
/// with the projectors' connections shared too, kept the churn and hot-aggregate rates in
/// `ordo-bench` (docs/configuration.md).
const DEFAULT_CONNECTIONS: usize = 3;

/// The whole configuration file of `ordo-producer`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerConfig {
    /// Source events and ordo's own collections.
    pub mongodb: MongoConfig,
    /// The topic to publish to.
    pub servicebus: ServiceBusConfig,
    /// Logs, metrics, health port.
    pub telemetry: TelemetryConfig,
    /// SIGTERM handling.
    pub shutdown: ShutdownConfig,
    /// Publishing, checkpoints, leases, start and recovery.
    pub producer: ProducerSection,
}

/// Where to start when the stream has no checkpoint yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    /// Only events inserted from now on.
    Now,
    /// Every event already in the collection, then the live stream.
    Beginning,
    /// Events inserted at or after this time (seconds since the epoch).
    Time(i64),
}

/// What to do with an event that cannot become a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnInvalid {
    /// Record it in `ordo_parked` and carry on.
    Park,
    /// Stop the daemon with a non-zero exit; the checkpoint stays before the event.
    Halt,
}

/// `[producer]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerSection {
    /// Name of the stream (lease and checkpoint key); default `"{database}.{events_collection}"`.
    pub stream: Option<String>,
    /// Start point without a checkpoint: `now`, `beginning` or an RFC 3339 timestamp.
    pub start_at: String,
    /// Publishers (one sender link each) sending concurrently across sessions.
    pub senders: usize,
    /// AMQP connections the publishers share (the readiness probe opens its sender on them too);
    /// 3 by default. Set it to `senders` for one connection per sender.
    pub connections: usize,
    /// Most messages read but not yet acknowledged by the broker.
    pub max_in_flight_messages: usize,
    /// Most message bytes read but not yet acknowledged by the broker.
    pub max_in_flight_bytes: usize,
    /// Most messages of one session in one batch.
    pub max_batch_messages: usize,
    /// Largest message the topic accepts (its maximum message size: 256 KiB on Standard). An
    /// event whose encoded message (envelope, ids and properties, as the client measures it)
    /// plus a 1 KiB margin for the broker's annotations is larger is parked as `too_large`.
    pub max_message_bytes: usize,
    /// `park` (record in `ordo_parked`, carry on) or `halt` (exit non-zero).
    pub on_invalid: OnInvalid,
    /// Longest time between checkpoint saves while events flow.
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// Save a checkpoint after this many acknowledged events, even before the interval.
    pub checkpoint_every_events: u64,
    /// Longest time between checkpoint saves while no event flows: the stream's position still
    /// moves (other writes move the oplog, the checkpoint's own among them), and saving it keeps
    /// a restart's resume point recent without a write every `checkpoint_interval`. Never
    /// shorter than `checkpoint_interval`.
    #[serde(with = "humantime_serde")]
    pub idle_checkpoint_interval: Duration,
    /// How long one getMore waits for new events; an empty answer advances the idle checkpoint.
    #[serde(with = "humantime_serde")]
    pub max_await_time: Duration,
    /// Events read per change-stream and scan batch.
    pub read_batch_size: u32,
    /// Deprecated and ignored: lost-history recovery re-publishes the whole collection.
    #[serde(with = "humantime_serde")]
    pub history_safety_margin: Duration,
    /// Deprecated and ignored: lost-history recovery re-publishes the whole collection.
    pub replay_time_field: String,
    /// Sort order of the `beginning` scan, e.g. `{ _id = 1 }`; it must follow insertion order
    /// per aggregate.
    pub scan_sort: toml::Table,
    /// Most items read and not yet part of the acknowledged prefix; the reader waits beyond it.
    pub max_unacknowledged: usize,
    /// Not ready while items wait behind an acknowledged prefix that has not moved this long.
    #[serde(with = "humantime_serde")]
    pub checkpoint_stuck_after: Duration,
    /// How often the broker is probed for readiness: a sender link opened (authenticated) on
    /// one of the shared connections, connecting it if it is not open, then closed.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// How often the events collection's unique index is checked again after the first check:
    /// an index dropped by hand, or a collection restored without it, is noticed (and the index
    /// created again when `[mongodb] create_indexes` allows) within this time.
    #[serde(with = "humantime_serde")]
    pub index_check_interval: Duration,
    /// `auto` (batches; single sends once the topic refuses batching distinct ids, as a
    /// partitioned topic with duplicate detection does), `batch`, or `single`.
    pub send_mode: ordo_core::servicebus::sender::SendMode,
    /// Lifetime of the stream's lease; a standby takes over at most this long after a crash.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Bound on one broker send (and on connecting) before it counts as a fault; a lost outcome
    /// costs this long, and the resend is deduplicated by MessageId.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// First retry delay after a fault.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Largest retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
}

impl Default for ProducerSection {
    fn default() -> Self {
        let mut sort = toml::Table::new();
        sort.insert("_id".into(), toml::Value::Integer(1));
        Self {
            stream: None,
            start_at: "now".into(),
            senders: 64,
            connections: DEFAULT_CONNECTIONS,
            max_in_flight_messages: 2000,
            max_in_flight_bytes: 32 * 1024 * 1024,
            max_batch_messages: 100,
            max_message_bytes: 256 * 1024,
            on_invalid: OnInvalid::Park,
            checkpoint_interval: Duration::from_secs(1),
            checkpoint_every_events: 1000,
            idle_checkpoint_interval: Duration::from_secs(30),
            max_await_time: Duration::from_millis(500),
            read_batch_size: 1000,
            history_safety_margin: Duration::from_secs(300),
            replay_time_field: "_id".into(),
            scan_sort: sort,
            max_unacknowledged: 100_000,
            checkpoint_stuck_after: Duration::from_secs(60),
            probe_interval: Duration::from_secs(5),
            index_check_interval: Duration::from_secs(60),
            send_mode: Default::default(),
            lease_ttl: Duration::from_secs(15),
            send_timeout: Duration::from_secs(10),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
        }
    }
}

impl ProducerSection {
    /// Logs the deprecated keys a configuration still sets to something else than their
    /// default.
    pub fn warn_deprecated(&self) {
        let d = Self::default();
        if self.history_safety_margin != d.history_safety_margin
            || self.replay_time_field != d.replay_time_field
        {
            tracing::warn!("producer.history_safety_margin and producer.replay_time_field are ignored: lost-history recovery re-publishes the whole events collection");
        }
    }

    /// The parsed start mode (validated).
    pub fn start_at(&self) -> StartAt {
        parse_start_at(&self.start_at).expect("validated: producer.start_at")
    }

    /// The backoff every retry loop of the producer waits by: `retry_initial` to `retry_max`.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.retry_initial,
            max: self.retry_max,
        }
    }
}

fn parse_start_at(s: &str) -> Result<StartAt, String> {
    match s {
        "now" => Ok(StartAt::Now),
        "beginning" => Ok(StartAt::Beginning),
        t => time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .map(|t| StartAt::Time(t.unix_timestamp()))
            .map_err(|e| {
                format!("{t:?} is neither \"now\", \"beginning\" nor an RFC 3339 time: {e}")
            }),
    }
}

impl ProducerConfig {
    /// The stream name (validated to be set).
    pub fn stream(&self) -> String {
        self.producer.stream.clone().unwrap_or_else(|| {
            format!(
                "{}.{}",
                self.mongodb.database(),
                self.mongodb.events_collection
            )
        })
    }
}

impl Validate for ProducerConfig {
    fn validate(&mut self) -> Result<(), ConfigError> {
        self.mongodb.validate()?;
        self.servicebus.validate()?;
        self.telemetry.validate()?;
        self.shutdown.validate()?;
        // One key at a time, in the order of the file's sections: the first bad key is named.
        let p = &self.producer;
        check_start(p)?;
        check_sending(p)?;
        check_checkpoints(p)?;
        check_reading(p)?;
        check_fault_timing(p)?;
        check_retry(p)
    }
}

/// `stream` and `start_at`.
fn check_start(p: &ProducerSection) -> Result<(), ConfigError> {
    check_not_empty("producer.stream", p.stream.as_deref() == Some(""))?;
    parse_start_at(&p.start_at).map_err(|e| ConfigError::invalid("producer.start_at", e))?;
    Ok(())
}

/// Senders, connections and the in-flight and message size bounds.
fn check_sending(p: &ProducerSection) -> Result<(), ConfigError> {
    check_range("producer.senders", p.senders, 1, 256)?;
    check_range("producer.connections", p.connections, 1, 64)?;
    check_range(
        "producer.max_in_flight_messages",
        p.max_in_flight_messages,
        1,
        1_000_000,
    )?;
    check_range("producer.max_batch_messages", p.max_batch_messages, 1, 4500)?;
    check_range(
        "producer.max_message_bytes",
        p.max_message_bytes,
        1024,
        100 * 1024 * 1024,
    )?;
    if p.max_in_flight_bytes < p.max_message_bytes {
        return Err(ConfigError::invalid(
            "producer.max_in_flight_bytes",
            format!(
                "{} is smaller than producer.max_message_bytes ({})",
                p.max_in_flight_bytes, p.max_message_bytes
            ),
        ));
    }
    Ok(())
}

/// How often the checkpoint is saved.
fn check_checkpoints(p: &ProducerSection) -> Result<(), ConfigError> {
    check_duration(
        "producer.checkpoint_interval",
        p.checkpoint_interval,
        Duration::from_millis(10),
        Duration::from_secs(3600),
    )?;
    // Below `checkpoint_interval` it is that interval; above 4 minutes an idle producer's
    // checkpoint would age past the OrdoCheckpointStale alert (300 s).
    check_duration(
        "producer.idle_checkpoint_interval",
        p.idle_checkpoint_interval,
        Duration::from_millis(10),
        Duration::from_secs(240),
    )?;
    check_range(
        "producer.checkpoint_every_events",
        p.checkpoint_every_events,
        1,
        10_000_000,
    )?;
    Ok(())
}

/// The change stream and scans, the deprecated recovery keys, and how far the reader may run
/// ahead of the acknowledged prefix.
fn check_reading(p: &ProducerSection) -> Result<(), ConfigError> {
    check_duration(
        "producer.max_await_time",
        p.max_await_time,
        Duration::from_millis(10),
        Duration::from_secs(60),
    )?;
    check_range("producer.read_batch_size", p.read_batch_size, 1, 100_000)?;
    check_duration(
        "producer.history_safety_margin",
        p.history_safety_margin,
        Duration::ZERO,
        Duration::from_secs(30 * 24 * 3600),
    )?;
    check_not_empty("producer.replay_time_field", p.replay_time_field.is_empty())?;
    check_not_empty("producer.scan_sort", p.scan_sort.is_empty())?;
    for (k, v) in &p.scan_sort {
        if !matches!(v, toml::Value::Integer(1) | toml::Value::Integer(-1)) {
            return Err(ConfigError::invalid(
                format!("producer.scan_sort.{k}"),
                format!("{v} must be 1 or -1"),
            ));
        }
    }
    check_range(
        "producer.max_unacknowledged",
        p.max_unacknowledged,
        p.max_in_flight_messages,
        100_000_000,
    )?;
    Ok(())
}

/// How soon a fault is noticed: a stuck prefix, the broker probe, a missing index, the lease, a
/// send.
fn check_fault_timing(p: &ProducerSection) -> Result<(), ConfigError> {
    check_duration(
        "producer.checkpoint_stuck_after",
        p.checkpoint_stuck_after,
        Duration::from_secs(1),
        Duration::from_secs(24 * 3600),
    )?;
    check_duration(
        "producer.probe_interval",
        p.probe_interval,
        Duration::from_millis(100),
        Duration::from_secs(300),
    )?;
    check_duration(
        "producer.index_check_interval",
        p.index_check_interval,
        Duration::from_millis(100),
        Duration::from_secs(24 * 3600),
    )?;
    check_duration(
        "producer.lease_ttl",
        p.lease_ttl,
        Duration::from_secs(1),
        Duration::from_secs(600),
    )?;
    check_duration(
        "producer.send_timeout",
        p.send_timeout,
        Duration::from_millis(100),
        Duration::from_secs(600),
    )?;
    Ok(())
}

/// The retry backoff's bounds.
fn check_retry(p: &ProducerSection) -> Result<(), ConfigError> {
    check_duration(
        "producer.retry_initial",
        p.retry_initial,
        Duration::from_millis(1),
        Duration::from_secs(60),
    )?;
    check_duration(
        "producer.retry_max",
        p.retry_max,
        p.retry_initial,
        Duration::from_secs(600),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_modes_parse() {
        assert_eq!(parse_start_at("now"), Ok(StartAt::Now));
        assert_eq!(parse_start_at("beginning"), Ok(StartAt::Beginning));
        assert_eq!(
            parse_start_at("1970-01-01T00:01:00Z"),
            Ok(StartAt::Time(60))
        );
        assert!(parse_start_at("yesterday").is_err());
    }
}
