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
//! - `wire`: Service Bus annotation names/types, error conditions, batch format.
//! - [`stats`]: inspection snapshots; `http` serves them as JSON and lists and regenerates keys.
//! - [`error`]: library errors.
//! - this file: [`Emulator`] (start, bind), [`EmulatorHandle`] (the running emulator: addresses,
//!   connection strings, suspend and resume, inspection) and the sweeper's timer.
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
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::info;

pub use config::{
    AccessRight, AuthorizationRule, DataRole, EmulatorConfig, EntraConfig, NamespaceConfig,
    QueueConfig, RoleAssignment, SubscriptionConfig, TopicConfig,
};
pub use error::{ConfigError, Error};
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

    /// Starts an emulator on port 5672 of a free loopback address `127.0.0.N`, picked at random
    /// and tried again while taken: Service Bus clients reach a namespace on its standard port
    /// only, so emulators that run side by side (tests, benchmarks) differ by address.
    pub async fn start_on_free_loopback(config: EmulatorConfig) -> Result<EmulatorHandle, Error> {
        const ATTEMPTS: usize = 64;
        let mut last = None;
        for _ in 0..ATTEMPTS {
            match Self::start(config.clone(), random_loopback()).await {
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

async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            Error::AddrInUse(addr)
        } else {
            Error::Bind { addr, source }
        }
    })
}

#[derive(Debug)]
struct Running {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// The TLS side of an emulator.
struct Amqps {
    acceptor: tokio_rustls::TlsAcceptor,
    addr: SocketAddr,
}

impl std::fmt::Debug for Amqps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Amqps").field("addr", &self.addr).finish()
    }
}

/// A running emulator. Dropping it without [`EmulatorHandle::shutdown`] stops the sweeper but
/// leaves connections to end with the runtime.
#[derive(Debug)]
pub struct EmulatorHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// The AMQPS acceptor and address, when TLS is configured.
    tls: Option<Amqps>,
    running: tokio::sync::Mutex<Option<Running>>,
    sweeper: JoinHandle<()>,
    http: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        self.sweeper.abort();
        for task in self
            .http
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
        if let Ok(mut running) = self.running.try_lock() {
            if let Some(running) = running.take() {
                running.cancel.cancel();
            }
        }
    }
}

/// The connection string of the plain listener at `endpoint` (`Endpoint=sb://HOST[:PORT]`) for
/// one key of a rule.
pub(crate) fn emulator_connection_string(endpoint: &str, key_name: &str, key: &str) -> String {
    format!("{endpoint};SharedAccessKeyName={key_name};SharedAccessKey={key};UseDevelopmentEmulator=true")
}

/// A random 127.0.0.N other than 127.0.0.1 (which other local services use); test certificates
/// name 127.0.0.1 to 127.0.0.254.
fn random_loopback() -> IpAddr {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    IpAddr::V4(std::net::Ipv4Addr::new(
        127,
        0,
        0,
        (hasher.finish() % 249) as u8 + 2,
    ))
}

impl EmulatorHandle {
    async fn listen(&self, listener: TcpListener, tls_listener: Option<TcpListener>) {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(server::serve(
            listener,
            None,
            self.shared.clone(),
            cancel.clone(),
            tracker.clone(),
        ));
        if let (Some(listener), Some(tls)) = (tls_listener, &self.tls) {
            tracker.spawn(server::serve(
                listener,
                Some(tls.acceptor.clone()),
                self.shared.clone(),
                cancel.clone(),
                tracker.clone(),
            ));
        }
        *self.running.lock().await = Some(Running { cancel, tracker });
    }

