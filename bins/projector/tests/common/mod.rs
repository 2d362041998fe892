//! Shared fixtures of the projector's integration tests: SecantusDB, the testkit's embedded
//! emulator on its own loopback address, a seeded User/Order workload, publishing by the
//! contract, and the expected read models folded from the events collection with the same
//! projections.
//!
//! This file: the environment ([`Env`]), the tests' `[projector]` and projections, starting
//! and stopping projectors. `publish`: publishing events by the contract; `read_models`: the
//! read models and the fold they must equal; `workload`: the seeded events.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::Document;
use ordo_projection::{Projection, ProjectionsFile};
pub use ordo_projector::config::ProjectorSection;
use ordo_servicebus_emulator::config::EmulatorConfig;
use ordo_servicebus_emulator::EmulatorHandle;
pub use ordo_testkit::oracle::Expected;
use ordo_testkit::{free_health_addr, ConfigFile, Daemon, TestMongo, TestServiceBus};

mod publish;
mod read_models;
mod workload;

// Each test crate and bench uses its own part of these.
#[allow(unused_imports)]
pub use publish::to_message;
#[allow(unused_imports)]
pub use read_models::{all_documents, as_projected, expected_of, raw_models};
#[allow(unused_imports)]
pub use workload::{event, workload};

pub const TOPIC: &str = "ordo-events";
pub const SUB: &str = "projector";

pub fn projections_path() -> PathBuf {
    ordo_testkit::paths::workspace_root().join("config/projections.toml")
}

/// The test configuration's projections.
pub fn projections() -> Vec<Arc<dyn Projection>> {
    compile(&std::fs::read_to_string(projections_path()).unwrap())
}

/// The projections of a projections file's `text`.
pub fn compile(text: &str) -> Vec<Arc<dyn Projection>> {
    ProjectionsFile::load_str(text)
        .unwrap()
        .into_iter()
        .map(|p| Arc::new(p) as Arc<dyn Projection>)
        .collect()
}

/// The tests' `[projector]`: the test projections, a few sessions, and short timeouts and
/// retries, so a fault shows within seconds. A test changes fields of it
/// (`ProjectorSection { batch_size: 2, ..tuning() }`).
pub fn tuning() -> ProjectorSection {
    let ms = Duration::from_millis;
    ProjectorSection {
        projections_file: projections_path(),
        max_concurrent_sessions: 4,
        batch_size: 50,
        receive_wait: ms(200),
        accept_timeout: Duration::from_secs(3),
        session_idle_timeout: ms(300),
        lock_renewal_interval: Duration::from_secs(1),
        gap_timeout: Duration::from_secs(2),
        retry_initial: ms(20),
        retry_max: ms(200),
        ..ProjectorSection::default()
    }
}

/// A database and an emulator for one test. Always the embedded emulator, even when
/// `ORDO_TEST_SERVICEBUS_CONNECTION_STRING` names a namespace: these tests read its state
/// (pending messages, dead letters, connections) and cut it off.
pub struct Env {
    pub mongo: TestMongo,
    pub bus: TestServiceBus,
}

/// Starts SecantusDB and an emulator (session-enabled subscription, `lock` lock duration).
pub async fn start(lock: Duration) -> Env {
    start_with(lock, |cfg| {
        // The emulator answers an accept with no session before the projector's own timeout,
        // so accepts end with the broker's answer (faster tests); `start_with` can keep the
        // broker's own 60 s hold, which production meets.
        cfg.namespace.session_accept_timeout = Duration::from_secs(1);
    })
    .await
}

/// Like [`start`], with the emulator's configuration changed by `tune` first.
pub async fn start_with(lock: Duration, tune: impl FnOnce(&mut EmulatorConfig)) -> Env {
    let mongo = TestMongo::start().await.expect("mongodb");
    let mut cfg = ordo_testkit::servicebus::emulator_config(lock);
    tune(&mut cfg);
    let bus = TestServiceBus::start_emulator(cfg)
        .await
        .unwrap_or_else(|e| panic!("emulator: {e:#}"));
    Env { mongo, bus }
}

impl Env {
    /// The emulator, for stats, dead letters and outages.
    pub fn emulator(&self) -> &EmulatorHandle {
        self.bus
            .emulator()
            .expect("the projector's tests start the embedded emulator")
    }

    /// The connection string daemons and clients use.
    pub fn conn(&self) -> &str {
        self.bus.connection_string()
    }

    /// A projector's configuration file with `projector` as its `[projector]`.
    pub fn projector_toml(
        &self,
        health: std::net::SocketAddr,
        projector: &ProjectorSection,
    ) -> String {
        self.projector_config(health, projector).render()
    }

    /// A projector's configuration with `projector` as its `[projector]`.
    pub fn projector_config(
        &self,
        health: std::net::SocketAddr,
        projector: &ProjectorSection,
    ) -> ConfigFile {
        ConfigFile::new(
            self.mongo.uri(),
            self.mongo.db_name(),
            self.conn(),
            TOPIC,
            health,
            "info,ordo_projector=debug",
        )
        .set("servicebus", "subscription", SUB)
        .section("projector", projector)
    }

    /// Starts a projector with the tests' [`tuning`] without waiting for it to be ready; `edit`
    /// changes its configuration.
    pub fn spawn_unready(&self, edit: impl FnOnce(ConfigFile) -> ConfigFile) -> Daemon {
        let health = free_health_addr();
        let config = edit(self.projector_config(health, &tuning())).render();
        Daemon::spawn(&bin(), &config, health, &[]).expect("spawn projector")
    }

    /// Starts a projector with `projector` as its `[projector]` and waits until it is ready.
    pub async fn spawn_projector(&self, projector: ProjectorSection) -> Daemon {
        let health = free_health_addr();
        let mut d = Daemon::spawn(
            &bin(),
            &self.projector_toml(health, &projector),
            health,
            &[],
        )
        .expect("spawn projector");
        d.wait_ready(Duration::from_secs(30))
            .await
            .expect("projector ready");
        d
    }

    pub fn events(&self) -> mongodb::Collection<Document> {
        self.mongo.database().collection("events")
    }

    pub async fn insert_events(&self, events: &[Document]) {
        for chunk in events.chunks(1000) {
            self.events().insert_many(chunk.to_vec()).await.unwrap();
        }
    }

    /// Number of messages the subscription holds (waiting or locked), from the emulator.
    pub fn active(&self) -> usize {
        let s = self.emulator().stats();
        s.entity(&format!("{TOPIC}/Subscriptions/{SUB}"))
            .map(|e| e.active)
            .unwrap_or(0)
    }

    pub fn dead_letters(&self) -> Vec<ordo_servicebus_emulator::stats::DeadLetteredMessage> {
        self.emulator()
            .subscription_dead_letters(TOPIC, SUB)
            .unwrap()
    }

    pub fn pending(&self) -> usize {
        let s = self.emulator().stats();
        s.entity(&format!("{TOPIC}/Subscriptions/{SUB}"))
            .map(|e| e.active + e.locked)
            .unwrap_or(0)
    }
}

/// Stops `projector` with SIGTERM; it must exit 0 within 15 s.
pub async fn stop(projector: &mut Daemon) {
    projector.sigterm().unwrap();
    let status = projector.wait_exit(Duration::from_secs(15)).await.unwrap();
    assert!(status.success(), "{status:?}\n{}", projector.logs());
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ordo-projector"))
}
