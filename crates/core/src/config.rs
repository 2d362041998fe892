//! Configuration: a TOML file, overridden by the environment, typed and validated at start.
//!
//! Precedence, lowest first:
//! 1. the TOML file (`--config FILE`), or the built-in defaults when no file is given;
//! 2. the environment names of the services ordo replaces, so a migrating team keeps its
//!    environment: `MONGODB_URI`, `AZURE_SERVICEBUS_CONNECTION_STRING`,
//!    `AZURE_SERVICEBUS_TOPIC_NAME`, `AZURE_SERVICEBUS_SUBSCRIPTION_NAME`;
//! 3. `ORDO__SECTION__KEY=value` (nested keys add more `__`); values are read as TOML scalars
//!    or arrays when they parse as such (`10`, `true`, `"30s"`, `[1, 2]`) and as strings
//!    otherwise.
//!
//! Every section is `deny_unknown_fields`, so a misspelt key fails at start. Every error is one
//! line that names the key (`producer.batch_size`) and the bad value. Connection strings come
//! from the file, the environment or a secret file (`uri_file`, `connection_string_file`) and
//! are [`Secret`]s: `--check-config` prints the resolved configuration with them as `***`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::envelope::EventFields;
use crate::secret::{read_secret_file, Secret};

/// Prefix of ordo's own environment overrides.
pub const ENV_PREFIX: &str = "ORDO__";

/// Sections that belong to one daemon only; the other daemon ignores their `ORDO__` variables.
pub const DAEMON_SECTIONS: &[&str] = &["producer", "projector"];

/// Legacy environment names and the keys they set.
pub const LEGACY_ENV: &[(&str, &str)] = &[
    ("MONGODB_URI", "mongodb.uri"),
    (
        "AZURE_SERVICEBUS_CONNECTION_STRING",
        "servicebus.connection_string",
    ),
    ("AZURE_SERVICEBUS_TOPIC_NAME", "servicebus.topic"),
    (
        "AZURE_SERVICEBUS_SUBSCRIPTION_NAME",
        "servicebus.subscription",
    ),
];

/// A configuration error: always names the key (or the file) it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key has the wrong type, an unknown name, or a value that does not parse.
    #[error("{key}: {message}")]
    Invalid {
        /// Dotted key, e.g. `producer.batch_size`.
        key: String,
        /// What is wrong, showing the value.
        message: String,
    },
    /// A required key has no value anywhere.
    #[error("{key}: missing: {hint}")]
    Missing {
        /// Dotted key.
        key: String,
        /// Where a value may come from.
        hint: String,
    },
}

impl ConfigError {
    /// An invalid-value error for `key`.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The key the error is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } | ConfigError::Missing { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// Checks that go beyond types: ranges, consistency, files that must exist.
pub trait Validate {
    /// Validates and resolves (reads secret files). Errors name the key.
    fn validate(&mut self) -> Result<(), ConfigError>;
}

/// A snapshot of the environment, so loading is testable without touching the process.
#[derive(Debug, Clone, Default)]
pub struct Env(BTreeMap<String, String>);

impl Env {
    /// The process environment.
    pub fn from_process() -> Self {
        Env(std::env::vars().collect())
    }

