//! MongoDB for tests: SecantusDB started per fixture (see [`crate::secantus`]), or a real
//! deployment named by `ORDO_TEST_MONGODB_URI`. Either way every fixture works in its own
//! database.

use std::time::Duration;

use anyhow::Context as _;
use mongodb::bson::{doc, Document};
use mongodb::{Client, Database};

pub use crate::secantus::{SecantusDb, SecantusOptions};
use crate::Unavailable;

/// Environment variable naming a real MongoDB deployment to test against.
pub const MONGODB_URI_ENV: &str = "ORDO_TEST_MONGODB_URI";

/// The events collection every test writes (the daemons' default `events_collection`).
const EVENTS_COLLECTION: &str = "events";

/// A MongoDB to test against, with a database of its own (`ordo_test_<random>`).
///
/// Starts SecantusDB unless `ORDO_TEST_MONGODB_URI` names a deployment. Against a real
/// deployment the database is dropped when the fixture is dropped; against SecantusDB the
/// server goes away with it.
#[derive(Debug)]
pub struct TestMongo {
    server: Option<SecantusDb>,
    uri: String,
    client: Client,
    db_name: String,
}

impl TestMongo {
    /// A fixture with default options.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(SecantusOptions::default()).await
    }

    /// A fixture; `options` apply only when SecantusDB is started (not with a real URI).
    pub async fn start_with(options: SecantusOptions) -> anyhow::Result<Self> {
        let (server, uri) = match std::env::var(MONGODB_URI_ENV) {
            Ok(uri) if !uri.trim().is_empty() => (None, uri),
            _ => {
                let server = SecantusDb::start(options).await?;
                let uri = server.uri();
                (Some(server), uri)
            }
        };
        let client = Client::with_uri_str(&uri)
            .await
            .with_context(|| format!("connecting to {}", redact(&uri)))?;
        let db_name = unique_db_name();
        // SecantusDB 0.7.0b3 can livelock when one connection creates a collection by indexing
        // it (the producer's unique index on `events`, at its start) while another creates it by
        // inserting (a test writing events): one server thread spins in WiredTiger holding the
        // storage lock, the insert waits for that lock, and the server answers nothing more.
        // Every test writes `events`, so it exists before anything can race to create it.
        client
            .database(&db_name)
            .create_collection(EVENTS_COLLECTION)
            .await
            .with_context(|| format!("creating {db_name}.{EVENTS_COLLECTION}"))?;
        Ok(Self {
            server,
            uri,
            client,
            db_name,
        })
    }

    /// The connection string (the same for every fixture on a real deployment).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The SecantusDB process this fixture started, while it runs (`None` on `MONGODB_URI`).
    pub fn server_pid(&self) -> Option<u32> {
        self.server.as_ref().and_then(SecantusDb::pid)
    }

    /// A client connected to the server.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// This fixture's database name, unique per fixture.
    pub fn db_name(&self) -> &str {
        &self.db_name
    }

    /// This fixture's database.
    pub fn database(&self) -> Database {
        self.client.database(&self.db_name)
    }

    /// Whether the tests run against a deployment named by `ORDO_TEST_MONGODB_URI`.
    pub fn is_external(&self) -> bool {
        self.server.is_none()
    }

    /// The SecantusDB process, for fault injection; [`Unavailable`] on a real deployment.
    pub fn secantus(&mut self) -> Result<&mut SecantusDb, Unavailable> {
        self.server.as_mut().ok_or(Unavailable {
            what: "control the mongodb server process",
            reason: "ORDO_TEST_MONGODB_URI points at an external deployment",
        })
    }

    /// SIGKILLs the server (see [`SecantusDb::kill`]).
    pub fn kill_server(&mut self) -> Result<(), Unavailable> {
        self.secantus()?.kill();
        Ok(())
    }

    /// Hangs the server (SIGSTOP) or lets it go on (SIGCONT); see [`SecantusDb::hang`]. The
    /// outer error is [`Unavailable`] on a real deployment.
    pub fn hang_server(&mut self, hang: bool) -> Result<anyhow::Result<()>, Unavailable> {
        Ok(self.secantus()?.hang(hang))
    }

    /// Restarts the server on the same port (see [`SecantusDb::restart`]). The outer error is
    /// [`Unavailable`] on a real deployment; the inner one a failed start.
    pub async fn restart_server(&mut self) -> Result<anyhow::Result<()>, Unavailable> {
        let server = self.secantus()?;
        Ok(server.restart().await)
    }

    /// Runs `configureFailPoint` (needs test commands: SecantusDB is started with them; a real
    /// mongod needs `--setParameter enableTestCommands=1`). `spec` is the rest of the command,
    /// e.g. `{mode: {times: 1}, data: {failCommands: ["getMore"], errorCode: 280}}`.
    pub async fn configure_fail_point(&self, name: &str, spec: Document) -> anyhow::Result<()> {
        let mut cmd = doc! { "configureFailPoint": name };
        cmd.extend(spec);
        self.client
            .database("admin")
            .run_command(cmd)
            .await
            .with_context(|| format!("configureFailPoint {name}"))?;
        Ok(())
    }

    /// Turns a fail point off.
    pub async fn disable_fail_point(&self, name: &str) -> anyhow::Result<()> {
        self.configure_fail_point(name, doc! { "mode": "off" })
            .await
    }

    /// Asks SecantusDB to prune its oplog now (down to `--oplog-max-entries`), so a saved resume
    /// token falls out of history deterministically. [`Unavailable`] on a real deployment.
    pub async fn prune_oplog(&self) -> Result<anyhow::Result<()>, Unavailable> {
        if self.server.is_none() {
            return Err(Unavailable {
                what: "prune the oplog on demand",
                reason: "ORDO_TEST_MONGODB_URI points at an external deployment",
            });
        }
        Ok(self
            .client
            .database("admin")
            .run_command(doc! { "secantusAdmin.pruneOplog": 1 })
            .await
            .map(|_| ())
            .context("secantusAdmin.pruneOplog"))
    }
}

impl Drop for TestMongo {
    fn drop(&mut self) {
        if self.server.is_some() {
            return; // the server and its data go away with it
        }
        // A real deployment keeps databases: drop ours, best effort. Drop cannot await, and the
        // fixture's client runs its connection tasks on the test's runtime (blocked right here),
        // so use a fresh client on a runtime of its own.
        let uri = self.uri.clone();
        let db = self.db_name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let drop_db = async {
                    let client = Client::with_uri_str(&uri).await?;
                    client.database(&db).drop().await?;
                    client.shutdown().await;
                    Ok::<_, mongodb::error::Error>(())
                };
                if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(10), drop_db).await {
                    eprintln!("could not drop test database {db}: {e}");
                }
            });
        })
        .join();
    }
}

/// `ordo_test_<16 hex digits>`: unique per fixture, well under MongoDB's 63-byte limit.
pub fn unique_db_name() -> String {
    format!("ordo_test_{:016x}", rand::random::<u64>())
}

/// The URI with any `user:password@` removed, for messages.
fn redact(uri: &str) -> String {
    match (uri.find("://"), uri.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &uri[..scheme], &uri[at + 1..])
        }
        _ => uri.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials() {
        assert_eq!(redact("mongodb://u:p@h:1/?x=1"), "mongodb://***@h:1/?x=1");
        assert_eq!(redact("mongodb://h:1/"), "mongodb://h:1/");
    }

    #[test]
    fn database_names_are_unique_and_valid() {
        let a = unique_db_name();
        let b = unique_db_name();
        assert_ne!(a, b);
        assert!(a.len() < 64 && a.starts_with("ordo_test_"));
    }
}
