//! Service Bus for tests: the embedded emulator on its own loopback address, or a real namespace
//! named by `ORDO_TEST_SERVICEBUS_CONNECTION_STRING`.

use std::path::PathBuf;

use anyhow::Context as _;
use ordo_servicebus_emulator::{Emulator, EmulatorConfig, EmulatorHandle};

use crate::{TestCa, Unavailable};

/// Environment variable naming a real Service Bus namespace to test against.
pub const CONNECTION_STRING_ENV: &str = "ORDO_TEST_SERVICEBUS_CONNECTION_STRING";
/// Topic to use with a real namespace (default `ordo-events`).
pub const TOPIC_ENV: &str = "ORDO_TEST_SERVICEBUS_TOPIC";
/// Session-enabled subscription to use with a real namespace (default `projector`).
pub const SUBSCRIPTION_ENV: &str = "ORDO_TEST_SERVICEBUS_SUBSCRIPTION";

const DEFAULT_TOPIC: &str = "ordo-events";
const DEFAULT_SUBSCRIPTION: &str = "projector";

/// `connection_string` with another, valid-looking key: the broker refuses its tokens.
pub fn with_wrong_key(connection_string: &str) -> String {
    let key = connection_string
        .split("SharedAccessKey=")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .expect("a connection string with SharedAccessKey=");
    let wrong = connection_string.replace(
        &format!("SharedAccessKey={key}"),
        "SharedAccessKey=d3Jvbmcta2V5LXdyb25nLWtleQ==",
    );
    assert_ne!(wrong, connection_string, "the key was replaced");
    wrong
}

/// A Service Bus namespace to test against.
///
/// The emulator binds `127.0.0.N:5672` with a random `N` in 2..=250: Service Bus clients
/// always dial port 5672, so parallel tests are told apart by address. The emulator stops when
/// the fixture is dropped (or at [`TestServiceBus::shutdown`]).
#[derive(Debug)]
pub struct TestServiceBus {
    emulator: Option<EmulatorHandle>,
    connection_string: String,
    topic: String,
    subscription: String,
    /// The CA of the emulator's AMQPS listener, when the fixture serves TLS.
    tls: Option<TestCa>,
}

