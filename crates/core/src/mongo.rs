//! Connecting to MongoDB, and one classification of its errors for every retry loop.

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
    let mut options = ClientOptions::parse(cfg.uri().expose()).await?;
    options.app_name.get_or_insert_with(|| app_name.to_string());
    let primary = SelectionCriteria::ReadPreference(ReadPreference::Primary);
    match options.selection_criteria.replace(primary) {
        None | Some(SelectionCriteria::ReadPreference(ReadPreference::Primary)) => {}
        Some(asked) => tracing::warn!(
            read_preference = ?asked,
            "the MongoDB URI's readPreference is ignored: ordo reads from the primary, where a replica's lag cannot look like a missing event"
        ),
    }
    options
        .server_selection_timeout
        .get_or_insert(Duration::from_secs(10));
    options
        .connect_timeout
        .get_or_insert(Duration::from_secs(5));
    Client::with_options(options)
}

/// How often [`probe`] pings, and how long a ping may take: a dead or hung database is
/// reported within about four seconds, a recovered one within one interval.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// See [`PROBE_INTERVAL`]. Shorter than the client's server selection timeout (10 s), which
/// is what an operation on a killed server waits for before it fails.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Pings `db` every [`PROBE_INTERVAL`] until `cancel`, and tells `verdict` after each ping
/// whether the database answered within [`PROBE_TIMEOUT`]. Readiness rests on it rather than
/// on the daemons' own operations, which may wait much longer on a hung server (a tailing
/// getMore has no deadline at all). Logs each change once.
pub async fn probe(
    db: mongodb::Database,
    cancel: tokio_util::sync::CancellationToken,
    mut verdict: impl FnMut(bool),
) {
    let mut was_reachable = true;
    while !cancel.is_cancelled() {
        let ping = db.run_command(mongodb::bson::doc! { "ping": 1 });
        let reachable = match tokio::time::timeout(PROBE_TIMEOUT, ping).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                if was_reachable {
                    tracing::warn!(error = %e, "mongodb unreachable; not ready");
                }
                false
            }
            Err(_) => {
                if was_reachable {
                    tracing::warn!(
                        timeout_ms = PROBE_TIMEOUT.as_millis() as u64,
                        "mongodb did not answer a ping; not ready"
                    );
                }
                false
            }
        };
        if reachable && !was_reachable {
            tracing::info!("mongodb reachable again");
        }
        was_reachable = reachable;
        verdict(reachable);
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