    /// The address AMQP clients connect to.
    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// The AMQPS address, when TLS is configured.
    pub fn tls_address(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|tls| tls.addr)
    }

    fn host(&self) -> String {
        let ns = &self.shared.config.namespace;
        ns.hostname.clone().unwrap_or_else(|| match self.addr.ip() {
            IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        })
    }

    /// `Endpoint=sb://HOST;SharedAccessKeyName=…;SharedAccessKey=…;UseDevelopmentEmulator=true`.
    /// The port appears only when it is not 5672.
    pub fn connection_string(&self) -> String {
        let ns = &self.shared.config.namespace;
        emulator_connection_string(&self.endpoint(), &ns.key_name, &ns.key)
    }

    /// `Endpoint=sb://HOST[:PORT]` of the AMQP listener, the start of its connection strings.
    fn endpoint(&self) -> String {
        let port = if self.addr.port() == AMQP_PORT {
            String::new()
        } else {
            format!(":{}", self.addr.port())
        };
        format!("Endpoint=sb://{}{port}", self.host())
    }

    /// The connection string of the AMQPS listener, as for a namespace on Azure:
    /// `Endpoint=sb://HOST;SharedAccessKeyName=…;SharedAccessKey=…` (clients dial 5671 with TLS;
    /// the port appears only when it is another). `None` without TLS.
    pub fn tls_connection_string(&self) -> Option<String> {
        let tls_addr = self.tls_address()?;
        let ns = &self.shared.config.namespace;
        let port = if tls_addr.port() == AMQPS_PORT {
            String::new()
        } else {
            format!(":{}", tls_addr.port())
        };
        Some(format!(
            "Endpoint=sb://{}{port}/;SharedAccessKeyName={};SharedAccessKey={}",
            self.host(),
            ns.key_name,
            ns.key
        ))
    }

    /// How many links were detached because the token they depended on expired unrenewed.
    pub fn token_expiry_detaches(&self) -> u64 {
        self.shared.token_expiry_detaches.load(Ordering::Relaxed)
    }

    /// Adds a key (an authorization rule), or replaces the key of the same name: a key rotation.
    /// Tokens signed with the old key stay valid until they expire, as on Service Bus.
    pub fn put_key(&self, rule: AuthorizationRule) {
        info!(key = %rule.name, rights = ?rule.rights, "key put");
        self.shared.edit_keys(|keys| keys.put(&rule));
    }

    /// Removes the key named `name` (a revocation): put-token with a token signed by it answers
    /// 401 from now on; tokens already put stay valid until they expire, as on Service Bus.
    /// Returns whether there was such a key.
    pub fn remove_key(&self, name: &str) -> bool {
        info!(key = %name, "key removed");
        self.shared.edit_keys(|keys| keys.remove(name))
    }

    /// Counts per queue/subscription and sessions with their lock holders.
    pub fn stats(&self) -> NamespaceStats {
        self.shared
            .namespace
            .stats(self.shared.connections.load(Ordering::Relaxed))
    }

    /// Contents of the dead-letter queue of `topic/Subscriptions/sub` or `queue`, in sequence
    /// order, without locking or removing anything.
    pub fn dead_letters(&self, entity_path: &str) -> Result<Vec<DeadLetteredMessage>, Error> {
        self.shared
            .namespace
            .entity(entity_path)
            .map(|e| {
                e.dead_letters()
                    .iter()
                    .map(DeadLetteredMessage::of)
                    .collect()
            })
            .ok_or_else(|| Error::EntityNotFound(entity_path.to_owned()))
    }

    /// Dead-letter queue of a subscription.
    pub fn subscription_dead_letters(
        &self,
        topic: &str,
        subscription: &str,
    ) -> Result<Vec<DeadLetteredMessage>, Error> {
        self.dead_letters(&format!("{topic}/Subscriptions/{subscription}"))
    }

    /// Simulates a broker outage: stops listening and cuts every connection, keeping all entity
    /// state (messages, session state, duplicate history). Locks held by the cut connections
    /// are released as for any vanished receiver. Returns once every connection task ended.
    pub async fn suspend(&self) {
        let running = self.running.lock().await.take();
        if let Some(running) = running {
            running.cancel.cancel();
            running.tracker.close();
            running.tracker.wait().await;
            info!(address = %self.addr, "service bus emulator suspended");
        }
    }

    /// Listens again on the same address after [`EmulatorHandle::suspend`].
    pub async fn resume(&self) -> Result<(), Error> {
        if self.running.lock().await.is_some() {
            return Ok(());
        }
        let listener = bind(self.addr).await?;
        let tls_listener = match self.tls_address() {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        self.listen(listener, tls_listener).await;
        info!(address = %self.addr, "service bus emulator resumed");
        Ok(())
    }

    /// Serves the inspection endpoint (`GET /stats`, `GET /dead-letters?entity=PATH`,
    /// `GET /healthz`) and the keys of the namespace's rules (`POST /keys/RULE/listKeys`,
    /// `POST /keys/RULE/regenerateKeys`, for a Manage key) on `addr`; returns the bound address.
    pub async fn serve_http(&self, addr: SocketAddr) -> Result<SocketAddr, Error> {
        let listener = bind(addr).await?;
        let local = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let task = tokio::spawn(http::serve(listener, self.shared.clone(), self.endpoint()));
        self.http
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
        Ok(local)
    }

    /// Stops everything and waits for connection tasks to end.
    pub async fn shutdown(self) {
        self.suspend().await;
        self.sweeper.abort();
    }
}
