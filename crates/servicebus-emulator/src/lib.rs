//! A Service Bus-compatible AMQP 1.0 broker for tests and local development.
//!
//! It speaks the subset of the Service Bus protocol that the official SDKs and azservicebus
//! use: SASL ANONYMOUS/PLAIN, CBS put-token, topics/subscriptions/queues and their dead-letter
//! queues, batches, sessions (accept-next and named, session state, lock renewal), peek-lock
//! settlement, duplicate detection and `$management`. State lives in memory and survives
//! [`EmulatorHandle::suspend`]/[`EmulatorHandle::resume`], which simulate a broker outage.
//!
//! azservicebus and Microsoft's Python (azure-servicebus) and JavaScript (@azure/service-bus)
//! SDKs are tested against it (`tests/`, `tests/microsoft_sdks.rs`). What they rely on is
//! what Service Bus puts on the wire, so the emulator does the same even where AMQP would allow
//! otherwise: the lock token is the delivery tag (.NET `Guid` byte order) and the
//! `x-opt-lock-token` annotation, headers carry every field, unsettled outcomes are answered
//! with the outcome applied. Its AMQP library is a patched fe2o3-amqp (`vendor/README.md`).
//!
//! Module map:
//! - [`config`]: the TOML namespace description ([`EmulatorConfig`]).
//! - `auth`: SAS tokens, Microsoft Entra ID tokens (JWT), authorization rules and what a
//!   connection may do.
//! - `namespace`: entities, address resolution, duplicate detection, fan-out.
//! - `rules`: what a transfer must satisfy to be accepted (Azure's refusals, with sources).
//! - `store`: per-entity message stores, one file per behaviour (see its module docs).
//! - `clock`: the wall clock locks and TTLs are measured with.
//! - `server`: the AMQP listener, links, CBS and `$management` (see its module docs).
//! - `tls`: the AMQPS acceptor from `[namespace] tls_cert/tls_key`.
//! - `wire`: Service Bus annotation names/types, error conditions, batch format, and the
//!   inspection view of a dead-lettered message.
//! - [`stats`]: inspection snapshots (plain data: store -> stats, wire -> stats, never the
//!   other way); `http` serves them as JSON and lists and regenerates keys.
//! - [`error`]: library errors.
//! - `handle`: [`EmulatorHandle`], the running emulator: addresses, connection strings, keys,
//!   inspection, suspend and resume.
//! - this file: [`Emulator`] (start on an address or a free loopback one, bind) and the
//!   sweeper's timer.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ordo_servicebus_emulator::Error> {
//! use ordo_servicebus_emulator::{Emulator, EmulatorConfig};
//! let emulator = Emulator::start(EmulatorConfig::default_ordo(), "127.0.0.7".parse().unwrap()).await?;
//! println!("{}", emulator.connection_string());
//! emulator.shutdown().await;
//! # Ok(()) }
//! ```

mod auth;
mod clock;
pub mod config;
pub mod error;
mod handle;
mod http;
mod namespace;
mod rules;
mod server;
pub mod stats;
mod store;
mod tls;
mod wire;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::net::TcpListener;
use tracing::info;

pub use config::{
    AccessRight, AuthorizationRule, DataRole, EmulatorConfig, EntraConfig, NamespaceConfig,
    QueueConfig, RoleAssignment, SubscriptionConfig, TopicConfig,
};
pub use error::{ConfigError, Error};
use handle::Amqps;
pub use handle::EmulatorHandle;
pub use stats::{DeadLetteredMessage, EntityStats, NamespaceStats, SessionStats};

use server::Shared;

/// The AMQP port every Service Bus client dials for plain connections; clients ignore ports in
/// connection strings, so parallel emulators use distinct loopback addresses instead.
pub const AMQP_PORT: u16 = 5672;

/// The port Service Bus clients dial for AMQP over TLS.
pub const AMQPS_PORT: u16 = 5671;

/// How often locks and message TTLs are checked.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Entry point: starts emulators.
#[derive(Debug)]
pub struct Emulator;

