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
//! - `auth`: SAS tokens, authorization rules and what a connection may do.
//! - `namespace`: entities, address resolution, duplicate detection, fan-out.
//! - `rules`: what a transfer must satisfy to be accepted (Azure's refusals, with sources).
//! - `store`: per-entity message stores, one file per behaviour (see its module docs).
//! - `clock`: the wall clock locks and TTLs are measured with.
//! - `server`: the AMQP listener, links, CBS and `$management` (see its module docs).
//! - `wire`: Service Bus annotation names/types, error conditions, batch format.
//! - [`stats`]: inspection snapshots; `http` serves them as JSON.
//! - [`error`]: library errors.
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
    AccessRight, AuthorizationRule, EmulatorConfig, NamespaceConfig, QueueConfig,
    SubscriptionConfig, TopicConfig,
};
pub use error::{ConfigError, Error};
pub use stats::{DeadLetteredMessage, EntityStats, NamespaceStats, SessionStats};

use server::Shared;

/// The AMQP port every Service Bus client dials for plain connections; clients ignore ports in
/// connection strings, so parallel emulators use distinct loopback addresses instead.
pub const AMQP_PORT: u16 = 5672;

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

    /// Starts an emulator on any address; port 0 picks a free port (only clients that honour
    /// ports, such as fe2o3-amqp directly or .NET, can then reach it).
    pub async fn start_on(
        config: EmulatorConfig,
        addr: SocketAddr,
    ) -> Result<EmulatorHandle, Error> {
        config.validate()?;
        let listener = bind(addr).await?;
        let addr = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let shared = Arc::new(Shared::new(config));
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
        let handle = EmulatorHandle {
            shared,
            addr,
            running: tokio::sync::Mutex::new(None),
            sweeper,
            http: std::sync::Mutex::new(Vec::new()),
        };
        handle.listen(listener).await;
        info!(address = %addr, "service bus emulator listening");
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

/// A running emulator. Dropping it without [`EmulatorHandle::shutdown`] stops the sweeper but
/// leaves connections to end with the runtime.
#[derive(Debug)]
pub struct EmulatorHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
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

impl EmulatorHandle {
    async fn listen(&self, listener: TcpListener) {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(server::serve(
            listener,
            self.shared.clone(),
            cancel.clone(),
            tracker.clone(),
        ));
        *self.running.lock().await = Some(Running { cancel, tracker });
    }

    /// The address AMQP clients connect to.
    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// `Endpoint=sb://HOST;SharedAccessKeyName=…;SharedAccessKey=…;UseDevelopmentEmulator=true`.
    /// The port appears only when it is not 5672.
    pub fn connection_string(&self) -> String {
        let ns = &self.shared.config.namespace;
        let host = ns.hostname.clone().unwrap_or_else(|| match self.addr.ip() {
            IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        });
        let port = if self.addr.port() == AMQP_PORT {
            String::new()
        } else {
            format!(":{}", self.addr.port())
        };
        format!(
            "Endpoint=sb://{host}{port};SharedAccessKeyName={};SharedAccessKey={};UseDevelopmentEmulator=true",
            ns.key_name, ns.key
        )
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
        self.listen(listener).await;
        info!(address = %self.addr, "service bus emulator resumed");
        Ok(())
    }

    /// Serves the inspection endpoint (`GET /stats`, `GET /dead-letters?entity=PATH`,
    /// `GET /healthz`) on `addr`; returns the bound address.
    pub async fn serve_http(&self, addr: SocketAddr) -> Result<SocketAddr, Error> {
        let listener = bind(addr).await?;
        let local = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let task = tokio::spawn(http::serve(listener, self.shared.clone()));
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