    /// An environment from pairs (tests).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Env(pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    /// One variable.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

/// Where an overridden key came from, for error messages.
struct Override {
    key: Vec<String>,
    origin: String,
    raw: String,
}

fn set_path(
    table: &mut toml::Table,
    path: &[String],
    value: toml::Value,
) -> Result<(), ConfigError> {
    let (last, parents) = path.split_last().expect("non-empty key");
    let mut cur = table;
    for (i, part) in parents.iter().enumerate() {
        let entry = cur
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(ConfigError::invalid(
                    path[..=i].join("."),
                    "is a value in the file, so it cannot have nested keys",
                ))
            }
        };
    }
    cur.insert(last.clone(), value);
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

fn collect_overrides(env: &Env) -> Vec<Override> {
    let mut out = Vec::new();
    for (name, key) in LEGACY_ENV {
        if let Some(v) = env.get(name) {
            out.push(Override {
                key: key.split('.').map(str::to_string).collect(),
                origin: (*name).to_string(),
                raw: v.to_string(),
            });
        }
    }
    for (name, v) in &env.0 {
        if let Some(rest) = name.strip_prefix(ENV_PREFIX) {
            let key: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
            if key.iter().any(String::is_empty) {
                continue;
            }
            out.push(Override {
                key,
                origin: name.clone(),
                raw: v.clone(),
            });
        }
    }
    out
}

/// Loads `T` from `path` (or defaults when `None`) and the environment, then validates it.
pub fn load<T>(path: Option<&Path>, env: &Env) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Validate + Default + Serialize,
{
    let (text, name) = match path {
        Some(p) => (
            std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
            p.display().to_string(),
        ),
        None => (String::new(), "<defaults>".to_string()),
    };
    load_str(&text, &name, env)
}

/// Loads `T` from TOML text (see [`load`]).
pub fn load_str<T>(text: &str, name: &str, env: &Env) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Validate + Default + Serialize,
{
    let mut table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: name.to_string(),
                message: e.to_string().replace('\n', " ").trim().to_string(),
            })?;
    // One environment often serves both daemons (a shared systemd EnvironmentFile, a
    // Kubernetes ConfigMap): each ignores the other daemon's own section. A misspelt section
    // is still an error.
    let own: Vec<String> = match toml::Value::try_from(T::default()) {
        Ok(toml::Value::Table(t)) => t.keys().cloned().collect(),
        _ => Vec::new(),
    };
    let overrides: Vec<Override> = collect_overrides(env)
        .into_iter()
        .filter(|o| {
            let section = o.key[0].as_str();
            !DAEMON_SECTIONS.contains(&section) || own.iter().any(|k| k == section)
        })
        .collect();
    for o in &overrides {
        set_path(&mut table, &o.key, parse_env_value(&o.raw))?;
    }
    // An override such as `ORDO__SERVICEBUS__TOPIC=123` parses as an integer; when the typed
    // config wants a string there, retry with the raw text instead of failing.
    let mut as_string: Vec<usize> = Vec::new();
    loop {
        let value = toml::Value::Table(table.clone());
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(mut cfg) => {
                cfg.validate()?;
                return Ok(cfg);
            }
            Err(err) => {
                let key = err.path().to_string();
                // The last override of a key is the one in effect.
                let hit = overrides
                    .iter()
                    .enumerate()
                    .rev()
                    .find(|(_, o)| o.key.join(".") == key)
                    .filter(|(i, _)| !as_string.contains(i));
                if let Some((i, o)) = hit {
                    if !matches!(parse_env_value(&o.raw), toml::Value::String(_)) {
                        as_string.push(i);
                        set_path(&mut table, &o.key, toml::Value::String(o.raw.clone()))?;
                        continue;
                    }
                }
                let inner = err.inner().to_string();
                let inner = inner.lines().next().unwrap_or_default().trim_end();
                let origin = overrides
                    .iter()
                    .rev()
                    .find(|o| o.key.join(".") == key || key.starts_with(&(o.key.join(".") + ".")))
                    .map(|o| format!(" (set by {})", o.origin))
                    .unwrap_or_default();
                let key = if key == "." {
                    "<root>".to_string()
                } else {
                    key
                };
                return Err(ConfigError::invalid(key, format!("{inner}{origin}")));
            }
        }
    }
}

/// Renders a configuration for `--check-config`: TOML, secrets as `***`.
pub fn render<T: Serialize>(cfg: &T) -> String {
    toml::to_string_pretty(cfg).unwrap_or_else(|e| format!("<unprintable config: {e}>"))
}

/// Resolves a secret given inline or through a file, naming the keys in errors.
pub fn resolve_secret(
    inline: &mut Option<Secret>,
    file: &Option<PathBuf>,
    key: &str,
    file_key: &str,
    hint: &str,
) -> Result<(), ConfigError> {
    if let Some(path) = file {
        if inline.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ConfigError::invalid(
                file_key,
                format!("set together with {key}; give only one of them"),
            ));
        }
        let secret = read_secret_file(path).map_err(|e| {
            ConfigError::invalid(file_key, format!("cannot read {}: {e}", path.display()))
        })?;
        *inline = Some(secret);
    }
    match inline {
        Some(s) if !s.is_empty() => Ok(()),
        _ => Err(ConfigError::Missing {
            key: key.to_string(),
            hint: hint.to_string(),
        }),
    }
}

