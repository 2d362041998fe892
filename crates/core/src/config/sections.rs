//! The sections both daemons share: `[mongodb]`, `[servicebus]`, `[telemetry]`, `[shutdown]`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{check_duration, check_not_empty, resolve_secret, ConfigError, Validate};
use crate::envelope::EventFields;
use crate::secret::Secret;

/// `[mongodb]`: where the events live and where ordo keeps its state.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MongoConfig {
    /// Connection string (`mongodb://…`); or `uri_file`, `ORDO__MONGODB__URI`, `MONGODB_URI`.
    /// A `readPreference` in it is ignored: ordo reads from the primary.
    pub uri: Option<Secret>,
    /// File holding the connection string (a mounted secret).
    pub uri_file: Option<PathBuf>,
    /// Database of the events and of ordo's collections; default: the URI's path.
    pub database: Option<String>,
    /// The events collection.
    pub events_collection: String,
    /// Field names of the source events.
    pub fields: EventFields,
    /// Create the unique (aggregateId, eventId) index on the events collection when missing;
    /// when false, a missing index is only reported.
    pub create_indexes: bool,
}

impl Default for MongoConfig {
    fn default() -> Self {
        Self {
            uri: None,
            uri_file: None,
            database: None,
            events_collection: "events".into(),
            fields: EventFields::default(),
            create_indexes: true,
        }
    }
}

impl MongoConfig {
    /// The connection string (validated to be present).
    pub fn uri(&self) -> &Secret {
        self.uri.as_ref().expect("validated: mongodb.uri is set")
    }

    /// The database name (validated to be present).
    pub fn database(&self) -> &str {
        self.database
            .as_deref()
            .expect("validated: mongodb.database is set")
    }
}

/// The database named in a MongoDB URI's path, if any.
pub fn database_from_uri(uri: &str) -> Option<String> {
    let rest = uri.split_once("://")?.1;
    // The path starts after the user info: a password may hold a `/` (base64 often does).
    let before_query = rest.split('?').next().unwrap_or("");
    let hosts = before_query.rfind('@').map_or(0, |at| at + 1);
    let path = rest[hosts..].split_once('/')?.1;
    let db = path.split('?').next().unwrap_or("");
    (!db.is_empty()).then(|| db.to_string())
}

impl Validate for MongoConfig {
    fn validate(&mut self) -> Result<(), ConfigError> {
        resolve_secret(
            &mut self.uri,
            &self.uri_file,
            "mongodb.uri",
            "mongodb.uri_file",
            "set mongodb.uri, mongodb.uri_file, ORDO__MONGODB__URI or MONGODB_URI",
        )?;
        let uri = self.uri().expose();
        if !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://")) {
            return Err(ConfigError::invalid(
                "mongodb.uri",
                "must start with mongodb:// or mongodb+srv:// (value hidden: it may hold a password)",
            ));
        }
        let from_uri = self.database.is_none();
        if from_uri {
            self.database = database_from_uri(uri);
        }
        match &self.database {
            None => return Err(ConfigError::Missing {
                key: "mongodb.database".into(),
                hint:
                    "set mongodb.database or put the database in the URI path (mongodb://host/app)"
                        .into(),
            }),
            Some(db) if db.is_empty() || db.contains(['/', '\\', '.', ' ', '"', '$']) => {
                // A name taken from the URI is not shown: the URI may hold a password.
                let shown = if from_uri {
                    "the database in mongodb.uri's path (value hidden: the URI may hold a password)"
                        .to_string()
                } else {
                    format!("{db:?}")
                };
                return Err(ConfigError::invalid(
                    "mongodb.database",
                    format!("{shown} is not a valid database name"),
                ));
            }
            Some(_) => {}
        }
        check_not_empty(
            "mongodb.events_collection",
            self.events_collection.is_empty(),
        )?;
        for (key, value) in [
            ("aggregate_id", &self.fields.aggregate_id),
            ("event_id", &self.fields.event_id),
            ("event_type", &self.fields.event_type),
            ("payload", &self.fields.payload),
        ] {
            check_not_empty(&format!("mongodb.fields.{key}"), value.is_empty())?;
        }
        Ok(())
    }
}

/// `[servicebus]`: the topic between the daemons.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceBusConfig {
    /// Connection string; or `connection_string_file`, `ORDO__SERVICEBUS__CONNECTION_STRING`,
    /// `AZURE_SERVICEBUS_CONNECTION_STRING`. `UseDevelopmentEmulator=true` selects plain AMQP.
    pub connection_string: Option<Secret>,
    /// File holding the connection string (a mounted secret).
    pub connection_string_file: Option<PathBuf>,
    /// The partitioned topic.
    pub topic: String,
    /// The session-enabled subscription the projector reads.
    pub subscription: String,
    /// PEM file of CA certificates trusted for the TLS connection to Service Bus, next to the
    /// public roots: for private endpoints behind a TLS-inspecting proxy, and for tests with a
    /// private CA. Unset: public roots only.
    pub ca_file: Option<PathBuf>,
    /// `NAME.servicebus.windows.net`: authenticate with Microsoft Entra ID ([`Self::auth`])
    /// instead of a connection string.
    pub namespace: Option<String>,
    /// With `namespace`: `managed_identity` (system-assigned, or the user-assigned identity
    /// whose client id `AZURE_CLIENT_ID` holds), `workload_identity`, `client_secret` (reads
    /// `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET`) or `azure_cli`.
    pub auth: Option<String>,
}

