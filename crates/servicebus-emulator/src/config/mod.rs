//! Entity configuration: what the emulated namespace contains.
//!
//! The TOML mirrors the knobs of a real Service Bus namespace that ordo relies on. Durations are
//! human-readable strings (`"30s"`, `"10m"`) so the file reads like the portal.
//!
//! This file holds the types and their defaults; `access` who may do what (keys, Entra role
//! assignments), `validate` the checks a TOML parser cannot make, `durations` the serde form
//! of durations.

use std::{path::Path, time::Duration};

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

mod access;
mod durations;
mod validate;

pub use access::{AccessRight, AuthorizationRule, DataRole, EntraConfig, RoleAssignment};

use durations::{duration, opt_duration};

/// Service Bus Standard/Premium default for the largest accepted message (256 KiB).
pub const DEFAULT_MAX_MESSAGE_SIZE_BYTES: u64 = 256 * 1024;
/// Service Bus default lock duration for queues and subscriptions.
pub const DEFAULT_LOCK_DURATION: Duration = Duration::from_secs(60);
/// Service Bus default maximum delivery count.
pub const DEFAULT_MAX_DELIVERY_COUNT: u32 = 10;
/// Default message time-to-live: Service Bus uses "forever"; 14 days keeps timestamps sane.
pub const DEFAULT_MESSAGE_TTL: Duration = Duration::from_secs(14 * 24 * 3600);

/// The whole emulated namespace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmulatorConfig {
    /// Namespace-wide settings (credentials printed in the connection string).
    #[serde(default)]
    pub namespace: NamespaceConfig,
    /// Topics with their subscriptions.
    #[serde(default)]
    pub topics: Vec<TopicConfig>,
    /// Queues.
    #[serde(default)]
    pub queues: Vec<QueueConfig>,
}

/// Namespace-wide settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Name of the namespace's Manage key, put in the connection string (Azure's
    /// `RootManageSharedAccessKey`).
    #[serde(default = "default_key_name")]
    pub key_name: String,
    /// The Manage key itself. CBS tokens are verified against it and against
    /// [`NamespaceConfig::authorization_rules`], as Service Bus verifies them.
    #[serde(default = "default_key")]
    pub key: String,
    /// More named keys with their rights, like a namespace's shared access policies.
    #[serde(default)]
    pub authorization_rules: Vec<AuthorizationRule>,
    /// Whether put-token verifies SAS tokens and links need a valid one (or a SASL PLAIN
    /// login) for their entity and right, as on Service Bus. Off, every put-token is answered
    /// 202 and any client may attach.
    #[serde(default = "default_true")]
    pub require_authorization: bool,
    /// Added before every byte the broker sends reaches the client (attach, transfer outcome,
    /// disposition, `$management` and `$cbs` answers, deliveries), to play the network round
    /// trip to Azure (in-region: a few milliseconds) on loopback. `"0s"` (the default) adds
    /// nothing.
    #[serde(default, with = "duration")]
    pub round_trip: Duration,
    /// Host name written into the connection string; defaults to the bind address.
    #[serde(default)]
    pub hostname: Option<String>,
    /// How long accept-next-session waits for a session when the client sends no
    /// `com.microsoft:timeout` (Service Bus: 60 s). Tests shorten it.
    #[serde(default = "default_accept_timeout", with = "duration")]
    pub session_accept_timeout: Duration,
    /// Test knob, not a Service Bus rule: a put token counts as expiring after at most this
    /// long, whatever its `se` says, so tests can watch clients renew (or fail to) without
    /// waiting for the hour-long tokens SDKs make. Absent: tokens live until their `se`.
    #[serde(default, with = "opt_duration")]
    pub max_token_lifetime: Option<Duration>,
    /// Test knob, not a Service Bus rule: accept-next-session ignores the client's
    /// `com.microsoft:timeout` and waits `session_accept_timeout`, as a broker that leaves an
    /// accept unanswered past the client's own timeout, so tests can watch the client give up.
    #[serde(default)]
    pub ignore_client_accept_timeout: bool,
    /// PEM certificate chain for AMQPS: with [`NamespaceConfig::tls_key`], the emulator also
    /// serves TLS on port 5671 of its address (Service Bus's AMQPS port).
    #[serde(default)]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of [`NamespaceConfig::tls_cert`].
    #[serde(default)]
    pub tls_key: Option<std::path::PathBuf>,
    /// Microsoft Entra ID, played by a test issuer: put-token also takes JWTs (`type = "jwt"`)
    /// this issuer signed, with the rights of the principal's role assignments. Absent: a JWT
    /// is answered 401.
    #[serde(default)]
    pub entra: Option<EntraConfig>,
}

