//! Connection strings and keys that must never reach a log line.
//!
//! [`Secret`] prints `***` through `Debug`, `Display` and `Serialize`, so a config dump
//! (`--check-config`), a `tracing` field or a panic message can never leak it. The only way
//! to the plain text is [`Secret::expose`], which is easy to grep for.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A string whose every printed form is `***`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

/// What every printed form of a secret shows.
pub const REDACTED: &str = "***";

impl Secret {
    /// Wraps a plain string.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The plain text, for handing to a client library and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the secret holds no text.
    pub fn is_empty(&self) -> bool {
        self.0.trim().is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

/// Reads a secret from a file (Kubernetes Secret volume, systemd credential), trimming the
/// trailing newline editors and `echo` add.
pub fn read_secret_file(path: &std::path::Path) -> std::io::Result<Secret> {
    let text = std::fs::read_to_string(path)?;
    Ok(Secret(text.trim_end_matches(['\n', '\r']).to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_printed_form_is_redacted() {
        let s = Secret::new("Endpoint=sb://x;SharedAccessKey=abc");
        assert_eq!(format!("{s}"), REDACTED);
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert_eq!(s.expose(), "Endpoint=sb://x;SharedAccessKey=abc");
    }
}
