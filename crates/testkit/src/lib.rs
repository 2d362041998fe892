//! Test harness for ordo: provisions and starts the stand-ins, spawns the daemons.
//!
//! Every integration test in the workspace goes through this crate, so the same test runs
//! against the local stand-ins (SecantusDB, the embedded Service Bus emulator) or against real
//! services when the environment names them:
//!
//! - `ORDO_TEST_MONGODB_URI`: use this MongoDB deployment instead of starting SecantusDB. Each
//!   fixture still gets its own database, so tests stay isolated.
//! - `ORDO_TEST_SERVICEBUS_CONNECTION_STRING` (+ `ORDO_TEST_SERVICEBUS_TOPIC`,
//!   `ORDO_TEST_SERVICEBUS_SUBSCRIPTION`): use this namespace instead of the emulator.
//! - `ORDO_TEST_SCALE=full`: run the workload-sized tests at five times their size ([`scale`]).
//!
//! Fault injection that needs the stand-in process (kill, restart, suspend) reports
//! [`Unavailable`] against real services; tests skip those steps with a printed reason.
//!
//! Tests synchronise with [`wait_until`] / [`wait_for`], never with fixed sleeps.
//!
//! Module map:
//! - [`mongo`], [`secantus`]: MongoDB per fixture (SecantusDB, or a real deployment).
//! - [`servicebus`]: Service Bus per fixture (the embedded emulator, or a real namespace).
//! - [`entra`], [`tls`]: a test token issuer and a test certificate authority.
//! - [`config`]: daemon configuration files, built as TOML tables.
//! - [`daemon`]: the daemons as real processes.
//! - [`oracle`]: the read models a set of events must lead to.
//! - [`wait`]: polling with a deadline; `watchdog` says where a hung test hangs.
//! - [`prom`]: reading `/metrics`. [`bench`]: what the benchmarks share.
//! - [`scale`]: how large the workload-sized tests run.
//! - [`net`], [`paths`], `lock`: free ports, where things live, a cross-process file lock.
//! - this file: [`Unavailable`], a fault-injection step a real service cannot take.

pub mod bench;
pub mod config;
pub mod daemon;
pub mod entra;
mod lock;
pub mod mongo;
pub mod net;
pub mod oracle;
pub mod paths;
pub mod prom;
pub mod scale;
pub mod secantus;
pub mod servicebus;
pub mod tls;
pub mod wait;
mod watchdog;

pub use config::ConfigFile;
pub use daemon::{bin_path, bin_path_in, check_config, Daemon};
pub use mongo::{SecantusDb, SecantusOptions, TestMongo};
pub use net::{free_health_addr, free_local_port};
pub use scale::{scale, Scale};
pub use servicebus::{TestServiceBus, Topology};
pub use tls::TestCa;
pub use wait::{wait_for, wait_until, wait_until_ok};

/// A fault-injection step that needs a local stand-in process, asked of a real service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    /// What could not be done, e.g. "kill the mongodb server".
    pub what: &'static str,
    /// Why, e.g. "ORDO_TEST_MONGODB_URI points at an external deployment".
    pub reason: &'static str,
}

impl Unavailable {
    /// Prints the standard skip line; tests call this and return early.
    pub fn skip(&self) {
        eprintln!("skipping: cannot {}: {}", self.what, self.reason);
    }
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot {}: {}", self.what, self.reason)
    }
}

impl std::error::Error for Unavailable {}