impl NamespaceConfig {
    /// Every key of the namespace: the Manage key of the connection string, then the rules.
    pub fn keys(&self) -> Vec<AuthorizationRule> {
        let mut keys = vec![AuthorizationRule {
            name: self.key_name.clone(),
            key: self.key.clone(),
            secondary_key: None,
            rights: vec![AccessRight::Manage],
        }];
        keys.extend(self.authorization_rules.iter().cloned());
        keys
    }
}

fn default_true() -> bool {
    true
}

fn default_accept_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_key_name() -> String {
    "RootManageSharedAccessKey".to_owned()
}

fn default_key() -> String {
    "SAS_KEY_VALUE".to_owned()
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        Self {
            key_name: default_key_name(),
            key: default_key(),
            authorization_rules: Vec::new(),
            require_authorization: true,
            round_trip: Duration::ZERO,
            hostname: None,
            session_accept_timeout: default_accept_timeout(),
            max_token_lifetime: None,
            ignore_client_accept_timeout: false,
            tls_cert: None,
            tls_key: None,
            entra: None,
        }
    }
}

/// A topic: an ingress point that fans every message out to its subscriptions.
///
/// Its first five fields are repeated in [`QueueConfig`], and the fields a subscription stores
/// messages with in [`SubscriptionConfig`]: serde's `flatten` does not work together with
/// `deny_unknown_fields`, and a misspelt key in an entity must stay an error that names it. The
/// code reads the shared fields through one view each, [`IngressConfig`] and [`StoreConfig`],
/// so their checks and their use are written once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// Entity name (case-insensitive on the wire, like Service Bus).
    pub name: String,
    /// Number of partitions; `0`/absent (or 1) means not partitioned. Partitioned entities refuse
    /// the batches Azure refuses (see the `rules` module); messages are not physically split.
    #[serde(default)]
    pub partition_count: u32,
    /// Largest accepted message (or batch), in bytes.
    #[serde(default = "default_max_message_size")]
    pub max_message_size_bytes: u64,
    /// Duplicate detection history window; absent disables duplicate detection.
    #[serde(default, with = "opt_duration")]
    pub duplicate_detection_window: Option<Duration>,
    /// Time-to-live applied when a message carries none (and the upper bound for those that do).
    #[serde(default = "default_ttl", with = "duration")]
    pub default_message_ttl: Duration,
    /// Subscriptions of this topic.
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionConfig>,
}

/// A subscription: a message store fed by its topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    /// Subscription name.
    pub name: String,
    /// Whether receivers must accept a session to receive.
    #[serde(default)]
    pub requires_session: bool,
    /// How long a peek-lock (or session lock) lasts before it must be renewed.
    #[serde(default = "default_lock", with = "duration")]
    pub lock_duration: Duration,
    /// Deliveries after which a message goes to the dead-letter queue.
    #[serde(default = "default_max_delivery_count")]
    pub max_delivery_count: u32,
    /// Move expired messages to the dead-letter queue instead of dropping them.
    #[serde(default)]
    pub dead_lettering_on_message_expiration: bool,
    /// Overrides the topic's default TTL for this subscription when shorter.
    #[serde(default, with = "opt_duration")]
    pub default_message_ttl: Option<Duration>,
}

