//! A whole ordo deployment on one machine: the stand-ins (or real services), one producer and
//! any number of projectors as real processes, and the check that matters in the end: every
//! read model equals the fold of the events collection.
//!
//! Files: this one (the deployment: start, configure, spawn, watch the daemons), `verify.rs`
//! (what the read models hold against the events collection), `workload.rs` (writing a
//! workload and waiting for it to be projected).

mod verify;
mod workload;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use mongodb::Database;
use ordo_producer::config::ProducerSection;
use ordo_projection::{DeclarativeProjection, ProjectionsFile};
use ordo_projector::config::ProjectorSection;
use ordo_servicebus_emulator::EmulatorConfig;

use ordo_testkit::{
    bin_path, free_health_addr, paths::workspace_root, ConfigFile, Daemon, TestMongo,
};

pub use ordo_testkit::servicebus::{emulator_config, TestServiceBus};
pub use verify::Verdict;
pub use workload::{caught_up_and_folded, caught_up_and_folded_for, project_a_workload, write};

/// The deployment.
#[derive(Debug)]
pub struct Stack {
    /// MongoDB (SecantusDB unless a real URI is given).
    pub mongo: TestMongo,
    /// Service Bus (the emulator unless a real namespace is given).
    pub bus: TestServiceBus,
    /// The producer, when running.
    pub producer: Option<Daemon>,
    /// The projectors; `None` where one was killed and not restarted.
    pub projectors: Vec<Option<Daemon>>,
    /// The producer's `[producer]`: the defaults, from the beginning of the collection.
    pub producer_settings: ProducerSection,
    /// The projectors' `[projector]`: the defaults, the workspace's projections (which the
    /// verification uses too) and a lock renewal within the stand-in's short session lock.
    pub projector_settings: ProjectorSection,
    /// The producer's connection string when it is not the bus's (a key with fewer rights).
    pub producer_connection_string: Option<String>,
    /// The projectors' connection string when it is not the bus's.
    pub projector_connection_string: Option<String>,
    /// Extra environment of the producer.
    pub producer_env: Vec<(String, String)>,
    /// Extra environment of the projectors.
    pub projector_env: Vec<(String, String)>,
}

impl Stack {
    /// Starts the stand-ins (or connects to the services named by `ORDO_TEST_*`).
    pub async fn start(lock: Duration) -> anyhow::Result<Self> {
        Self::start_with(emulator_config(lock)).await
    }

    /// [`Stack::start`] with a given emulator configuration.
    pub async fn start_with(emulator: EmulatorConfig) -> anyhow::Result<Self> {
        let bus = TestServiceBus::start_with(emulator)
            .await
            .context("start Service Bus stand-in")?;
        Self::start_on(bus).await
    }

    /// [`Stack::start_with`] over TLS: the emulator serves AMQPS with a test CA's certificate,
    /// the daemons get the Azure-style connection string and trust the CA (`ca_file`).
    pub async fn start_tls(emulator: EmulatorConfig) -> anyhow::Result<Self> {
        let bus = TestServiceBus::start_tls(emulator)
            .await
            .context("start Service Bus stand-in with TLS")?;
        Self::start_on(bus).await
    }

    async fn start_on(bus: TestServiceBus) -> anyhow::Result<Self> {
        let mongo = TestMongo::start().await.context("start MongoDB stand-in")?;
        Ok(Self {
            mongo,
            bus,
            producer: None,
            projectors: Vec::new(),
            producer_settings: ProducerSection {
                start_at: "beginning".into(),
                ..ProducerSection::default()
            },
            projector_settings: ProjectorSection {
                projections_file: workspace_root().join("config/projections.toml"),
                // Well inside the stand-in's short session lock (`emulator_config`): with the
                // default 10 s every session held past the lock was lost, whatever it did.
                lock_renewal_interval: Duration::from_secs(1),
                ..ProjectorSection::default()
            },
            producer_connection_string: None,
            projector_connection_string: None,
            producer_env: Vec::new(),
            projector_env: Vec::new(),
        })
    }

    /// The database of the run.
    pub fn db(&self) -> Database {
        self.mongo.database()
    }