impl Emulator {
    /// Starts an emulator on `bind_ip:5672`. Fails with [`Error::AddrInUse`] when the address is
    /// taken (pick another `127.0.0.N`).
    pub async fn start(config: EmulatorConfig, bind_ip: IpAddr) -> Result<EmulatorHandle, Error> {
        Self::start_on(config, SocketAddr::new(bind_ip, AMQP_PORT)).await
    }

    /// Starts an emulator on port 5672 of a free loopback address (`127.A.B.C`, or `127.0.0.N`
    /// with TLS, which test certificates name), picked at random and tried again while taken:
    /// Service Bus clients reach a namespace on its standard port only, so emulators that run
    /// side by side (tests, benchmarks) differ by address.
    pub async fn start_on_free_loopback(config: EmulatorConfig) -> Result<EmulatorHandle, Error> {
        const ATTEMPTS: usize = 64;
        let tls = config.namespace.tls_cert.is_some();
        let mut last = None;
        for _ in 0..ATTEMPTS {
            match Self::start(config.clone(), random_loopback(tls)).await {
                Err(Error::AddrInUse(addr)) => last = Some(addr),
                started => return started,
            }
        }
        Err(Error::NoFreeLoopback {
            attempts: ATTEMPTS,
            last,
        })
    }

    /// Starts an emulator on any address; port 0 picks a free port (only clients that honour
    /// ports, such as fe2o3-amqp directly or .NET, can then reach it). With
    /// `[namespace] tls_cert/tls_key`, AMQPS is served as well: on 5671 of the same IP when
    /// `addr` is port 5672, on a free port otherwise ([`EmulatorHandle::tls_address`]).
    pub async fn start_on(
        config: EmulatorConfig,
        addr: SocketAddr,
    ) -> Result<EmulatorHandle, Error> {
        config.validate()?;
        let acceptor = match (&config.namespace.tls_cert, &config.namespace.tls_key) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
            _ => None,
        };
        let listener = bind(addr).await?;
        let addr = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let tls = match acceptor {
            Some(acceptor) => {
                let port = if addr.port() == AMQP_PORT {
                    AMQPS_PORT
                } else {
                    0
                };
                let tls_listener = bind(SocketAddr::new(addr.ip(), port)).await?;
                let tls_addr = tls_listener
                    .local_addr()
                    .map_err(|source| Error::Bind { addr, source })?;
                Some((acceptor, tls_addr, tls_listener))
            }
            None => None,
        };
        let issuer = match &config.namespace.entra {
            Some(entra) => Some(auth::Issuer::load(entra).map_err(|reason| Error::Tls {
                path: entra.public_key.display().to_string(),
                reason,
            })?),
            None => None,
        };
        let shared = Arc::new(Shared::new(config, issuer));
        let sweeper = {
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SWEEP_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    shared.namespace.sweep();
                }
            })
        };
        let (tls, tls_listener) = match tls {
            Some((acceptor, addr, listener)) => (Some(Amqps { acceptor, addr }), Some(listener)),
            None => (None, None),
        };
        let handle = EmulatorHandle {
            shared,
            addr,
            tls,
            running: tokio::sync::Mutex::new(None),
            sweeper,
            http: std::sync::Mutex::new(Vec::new()),
        };
        handle.listen(listener, tls_listener).await;
        info!(address = %addr, tls = ?handle.tls_address(), "service bus emulator listening");
        Ok(handle)
    }
}

pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            Error::AddrInUse(addr)
        } else {
            Error::Bind { addr, source }
        }
    })
}

/// A random loopback address other than 127.0.0.1 (which other local services use): 127.A.B.C,
/// so that emulators started side by side rarely meet (a suspended one gives its address up
/// until it resumes), or 127.0.0.N for `tls`, since test certificates name 127.0.0.1 to
/// 127.0.0.254.
fn random_loopback(tls: bool) -> IpAddr {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let [a, b, c, ..] = hasher.finish().to_le_bytes();
    let host = c % 249 + 2;
    if tls {
        IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, host))
    } else {
        IpAddr::V4(std::net::Ipv4Addr::new(127, a % 250 + 1, b, host))
    }
}