impl Default for ServiceBusConfig {
    fn default() -> Self {
        Self {
            connection_string: None,
            connection_string_file: None,
            topic: "ordo-events".into(),
            subscription: "projector".into(),
            ca_file: None,
            namespace: None,
            auth: None,
        }
    }
}

impl ServiceBusConfig {
    /// The connection string (validated to be present).
    pub fn connection_string(&self) -> &Secret {
        self.connection_string
            .as_ref()
            .expect("validated: servicebus.connection_string is set")
    }
}

impl Validate for ServiceBusConfig {
    fn validate(&mut self) -> Result<(), ConfigError> {
        // An Entra ID namespace becomes a connection string naming the credential, so every
        // place that connects takes it unchanged.
        match (&self.namespace, &self.auth) {
            (Some(namespace), Some(auth)) => {
                let auth = crate::servicebus::EntraAuth::parse(auth).map_err(|_| {
                    ConfigError::invalid(
                        "servicebus.auth",
                        format!(
                            "{auth:?} is not one of managed_identity, workload_identity, \
                             client_secret, azure_cli"
                        ),
                    )
                })?;
                let host = namespace
                    .trim()
                    .trim_start_matches("sb://")
                    .trim_end_matches('/');
                let derived = format!("Endpoint=sb://{host}/;Authentication={}", auth.as_str());
                let other = self
                    .connection_string
                    .as_ref()
                    .is_some_and(|c| c.expose() != derived);
                if other || self.connection_string_file.is_some() {
                    return Err(ConfigError::invalid(
                        "servicebus.namespace",
                        "set either namespace and auth, or a connection string, not both",
                    ));
                }
                self.connection_string = Some(Secret::new(derived));
            }
            (Some(namespace), None) => {
                return Err(ConfigError::invalid(
                    "servicebus.auth",
                    format!("namespace {namespace:?} needs auth = managed_identity, workload_identity, client_secret or azure_cli"),
                ))
            }
            (None, Some(auth)) => {
                return Err(ConfigError::invalid(
                    "servicebus.namespace",
                    format!("auth = {auth:?} needs namespace = \"NAME.servicebus.windows.net\""),
                ))
            }
            (None, None) => {}
        }
        resolve_secret(
            &mut self.connection_string,
            &self.connection_string_file,
            "servicebus.connection_string",
            "servicebus.connection_string_file",
            "set servicebus.connection_string, servicebus.connection_string_file, \
             ORDO__SERVICEBUS__CONNECTION_STRING or AZURE_SERVICEBUS_CONNECTION_STRING",
        )?;
        crate::servicebus::Endpoint::parse(self.connection_string())
            .map_err(|e| ConfigError::invalid("servicebus.connection_string", e.to_string()))?;
        check_not_empty("servicebus.topic", self.topic.is_empty())?;
        check_not_empty("servicebus.subscription", self.subscription.is_empty())?;
        // The client's TLS roots are process-wide, so the CA is trusted here, where every daemon
        // passes once at start, rather than at each connect.
        if let Some(path) = &self.ca_file {
            crate::servicebus::trust_ca_file(path).map_err(|e| {
                ConfigError::invalid("servicebus.ca_file", format!("{}: {e}", path.display()))
            })?;
        }
        Ok(())
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (for log collectors).
    Json,
    /// Human-readable, coloured when on a terminal.
    Pretty,
}

/// `[telemetry]`: logs, metrics and the health port.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Address of the `/healthz`, `/readyz`, `/metrics` server.
    pub listen: SocketAddr,
    /// `json` or `pretty`.
    pub log_format: LogFormat,
    /// A tracing filter directive, e.g. `info` or `info,ordo_producer=debug`.
    pub log_level: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            log_format: LogFormat::Json,
            log_level: "info".into(),
        }
    }
}

impl Validate for TelemetryConfig {
    fn validate(&mut self) -> Result<(), ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&self.log_level).map_err(|e| {
            ConfigError::invalid(
                "telemetry.log_level",
                format!("{:?} is not a valid filter: {e}", self.log_level),
            )
        })?;
        Ok(())
    }
}

/// `[shutdown]`: how long SIGTERM may take.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Time from SIGTERM to exit; in-flight work is finished or released within it.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(20),
        }
    }
}

impl Validate for ShutdownConfig {
    fn validate(&mut self) -> Result<(), ConfigError> {
        check_duration(
            "shutdown.grace_period",
            self.grace_period,
            Duration::from_millis(100),
            Duration::from_secs(600),
        )
    }
}
