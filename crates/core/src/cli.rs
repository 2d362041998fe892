//! What both daemons do before `run`: read `--config`, honour `--check-config`.
//!
//! A configuration error is printed as one line naming the key and the process exits with
//! status 2, so a systemd unit or a Kubernetes pod fails loudly at start, not at the first event.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::{self, Env, Validate};

/// Exit status for a configuration error.
pub const EXIT_CONFIG: u8 = 2;

/// Outcome of the configuration step.
#[derive(Debug)]
pub enum Loaded<T> {
    /// Run the daemon with this configuration.
    Run(T),
    /// Exit now with this status (`--check-config`, or a bad configuration).
    Exit(ExitCode),
}

/// Loads `T` from `path` and the process environment. With `check` it prints the resolved
/// configuration (secrets as `***`) and exits 0; on error it prints one line and exits 2.
pub fn load_config<T>(program: &str, path: Option<&Path>, check: bool) -> Loaded<T>
where
    T: DeserializeOwned + Validate + Serialize + Default,
{
    match config::load::<T>(path, &Env::from_process()) {
        Ok(cfg) if check => {
            println!("# {program}: configuration is valid");
            print!("{}", config::render(&cfg));
            Loaded::Exit(ExitCode::SUCCESS)
        }
        Ok(cfg) => Loaded::Run(cfg),
        Err(e) => {
            eprintln!("{program}: config error: {e}");
            Loaded::Exit(ExitCode::from(EXIT_CONFIG))
        }
    }
}

/// The config path from `--config`, else `ORDO_CONFIG`.
pub fn config_path(flag: Option<PathBuf>) -> Option<PathBuf> {
    flag.or_else(|| std::env::var_os("ORDO_CONFIG").map(PathBuf::from))
}

/// Stack size of the runtime's worker threads. The AMQP client's futures are large (tens of
/// KiB each, nested through reconnect and recovery paths); on the default 2 MiB stack a
/// connection recovery after a broker outage overflowed it and aborted the process.
pub const WORKER_STACK_BYTES: usize = 16 * 1024 * 1024;

/// The daemons' multi-threaded runtime, with [`WORKER_STACK_BYTES`] stacks.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(WORKER_STACK_BYTES)
        .build()
}