    /// The settings both daemons share, with `uri` for MongoDB and the daemon's own
    /// connection string (the test's key) when one is set.
    fn common(
        &self,
        health: SocketAddr,
        uri: &str,
        connection_string: &Option<String>,
    ) -> ConfigFile {
        let config = ConfigFile::new(
            uri,
            self.mongo.db_name(),
            connection_string
                .as_deref()
                .unwrap_or(self.bus.connection_string()),
            self.bus.topic(),
            health,
            "info",
        )
        .set("mongodb", "events_collection", "events")
        .set("servicebus", "subscription", self.bus.subscription())
        .set("telemetry", "log_format", "json");
        match self.bus.ca_file() {
            Some(path) => config.set("servicebus", "ca_file", path.display().to_string()),
            None => config,
        }
    }

    /// The producer's configuration file.
    pub fn producer_config(&self, health: SocketAddr) -> String {
        self.common(health, self.mongo.uri(), &self.producer_connection_string)
            .section("producer", &self.producer_settings)
            .render()
    }

    /// A projector's configuration file, its MongoDB reached through `uri`.
    fn projector_config_with(&self, health: SocketAddr, uri: &str) -> String {
        self.common(health, uri, &self.projector_connection_string)
            .section("projector", &self.projector_settings)
            .render()
    }

    /// A projector's configuration file.
    pub fn projector_config(&self, health: SocketAddr) -> String {
        self.projector_config_with(health, self.mongo.uri())
    }

    /// Runs `ordo-projector <args>` (a one-shot subcommand such as `repair`) to completion with
    /// the projectors' configuration, its MongoDB connections named `app_name` (the URI's
    /// `appName`, which a `failCommand` fail point can single out); returns whether it exited 0
    /// and its output.
    pub async fn projector_command(
        &self,
        app_name: &str,
        args: &[&str],
    ) -> anyhow::Result<(bool, String)> {
        let health = free_health_addr();
        let uri = self.mongo.uri();
        let sep = if uri.contains('?') { '&' } else { '?' };
        let config = self.projector_config_with(health, &format!("{uri}{sep}appName={app_name}"));
        let mut d =
            Daemon::spawn_with_args(&bin_path("ordo-projector"), &config, health, &[], args)?;
        let status = d.wait_exit(Duration::from_secs(120)).await?;
        Ok((status.success(), d.logs()))
    }

    /// Starts the producer and waits until it is ready.
    pub async fn spawn_producer(&mut self) -> anyhow::Result<()> {
        let health = free_health_addr();
        let config = self.producer_config(health);
        let d = spawn_ready("ordo-producer", &config, health, &self.producer_env).await?;
        self.producer = Some(d);
        Ok(())
    }

    /// Starts projector `slot` (a new one when `slot == len`) and waits until it is ready.
    pub async fn spawn_projector(&mut self, slot: usize) -> anyhow::Result<()> {
        let health = free_health_addr();
        let config = self.projector_config(health);
        let d = spawn_ready("ordo-projector", &config, health, &self.projector_env).await?;
        if slot == self.projectors.len() {
            self.projectors.push(Some(d));
        } else {
            self.projectors[slot] = Some(d);
        }
        Ok(())
    }

    /// Fails, with the daemon's log, if any daemon that should be running has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        let named = self
            .producer
            .iter_mut()
            .map(|d| ("ordo-producer".to_string(), d))
            .chain(self.projectors.iter_mut().enumerate().filter_map(|(i, d)| {
                d.as_mut()
                    .map(|d| (format!("ordo-projector #{}", i + 1), d))
            }));
        for (name, d) in named {
            if let Some(status) = d.try_exit_status()? {
                let logs = d.logs();
                let tail: Vec<&str> = logs.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                anyhow::bail!(
                    "{name} exited unexpectedly ({status}); last log lines:\n{}",
                    tail.join("\n")
                );
            }
        }
        Ok(())
    }

    /// Sum of a metric over every running daemon.
    pub async fn metric(&self, name: &str) -> f64 {
        let mut total = 0.0;
        for d in self.producer.iter().chain(self.projectors.iter().flatten()) {
            total += d.metric(name).await;
        }
        total
    }

    /// The compiled projections.
    pub fn projections(&self) -> anyhow::Result<Vec<DeclarativeProjection>> {
        let text = std::fs::read_to_string(&self.projector_settings.projections_file)?;
        Ok(ProjectionsFile::load_str(&text)?)
    }
}

/// Spawns the daemon `bin` with `config` and `env`, and waits until it is ready.
async fn spawn_ready(
    bin: &str,
    config: &str,
    health: SocketAddr,
    env: &[(String, String)],
) -> anyhow::Result<Daemon> {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut d = Daemon::spawn(&bin_path(bin), config, health, &env)?;
    d.wait_ready(Duration::from_secs(60)).await?;
    Ok(d)
}