/// A queue: ingress and message store in one. Its fields repeat [`TopicConfig`]'s and
/// [`SubscriptionConfig`]'s rather than flatten them, for the reason [`TopicConfig`] gives.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Entity name.
    pub name: String,
    /// Number of partitions; see [`TopicConfig::partition_count`].
    #[serde(default)]
    pub partition_count: u32,
    /// Largest accepted message (or batch), in bytes.
    #[serde(default = "default_max_message_size")]
    pub max_message_size_bytes: u64,
    /// Duplicate detection history window; absent disables duplicate detection.
    #[serde(default, with = "opt_duration")]
    pub duplicate_detection_window: Option<Duration>,
    /// Time-to-live applied when a message carries none.
    #[serde(default = "default_ttl", with = "duration")]
    pub default_message_ttl: Duration,
    /// Whether receivers must accept a session to receive.
    #[serde(default)]
    pub requires_session: bool,
    /// Peek-lock duration.
    #[serde(default = "default_lock", with = "duration")]
    pub lock_duration: Duration,
    /// Deliveries after which a message goes to the dead-letter queue.
    #[serde(default = "default_max_delivery_count")]
    pub max_delivery_count: u32,
    /// Move expired messages to the dead-letter queue instead of dropping them.
    #[serde(default)]
    pub dead_lettering_on_message_expiration: bool,
}

/// The settings of an ingress point (a topic or a queue), read from either config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct IngressConfig<'a> {
    pub name: &'a str,
    pub partition_count: u32,
    pub max_message_size_bytes: u64,
    pub duplicate_detection_window: Option<Duration>,
    pub default_message_ttl: Duration,
}

/// The settings of a message store (a subscription or a queue), read from either config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct StoreConfig {
    pub requires_session: bool,
    pub lock_duration: Duration,
    pub max_delivery_count: u32,
    pub dead_lettering_on_message_expiration: bool,
}

/// `ingress()` for an entity messages are sent to (a topic, a queue): its fields of the same
/// names.
macro_rules! ingress_of {
    ($entity:ty, $doc:literal) => {
        impl $entity {
            #[doc = $doc]
            pub(crate) fn ingress(&self) -> IngressConfig<'_> {
                IngressConfig {
                    name: &self.name,
                    partition_count: self.partition_count,
                    max_message_size_bytes: self.max_message_size_bytes,
                    duplicate_detection_window: self.duplicate_detection_window,
                    default_message_ttl: self.default_message_ttl,
                }
            }
        }
    };
}

/// `store()` for an entity messages are received from (a subscription, a queue): its fields
/// of the same names.
macro_rules! store_of {
    ($entity:ty, $doc:literal) => {
        impl $entity {
            #[doc = $doc]
            pub(crate) fn store(&self) -> StoreConfig {
                StoreConfig {
                    requires_session: self.requires_session,
                    lock_duration: self.lock_duration,
                    max_delivery_count: self.max_delivery_count,
                    dead_lettering_on_message_expiration: self.dead_lettering_on_message_expiration,
                }
            }
        }
    };
}

ingress_of!(TopicConfig, "The topic as an ingress point.");
ingress_of!(QueueConfig, "The queue as an ingress point.");
store_of!(SubscriptionConfig, "The subscription as a message store.");
store_of!(QueueConfig, "The queue as a message store.");

fn default_max_message_size() -> u64 {
    DEFAULT_MAX_MESSAGE_SIZE_BYTES
}
fn default_ttl() -> Duration {
    DEFAULT_MESSAGE_TTL
}
fn default_lock() -> Duration {
    DEFAULT_LOCK_DURATION
}
fn default_max_delivery_count() -> u32 {
    DEFAULT_MAX_DELIVERY_COUNT
}

impl EmulatorConfig {
    /// The namespace every ordo component expects: topic `ordo-events` (partitioned, duplicate
    /// detection on) with the session subscription `projector` (30 s locks, 10 deliveries).
    pub fn default_ordo() -> Self {
        Self {
            namespace: NamespaceConfig::default(),
            topics: vec![TopicConfig {
                name: "ordo-events".to_owned(),
                partition_count: 16,
                max_message_size_bytes: DEFAULT_MAX_MESSAGE_SIZE_BYTES,
                duplicate_detection_window: Some(Duration::from_secs(600)),
                default_message_ttl: DEFAULT_MESSAGE_TTL,
                subscriptions: vec![SubscriptionConfig {
                    name: "projector".to_owned(),
                    requires_session: true,
                    lock_duration: Duration::from_secs(30),
                    max_delivery_count: 10,
                    dead_lettering_on_message_expiration: true,
                    default_message_ttl: None,
                }],
            }],
            queues: Vec::new(),
        }
    }

    /// Parses and validates TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_str(&text)
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
