//! Daemon configuration files for tests, built as TOML tables and written by the serializer,
//! never by formatting strings: values are quoted and escaped by the serializer (a Windows
//! path, a URI with quotes), and a test's own settings replace the fixture's instead of
//! repeating them.
//!
//! A daemon's own section is its typed config (`ProducerSection`, `ProjectorSection`),
//! serialized whole by [`ConfigFile::section`]: a test changes a field, and the compiler checks
//! its name and type. The shared sections (`[mongodb]`, `[servicebus]`, `[telemetry]`,
//! `[shutdown]`) are set key by key with typed values ([`ConfigFile::new`],
//! [`ConfigFile::set`]) instead of being serialized from ordo-core's `MongoConfig`,
//! `ServiceBusConfig`, ..., for two reasons:
//! - This crate cannot name those types. ordo-core and both daemons' crates dev-depend on it,
//!   so a dependency on any of them here is a cycle, which builds a second copy of that crate
//!   for its own tests, with types that are not the ones under test.
//! - The MongoDB URI and the Service Bus connection string are `Secret`s, which serialize as
//!   `***` by design (`--check-config` prints the config), so a file serialized from the typed
//!   shared sections could not connect to anything.

use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use serde::Serialize;
use toml::{Table, Value};

/// A daemon's configuration file, section by section.
#[derive(Debug, Clone, Default)]
pub struct ConfigFile(Table);

impl ConfigFile {
    /// `[mongodb]`, `[servicebus]` (topic; add `subscription` for a projector), `[telemetry]`
    /// on `health` with pretty logs at `log_level`, and `[shutdown] grace_period = "10s"`.
    pub fn new(
        mongo_uri: &str,
        database: &str,
        connection_string: &str,
        topic: &str,
        health: SocketAddr,
        log_level: &str,
    ) -> Self {
        Self::default()
            .set("mongodb", "uri", mongo_uri)
            .set("mongodb", "database", database)
            .set("servicebus", "connection_string", connection_string)
            .set("servicebus", "topic", topic)
            .set("telemetry", "listen", health.to_string())
            .set("telemetry", "log_format", "pretty")
            .set("telemetry", "log_level", log_level)
            .set("shutdown", "grace_period", "10s")
    }

    /// Sets `key` of `[section]`.
    pub fn set(mut self, section: &str, key: &str, value: impl Into<Value>) -> Self {
        self.section_mut(section)
            .insert(key.to_string(), value.into());
        self
    }

    /// Sets `[name]` to the typed section `value` (a daemon's `ProducerSection` or
    /// `ProjectorSection`), every field written; keys set earlier that it has are replaced.
    pub fn section(mut self, name: &str, value: &impl Serialize) -> Self {
        match Value::try_from(value) {
            Ok(Value::Table(t)) => merge(self.section_mut(name), t),
            Ok(other) => panic!("[{name}] does not serialize to a table: {other}"),
            Err(e) => panic!("[{name}] does not serialize: {e}"),
        }
        self
    }

    /// The file's text.
    pub fn render(&self) -> String {
        toml::to_string(&self.0).expect("a table serializes")
    }

    fn section_mut(&mut self, name: &str) -> &mut Table {
        match self
            .0
            .entry(name)
            .or_insert_with(|| Value::Table(Table::new()))
        {
            Value::Table(t) => t,
            other => panic!("[{name}] is not a table: {other}"),
        }
    }
}

/// `typed` with the keys of `toml` laid over it: `key = value` lines an operator gives a bench
/// (an environment variable) for a daemon's section. An unknown key or a value of the wrong
/// type is an error, as it is in the daemon.
pub fn overlaid<T: Serialize + DeserializeOwned>(typed: &T, toml: &str) -> Result<T, String> {
    let mut table = Table::try_from(typed).map_err(|e| e.to_string())?;
    let extra: Table = toml.parse().map_err(|e: toml::de::Error| e.to_string())?;
    merge(&mut table, extra);
    Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| e.to_string())
}

fn merge(into: &mut Table, from: Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(Value::Table(old)), Value::Table(new)) => merge(old, new),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stands in for a daemon's typed section.
    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Section {
        lease_ttl: String,
        senders: i64,
    }

    #[test]
    fn a_tests_keys_replace_the_defaults_and_values_are_escaped() {
        let health: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let text = ConfigFile::new(
            "mongodb://h/?appName=\"x\"",
            "db",
            "Endpoint=sb://e/;Key=a\\b",
            "t",
            health,
            "info",
        )
        .section(
            "producer",
            &Section {
                lease_ttl: "3s".into(),
                senders: 2,
            },
        )
        .set("producer", "lease_ttl", "15s")
        .set("mongodb", "create_indexes", false)
        .render();
        let back: Table = text.parse().unwrap();
        assert_eq!(back["producer"]["lease_ttl"].as_str(), Some("15s"));
        assert_eq!(back["producer"]["senders"].as_integer(), Some(2));
        assert_eq!(
            back["mongodb"]["uri"].as_str(),
            Some("mongodb://h/?appName=\"x\"")
        );
        assert_eq!(back["mongodb"]["create_indexes"].as_bool(), Some(false));
        assert_eq!(
            back["servicebus"]["connection_string"].as_str(),
            Some("Endpoint=sb://e/;Key=a\\b")
        );
        assert_eq!(back["telemetry"]["listen"].as_str(), Some("127.0.0.1:9000"));
    }

    #[test]
    fn an_operators_lines_replace_the_typed_fields_and_unknown_keys_are_refused() {
        let base = Section {
            lease_ttl: "3s".into(),
            senders: 2,
        };
        assert_eq!(
            overlaid(&base, "senders = 8").unwrap(),
            Section {
                lease_ttl: "3s".into(),
                senders: 8
            }
        );
        assert!(overlaid(&base, "sendres = 8").is_err());
        assert!(overlaid(&base, "senders = \"8\"").is_err());
    }
}
