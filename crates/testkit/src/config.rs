//! Daemon configuration files for tests, built as TOML tables rather than by formatting
//! strings: values are quoted and escaped by the serializer (a Windows path, a URI with
//! quotes), and a test's own keys replace the fixture's defaults instead of repeating them.

use std::net::SocketAddr;

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
        self.section(section).insert(key.to_string(), value.into());
        self
    }

    /// Sets each `(key, value)` of `[section]`, the values written as TOML (`"200ms"`, `4`).
    pub fn defaults(mut self, section: &str, values: &[(&str, &str)]) -> Self {
        let text: String = values.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        self = self.overlay(section, &text);
        self
    }

    /// Lays a test's own TOML over the file: its keys before any table header go to
    /// `[section]`, the rest to the tables it names; every key it sets replaces the file's.
    /// Panics on TOML that does not parse, naming it.
    pub fn overlay(mut self, section: &str, extra: &str) -> Self {
        let parsed: Table = format!("[{section}]\n{extra}")
            .parse()
            .unwrap_or_else(|e| panic!("test configuration does not parse: {e}\n{extra}"));
        merge(&mut self.0, parsed);
        self
    }

    /// The file's text.
    pub fn render(&self) -> String {
        toml::to_string(&self.0).expect("a table serializes")
    }

    fn section(&mut self, name: &str) -> &mut Table {
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
        .defaults("producer", &[("lease_ttl", "\"3s\""), ("senders", "2")])
        .overlay(
            "producer",
            "lease_ttl = \"15s\"\n[mongodb]\ncreate_indexes = false",
        )
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
}
