//! Connecting to MongoDB, and one classification of its errors for every retry loop.

use std::future::IntoFuture as _;
use std::time::Duration;

use mongodb::error::{Error, ErrorKind};
use mongodb::options::{ClientOptions, ReadPreference, SelectionCriteria};
use mongodb::Client;

use crate::config::MongoConfig;

/// Opens a client with ordo's defaults: the app name shows in the server's logs and `currentOp`.
///
/// Every read goes to the primary, whatever `readPreference` the URI names: a secondary's lag
/// would read as a gap in an aggregate's events (blocked after `gap_timeout`), as a read model
/// behind its last write (a storm of version-guard conflicts), or as a stale checkpoint or
/// lease. A URI that asks otherwise gets a warning.
pub async fn connect(cfg: &MongoConfig, app_name: &str) -> Result<Client, Error> {
    Client::with_options(options(cfg, app_name, true).await?)
}

/// A client of its own for [`probe`]: at most one connection, so a ping never queues behind
/// the daemon's operations for a connection (a busy pool would read as a hung database) and
/// never adds to their pool. Its app name is `app_name` with `-probe`, unless the URI names one.
pub async fn connect_probe(cfg: &MongoConfig, app_name: &str) -> Result<Client, Error> {
    let mut options = options(cfg, &format!("{app_name}-probe"), false).await?;
    options.max_pool_size = Some(1);
    options.min_pool_size = None;
    Client::with_options(options)
}

async fn options(cfg: &MongoConfig, app_name: &str, warn: bool) -> Result<ClientOptions, Error> {
    let mut options = ClientOptions::parse(cfg.uri().expose()).await?;
    options.app_name.get_or_insert_with(|| app_name.to_string());
    let primary = SelectionCriteria::ReadPreference(ReadPreference::Primary);
    match options.selection_criteria.replace(primary) {
        None | Some(SelectionCriteria::ReadPreference(ReadPreference::Primary)) => {}
        Some(asked) if warn => tracing::warn!(
            read_preference = ?asked,
            "the MongoDB URI's readPreference is ignored: ordo reads from the primary, where a replica's lag cannot look like a missing event"
        ),
        Some(_) => {}
    }
    options
        .server_selection_timeout
        .get_or_insert(Duration::from_secs(10));
    options
        .connect_timeout
        .get_or_insert(Duration::from_secs(5));
    Ok(options)
}

/// Closes `client` before the process exits: ends its sessions and cursors and stops its
/// background workers while the runtime still runs them (dropped by the runtime's teardown
/// instead, a worker could panic on a channel already closed, and print a backtrace after a
/// command that succeeded). Bounded by [`crate::shutdown::LAST_STEP`].
pub async fn close(client: Client) {
    if tokio::time::timeout(crate::shutdown::LAST_STEP, client.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("mongodb client shutdown did not finish in time");
    }
}

/// How often [`probe`] pings: a recovered database is reported within one interval.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a ping may go unanswered before the database counts as unreachable: a dead or
/// hung database is reported within about four seconds. Shorter than the client's server
/// selection timeout (10 s), which is what an operation on a killed server waits for.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an unanswered ping is waited for before it is given up and a new one sent (over a
/// new connection: a half-open one may never answer).
pub const PROBE_ABANDON: Duration = Duration::from_secs(30);

