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
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::secret::{read_secret_file, Secret};

mod sections;
#[cfg(test)]
mod tests;

pub use sections::*;

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
                cfg.validate().map_err(|e| set_by(e, &overrides))?;
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
                let origin = set_by_suffix(&overrides, &key);
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

/// " (set by VARIABLE)" when the last override of `key` (or of a table holding it) came from
/// the environment; empty otherwise.
fn set_by_suffix(overrides: &[Override], key: &str) -> String {
    overrides
        .iter()
        .rev()
        .find(|o| o.key.join(".") == key || key.starts_with(&(o.key.join(".") + ".")))
        .map(|o| format!(" (set by {})", o.origin))
        .unwrap_or_default()
}

/// A value the checks refused names the variable that set it, as a parse error does.
fn set_by(e: ConfigError, overrides: &[Override]) -> ConfigError {
    match e {
        ConfigError::Invalid { key, message } => ConfigError::Invalid {
            message: format!("{message}{}", set_by_suffix(overrides, &key)),
            key,
        },
        other => other,
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

/// Checks that a name or list is not empty (`key` names it in the error).
pub fn check_not_empty(key: &str, empty: bool) -> Result<(), ConfigError> {
    if empty {
        return Err(ConfigError::invalid(key, "must not be empty"));
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
