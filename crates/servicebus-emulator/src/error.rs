//! Errors of the emulator library.

use std::net::SocketAddr;

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// Path as given.
        path: String,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown/mistyped keys (the message names them).
    #[error("invalid emulator config: {0}")]
    Parse(String),
    /// A value is out of range.
    #[error("invalid emulator config: {key} = {value}: {reason}")]
    Invalid {
        /// Dotted key path, e.g. `topics[0].subscriptions[0].lock_duration`.
        key: String,
        /// The offending value as written.
        value: String,
        /// What is allowed.
        reason: String,
    },
}

/// Errors of [`crate::Emulator`] and [`crate::EmulatorHandle`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Another process (or emulator) already listens on the address; pick another 127.0.0.N.
    #[error("address {0} is already in use")]
    AddrInUse(SocketAddr),
    /// [`crate::Emulator::start_on_free_loopback`] found every address it tried taken.
    #[error(
        "no free loopback address on port 5672 after {attempts} attempts (last tried {last:?})"
    )]
    NoFreeLoopback {
        /// How many addresses were tried.
        attempts: usize,
        /// The last address tried.
        last: Option<SocketAddr>,
    },
    /// Binding or serving failed for another reason.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address we tried to bind.
        addr: SocketAddr,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The TLS certificate or key, or the Entra issuer's public key, cannot be used.
    #[error("cannot use key or certificate file {path}: {reason}")]
    Tls {
        /// The certificate or key file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No such topic, subscription or queue.
    #[error("entity not found: {0}")]
    EntityNotFound(String),
}

impl Error {
    /// True when the listen address is taken, so callers can retry with another address.
    pub fn is_addr_in_use(&self) -> bool {
        matches!(self, Error::AddrInUse(_))
    }
}