/// Pings `db` until `cancel`, one ping at a time, and tells `verdict` whether the database
/// answers: `true` after each answer, `false` after an error or once a ping has gone
/// [`PROBE_TIMEOUT`] unanswered. Readiness rests on it rather than on the daemons' own
/// operations, which may wait much longer on a hung server (a tailing getMore has no deadline
/// at all). Logs each change once.
///
/// A slow ping is not cancelled at [`PROBE_TIMEOUT`] but waited for, up to [`PROBE_ABANDON`]:
/// cancelling a command drops its connection, and a slow server that gets a new connection
/// every second only gets slower (SecantusDB wedged at 100 % CPU with hundreds of sockets).
/// Use a client of its own ([`connect_probe`]).
pub async fn probe(
    db: mongodb::Database,
    cancel: tokio_util::sync::CancellationToken,
    mut verdict: impl FnMut(bool),
) {
    let mut was_reachable = true;
    let mut tell = |reachable: bool, why: &dyn Fn()| {
        if !reachable && was_reachable {
            why();
        }
        if reachable && !was_reachable {
            tracing::info!("mongodb reachable again");
        }
        was_reachable = reachable;
        verdict(reachable);
    };
    while !cancel.is_cancelled() {
        let ping = db
            .run_command(mongodb::bson::doc! { "ping": 1 })
            .into_future();
        tokio::pin!(ping);
        let answer = tokio::select! {
            answer = &mut ping => Some(answer),
            _ = tokio::time::sleep(PROBE_TIMEOUT) => None,
            _ = cancel.cancelled() => return,
        };
        let answer = match answer {
            Some(answer) => Some(answer),
            None => {
                tell(false, &|| {
                    tracing::warn!(
                        timeout_ms = PROBE_TIMEOUT.as_millis() as u64,
                        "mongodb did not answer a ping; not ready"
                    )
                });
                tokio::select! {
                    answer = &mut ping => Some(answer),
                    _ = tokio::time::sleep(PROBE_ABANDON - PROBE_TIMEOUT) => None,
                    _ = cancel.cancelled() => return,
                }
            }
        };
        match answer {
            Some(Ok(_)) => tell(true, &|| {}),
            Some(Err(e)) => tell(
                false,
                &|| tracing::warn!(error = %e, "mongodb unreachable; not ready"),
            ),
            None => tracing::warn!(
                abandon_ms = PROBE_ABANDON.as_millis() as u64,
                "mongodb ping unanswered: given up, sending a new one"
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            _ = cancel.cancelled() => {}
        }
    }
}

/// Server codes that mean "try again": node shutting down or stepping down, network trouble,
/// exceeded time limits, write conflicts, interrupted operations.
const TRANSIENT_CODES: &[i32] = &[
    6, 7, 89, 91, 112, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436, 134, 50, 63, 150, 234,
    133, 251,
];

/// True when an error is worth retrying: network, pool, server selection, a transient label
/// or one of [`TRANSIENT_CODES`] (as answered by a server or injected by `failCommand`).
pub fn is_transient(e: &Error) -> bool {
    if e.contains_label("RetryableWriteError")
        || e.contains_label("ResumableChangeStreamError")
        || e.contains_label("TransientTransactionError")
    {
        return true;
    }
    match e.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::ServerSelection { .. } => true,
        _ => server_code(e).is_some_and(|c| TRANSIENT_CODES.contains(&c)),
    }
}

/// The server's error code, from a command error or a write-concern error.
pub fn server_code(e: &Error) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteConcernError(wc)) => Some(wc.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(we)) => Some(we.code),
        ErrorKind::InsertMany(im) => im.write_concern_error.as_ref().map(|wc| wc.code),
        _ => None,
    }
}

/// True for a duplicate-key error (11000), which ordo's guarded upserts read as "already there".
pub fn is_duplicate_key(e: &Error) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(we)) => we.code == 11000,
        ErrorKind::InsertMany(im) => im
            .write_errors
            .as_ref()
            .is_some_and(|errs| errs.iter().all(|w| w.code == 11000)),
        ErrorKind::Command(c) => c.code == 11000,
        _ => false,
    }
}

/// A short label for an error, for the `reason` of `ordo_retries_total`.
pub fn error_reason(e: &Error) -> &'static str {
    match e.kind.as_ref() {
        ErrorKind::Io(_) => "network",
        ErrorKind::ConnectionPoolCleared { .. } => "pool_cleared",
        ErrorKind::ServerSelection { .. } => "server_selection",
        ErrorKind::Authentication { .. } => "auth",
        _ if is_transient(e) => "transient_server_error",
        _ => "server_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    /// A URI that asks for a secondary (or any replica) still reads from the primary.
    #[tokio::test]
    async fn reads_go_to_the_primary_whatever_the_uri_asks() {
        for asked in [
            "secondary",
            "secondaryPreferred",
            "nearest",
            "primaryPreferred",
        ] {
            let cfg = MongoConfig {
                uri: Some(Secret::new(format!(
                    "mongodb://127.0.0.1:1/?replicaSet=rs0&readPreference={asked}"
                ))),
                ..MongoConfig::default()
            };
            let client = connect(&cfg, "test").await.unwrap();
            assert!(
                matches!(
                    client.selection_criteria(),
                    Some(SelectionCriteria::ReadPreference(ReadPreference::Primary))
                ),
                "{asked}: {:?}",
                client.selection_criteria()
            );
        }
    }
}
