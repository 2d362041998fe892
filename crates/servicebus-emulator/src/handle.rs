//! [`EmulatorHandle`]: a running emulator, its addresses and connection strings, keys,
//! inspection, suspend and resume, and shutdown.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{atomic::Ordering, Arc},
};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::info;

use crate::{
    bind, http, server, server::Shared, AuthorizationRule, DeadLetteredMessage, Error,
    NamespaceStats, AMQPS_PORT, AMQP_PORT,
};

#[derive(Debug)]
pub(crate) struct Running {
    pub(crate) cancel: CancellationToken,
    pub(crate) tracker: TaskTracker,
}

/// The TLS side of an emulator.
pub(crate) struct Amqps {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    pub(crate) addr: SocketAddr,
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
    pub(crate) shared: Arc<Shared>,
    pub(crate) addr: SocketAddr,
    /// The AMQPS acceptor and address, when TLS is configured.
    pub(crate) tls: Option<Amqps>,
    pub(crate) running: tokio::sync::Mutex<Option<Running>>,
    pub(crate) sweeper: JoinHandle<()>,
    pub(crate) http: std::sync::Mutex<Vec<JoinHandle<()>>>,
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

impl EmulatorHandle {
    pub(crate) async fn listen(&self, listener: TcpListener, tls_listener: Option<TcpListener>) {
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

    /// How many tokens `$cbs` put-token requests have put, on all connections together.
    pub fn tokens_put(&self) -> u64 {
        self.shared.tokens_put.load(Ordering::Relaxed)
    }

    /// How many AMQP sessions clients have begun, on all connections together.
    pub fn sessions_begun(&self) -> u64 {
        self.shared.sessions_begun.load(Ordering::Relaxed)
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
                    .map(crate::wire::dead_lettered_message)
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