/// Checks that a duration is within bounds.
pub fn check_duration(
    key: &str,
    d: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    if d < min || d > max {
        return Err(ConfigError::invalid(
            key,
            format!(
                "{} is out of range ({} to {})",
                humantime::format_duration(d),
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(())
}

/// Checks that a count is within bounds.
pub fn check_range<N: PartialOrd + std::fmt::Display>(
    key: &str,
    v: N,
    min: N,
    max: N,
) -> Result<(), ConfigError> {
    if v < min || v > max {
        return Err(ConfigError::invalid(
            key,
            format!("{v} is out of range ({min} to {max})"),
        ));
    }
    Ok(())
}

/// `[mongodb]`: where the events live and where ordo keeps its state.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MongoConfig {
    /// Connection string (`mongodb://…`); or `uri_file`, `ORDO__MONGODB__URI`, `MONGODB_URI`.
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
        if self.events_collection.is_empty() {
            return Err(ConfigError::invalid(
                "mongodb.events_collection",
                "must not be empty",
            ));
        }
        for (key, value) in [
            ("aggregate_id", &self.fields.aggregate_id),
            ("event_id", &self.fields.event_id),
            ("event_type", &self.fields.event_type),
            ("payload", &self.fields.payload),
        ] {
            if value.is_empty() {
                return Err(ConfigError::invalid(
                    format!("mongodb.fields.{key}"),
                    "must not be empty",
                ));
            }
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
        if self.topic.is_empty() {
            return Err(ConfigError::invalid(
                "servicebus.topic",
                "must not be empty",
            ));
        }
        if self.subscription.is_empty() {
            return Err(ConfigError::invalid(
                "servicebus.subscription",
                "must not be empty",
            ));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        mongodb: MongoConfig,
        servicebus: ServiceBusConfig,
        telemetry: TelemetryConfig,
        shutdown: ShutdownConfig,
    }

    impl Validate for Sample {
        fn validate(&mut self) -> Result<(), ConfigError> {
            self.mongodb.validate()?;
            self.servicebus.validate()?;
            self.telemetry.validate()?;
            self.shutdown.validate()
        }
    }

    const GOOD: &str = r#"
[mongodb]
uri = "mongodb://user:pw@127.0.0.1:27017/app?directConnection=true"
[servicebus]
connection_string = "Endpoint=sb://127.0.0.2;SharedAccessKeyName=k;SharedAccessKey=s3cret;UseDevelopmentEmulator=true"
[shutdown]
grace_period = "5s"
"#;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Sample, ConfigError> {
        load_str(text, "test.toml", &Env::from_pairs(env.iter().copied()))
    }

    #[test]
    fn an_entra_namespace_becomes_a_connection_string_naming_the_credential() {
        let text = GOOD.replace(
            "connection_string = \"Endpoint=sb://127.0.0.2;SharedAccessKeyName=k;SharedAccessKey=s3cret;UseDevelopmentEmulator=true\"",
            "namespace = \"ns.servicebus.windows.net\"\nauth = \"workload_identity\"",
        );
        let cfg = load(&text, &[]).unwrap();
        assert_eq!(
            cfg.servicebus.connection_string().expose(),
            "Endpoint=sb://ns.servicebus.windows.net/;Authentication=WorkloadIdentity"
        );
        let bad = text.replace("workload_identity", "password");
        let e = load(&bad, &[]).unwrap_err();
        assert_eq!(e.key(), Some("servicebus.auth"));
        assert!(e.to_string().contains("\"password\""), "{e}");
    }

    #[test]
    fn good_file_resolves_database_from_uri_and_redacts_secrets() {
        let cfg = load(GOOD, &[]).unwrap();
        assert_eq!(cfg.mongodb.database(), "app");
        assert_eq!(cfg.shutdown.grace_period, Duration::from_secs(5));
        let shown = render(&cfg);
        assert!(shown.contains("uri = \"***\""), "{shown}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("pw@"),
            "{shown}"
        );
    }

    #[test]
    fn misspelt_key_is_named() {
        let e = load(&format!("{GOOD}\n[telemetry]\nlog_levle = \"info\"\n"), &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("telemetry.log_levle: unknown field `log_levle`"),
            "{e}"
        );
    }

    #[test]
    fn bad_duration_is_named_with_its_value() {
        let e = load(&GOOD.replace("\"5s\"", "\"5 parsecs\""), &[]).unwrap_err();
        assert_eq!(e.key(), Some("shutdown.grace_period"), "{e}");
        assert!(
            e.to_string().contains("5 parsecs") || e.to_string().contains("parsecs"),
            "{e}"
        );
    }

    #[test]
    fn missing_connection_string_names_every_source() {
        let e = load("[mongodb]\nuri = \"mongodb://h/app\"\n", &[]).unwrap_err();
        assert_eq!(e.key(), Some("servicebus.connection_string"));
        assert!(
            e.to_string().contains("AZURE_SERVICEBUS_CONNECTION_STRING"),
            "{e}"
        );
    }

    #[test]
    fn environment_overrides_file_and_legacy_names_work() {
        let cfg = load(
            GOOD,
            &[
                ("MONGODB_URI", "mongodb://other:27017/legacy"),
                ("AZURE_SERVICEBUS_TOPIC_NAME", "legacy-topic"),
                ("ORDO__SERVICEBUS__TOPIC", "12345"),
                ("ORDO__SHUTDOWN__GRACE_PERIOD", "2s"),
                ("ORDO__MONGODB__FIELDS__AGGREGATE_ID", "streamId"),
            ],
        )
        .unwrap();
        assert_eq!(cfg.mongodb.database(), "legacy");
        assert_eq!(
            cfg.servicebus.topic, "12345",
            "ORDO__ wins and numeric text stays a string"
        );
        assert_eq!(cfg.shutdown.grace_period, Duration::from_secs(2));
        assert_eq!(cfg.mongodb.fields.aggregate_id, "streamId");
    }

    #[test]
    fn the_other_daemons_section_in_the_environment_is_ignored() {
        let cfg = load(GOOD, &[("ORDO__PROJECTOR__MAX_CONCURRENT_SESSIONS", "32")]).unwrap();
        assert_eq!(cfg.shutdown.grace_period, Duration::from_secs(5));
        let e = load(GOOD, &[("ORDO__PROJECTR__MAX_CONCURRENT_SESSIONS", "32")]).unwrap_err();
        assert_eq!(
            e.key(),
            Some("projectr"),
            "a misspelt section is still refused: {e}"
        );
    }

    #[test]
    fn unknown_env_key_is_named_with_its_variable() {
        let e = load(GOOD, &[("ORDO__SHUTDOWN__GRACE", "1s")]).unwrap_err();
        assert!(
            e.to_string().contains("shutdown.grace")
                && e.to_string().contains("ORDO__SHUTDOWN__GRACE"),
            "{e}"
        );
    }

    #[test]
    fn secret_file_is_read_and_conflicts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("uri");
        std::fs::write(&f, "mongodb://h:1/fromfile\n").unwrap();
        let text = GOOD.replace(
            "uri = \"mongodb://user:pw@127.0.0.1:27017/app?directConnection=true\"",
            &format!("uri_file = {:?}", f.display().to_string()),
        );
        assert_eq!(load(&text, &[]).unwrap().mongodb.database(), "fromfile");
        let e = load(GOOD, &[("ORDO__MONGODB__URI_FILE", f.to_str().unwrap())]).unwrap_err();
        assert_eq!(e.key(), Some("mongodb.uri_file"), "{e}");
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let e = load("[mongodb\n", &[]).unwrap_err();
        assert!(e.to_string().starts_with("config file test.toml:"), "{e}");
    }

    #[test]
    fn database_comes_from_uri_path() {
        assert_eq!(
            database_from_uri("mongodb://h:1/app?x=1").as_deref(),
            Some("app")
        );
        assert_eq!(database_from_uri("mongodb://h:1/?x=1"), None);
        assert_eq!(database_from_uri("mongodb://h:1"), None);
    }

    #[test]
    fn a_slash_in_the_password_is_neither_the_database_nor_shown() {
        assert_eq!(
            database_from_uri("mongodb://u:pa/ss@h:1/app?x=1").as_deref(),
            Some("app")
        );
        assert_eq!(database_from_uri("mongodb://u:pa/ss@h:1"), None);
        let text = GOOD.replace(
            "user:pw@127.0.0.1:27017/app",
            "user:se/cr.et@127.0.0.1:27017/a.b",
        );
        let e = load(&text, &[]).unwrap_err().to_string();
        assert!(
            e.contains("mongodb.database") && e.contains("value hidden"),
            "{e}"
        );
        assert!(!e.contains("cr.et") && !e.contains("a.b"), "{e}");
    }
}