impl TestServiceBus {
    /// The namespace every ordo component expects: topic `ordo-events` with the session
    /// subscription `projector`.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(EmulatorConfig::default_ordo()).await
    }

    /// An emulator with `config`; [`TestServiceBus::topic`] and
    /// [`TestServiceBus::subscription`] name its first topic and that topic's first
    /// subscription. With a real namespace `config` is ignored.
    pub async fn start_with(config: EmulatorConfig) -> anyhow::Result<Self> {
        if let Ok(cs) = std::env::var(CONNECTION_STRING_ENV) {
            if !cs.trim().is_empty() {
                return Ok(Self {
                    emulator: None,
                    connection_string: cs,
                    topic: env_or(TOPIC_ENV, DEFAULT_TOPIC),
                    subscription: env_or(SUBSCRIPTION_ENV, DEFAULT_SUBSCRIPTION),
                    tls: None,
                });
            }
        }
        Self::start_emulator(config).await
    }

    /// The embedded emulator with `config`, whatever the environment names: for tests that
    /// read the emulator's state or cut it off (stats, dead letters, outages), which a real
    /// namespace does not offer. [`TestServiceBus::topic`] and
    /// [`TestServiceBus::subscription`] name its first topic and that topic's first
    /// subscription.
    pub async fn start_emulator(config: EmulatorConfig) -> anyhow::Result<Self> {
        let topic = config.topics.first();
        let topic_name = topic.map_or(DEFAULT_TOPIC.to_owned(), |t| t.name.clone());
        let subscription = topic
            .and_then(|t| t.subscriptions.first())
            .map_or(DEFAULT_SUBSCRIPTION.to_owned(), |s| s.name.clone());
        let emulator = Emulator::start_on_free_loopback(config)
            .await
            .context("starting the emulator")?;
        Ok(Self {
            connection_string: emulator.connection_string(),
            emulator: Some(emulator),
            topic: topic_name,
            subscription,
            tls: None,
        })
    }

    /// [`TestServiceBus::start_with`], the emulator also serving AMQPS with a certificate of a
    /// CA made for this fixture; [`TestServiceBus::connection_string`] is then the Azure kind
    /// (TLS on 5671, no `UseDevelopmentEmulator`) and [`TestServiceBus::ca_file`] the CA the
    /// clients must trust. With a real namespace `config` is ignored and there is no CA file.
    pub async fn start_tls(mut config: EmulatorConfig) -> anyhow::Result<Self> {
        let ca = TestCa::loopback()?;
        config.namespace.tls_cert = Some(ca.cert_file());
        config.namespace.tls_key = Some(ca.key_file());
        let mut bus = Self::start_with(config).await?;
        if let Some(emulator) = &bus.emulator {
            bus.connection_string = emulator
                .tls_connection_string()
                .context("the emulator serves TLS")?;
            bus.tls = Some(ca);
        }
        Ok(bus)
    }

    /// The CA file clients must trust for [`TestServiceBus::connection_string`], when the
    /// fixture serves TLS.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.tls.as_ref().map(TestCa::ca_file)
    }

    /// [`TestServiceBus::connection_string`] with another key name and key (an authorization
    /// rule of the emulator's configuration); `None` against a real namespace.
    pub fn connection_string_for_key(&self, key_name: &str, key: &str) -> Option<String> {
        self.emulator.as_ref()?;
        let kept: Vec<&str> = self
            .connection_string
            .split(';')
            .filter(|part| {
                let name = part.split('=').next().unwrap_or_default();
                !name.eq_ignore_ascii_case("SharedAccessKeyName")
                    && !name.eq_ignore_ascii_case("SharedAccessKey")
            })
            .collect();
        let mut parts = kept;
        let name_part = format!("SharedAccessKeyName={key_name}");
        let key_part = format!("SharedAccessKey={key}");
        parts.insert(1, &name_part);
        parts.insert(2, &key_part);
        Some(parts.join(";"))
    }

    /// The connection string daemons and clients use.
    pub fn connection_string(&self) -> &str {
        &self.connection_string
    }

    /// The topic the producer publishes to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The session-enabled subscription the projector reads.
    pub fn subscription(&self) -> &str {
        &self.subscription
    }

    /// Whether the tests run against a namespace named by the environment.
    pub fn is_external(&self) -> bool {
        self.emulator.is_none()
    }

    /// The emulator, for stats, dead letters and fault injection; [`Unavailable`] against a real
    /// namespace.
    pub fn emulator(&self) -> Result<&EmulatorHandle, Unavailable> {
        self.emulator.as_ref().ok_or(Unavailable {
            what: "control the service bus emulator",
            reason: "ORDO_TEST_SERVICEBUS_CONNECTION_STRING points at a real namespace",
        })
    }

    /// Simulates a broker outage (connections cut, state kept); see
    /// [`EmulatorHandle::suspend`].
    pub async fn suspend(&self) -> Result<(), Unavailable> {
        self.emulator()?.suspend().await;
        Ok(())
    }

    /// Ends the outage started by [`TestServiceBus::suspend`]. The outer error is
    /// [`Unavailable`]; the inner one a failed re-bind.
    pub async fn resume(&self) -> Result<anyhow::Result<()>, Unavailable> {
        Ok(self
            .emulator()?
            .resume()
            .await
            .context("resuming the emulator"))
    }

    /// Stops the emulator and waits for its connections to end.
    pub async fn shutdown(mut self) {
        if let Some(emulator) = self.emulator.take() {
            emulator.shutdown().await;
        }
    }
}

/// The layouts Azure allows ordo's topic to have; each asks for its own send mode of the
/// producer (docs/configuration.md, `send_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Partitioned, with duplicate detection: the default entities and deploy/azure's.
    /// Refuses a batch of distinct MessageIds, so the producer sends one message at a time.
    PartitionedDeduplicated,
    /// Partitioned, without duplicate detection: batches of one session are accepted.
    Partitioned,
    /// Not partitioned, with duplicate detection: batches are accepted.
    Unpartitioned,
}

/// ordo's default entities ([`EmulatorConfig::default_ordo`]) with every subscription's
/// session lock `lock`: tests use a short one, so the sessions of a killed projector move on
/// within seconds.
pub fn emulator_config(lock: std::time::Duration) -> EmulatorConfig {
    let mut cfg = EmulatorConfig::default_ordo();
    for t in &mut cfg.topics {
        for s in &mut t.subscriptions {
            s.lock_duration = lock;
        }
    }
    cfg
}

impl Topology {
    /// Whether the topic accepts a batch of several messages of one session.
    pub fn accepts_batches(self) -> bool {
        self != Topology::PartitionedDeduplicated
    }

    /// ordo's default entities ([`EmulatorConfig::default_ordo`]) laid out this way.
    pub fn emulator_config(self) -> EmulatorConfig {
        self.apply(EmulatorConfig::default_ordo())
    }

    /// `config` with its first topic laid out this way.
    pub fn apply(self, mut config: EmulatorConfig) -> EmulatorConfig {
        let topic = config.topics.first_mut().expect("a topic to lay out");
        let (partitions, dedup) = match self {
            Topology::PartitionedDeduplicated => (16, true),
            Topology::Partitioned => (16, false),
            Topology::Unpartitioned => (0, true),
        };
        topic.partition_count = partitions;
        topic.duplicate_detection_window = dedup.then(|| std::time::Duration::from_secs(600));
        config
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}
