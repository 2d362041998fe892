//! The namespace's authorization rules as keys: each a name, a primary and optionally a
//! secondary key (either signs), and rights. Keys are rotated as on Azure: one key at a time is
//! regenerated while the other stays valid.

use super::Rights;
use crate::config::AuthorizationRule;

/// A rule's keys: the primary, then the secondary when it has one.
fn keys_of(rule: &AuthorizationRule) -> Vec<String> {
    std::iter::once(rule.key.clone())
        .chain(rule.secondary_key.clone())
        .collect()
}

/// The namespace's keys, by name.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    /// Name, its keys (primary, then secondary), rights.
    rules: Vec<(String, Vec<String>, Rights)>,
}

impl Keys {
    pub(crate) fn new(rules: &[AuthorizationRule]) -> Self {
        Self {
            rules: rules
                .iter()
                .map(|r| (r.name.clone(), keys_of(r), Rights::of(&r.rights)))
                .collect(),
        }
    }

    /// Adds a key, or replaces the one with the same name (a key rotation).
    pub(crate) fn put(&mut self, rule: &AuthorizationRule) {
        let entry = (rule.name.clone(), keys_of(rule), Rights::of(&rule.rights));
        match self.rules.iter_mut().find(|(n, _, _)| *n == rule.name) {
            Some(existing) => *existing = entry,
            None => self.rules.push(entry),
        }
    }

    /// Removes the key named `name`; whether there was one.
    pub(crate) fn remove(&mut self, name: &str) -> bool {
        let before = self.rules.len();
        self.rules.retain(|(n, _, _)| n != name);
        self.rules.len() != before
    }

    /// The keys of the rule named `name`, as `keys list` shows them.
    pub(crate) fn list(&self, name: &str) -> Option<RuleKeys> {
        self.get(name).map(|(keys, _)| RuleKeys::of(name, keys))
    }

    /// Replaces one key of the rule named `name` with `value` (Azure's `regenerateKeys`); the
    /// other key stays valid. A rule given only a primary key gains a secondary.
    pub(crate) fn regenerate(
        &mut self,
        name: &str,
        which: KeyType,
        value: String,
    ) -> Option<RuleKeys> {
        let (_, keys, _) = self.rules.iter_mut().find(|(n, _, _)| n == name)?;
        match (which, keys.len()) {
            (KeyType::PrimaryKey, _) => keys[0] = value,
            (KeyType::SecondaryKey, 1) => keys.push(value),
            (KeyType::SecondaryKey, _) => keys[1] = value,
        }
        Some(RuleKeys::of(name, keys))
    }

    pub(super) fn get(&self, name: &str) -> Option<(&[String], Rights)> {
        self.rules
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, keys, rights)| (keys.as_slice(), *rights))
    }

    /// SASL PLAIN: a key name and key that match a rule authorize the whole connection.
    pub(crate) fn check_plain(&self, name: &[u8], key: &[u8]) -> Option<Rights> {
        self.rules
            .iter()
            .find(|(n, keys, _)| n.as_bytes() == name && keys.iter().any(|k| k.as_bytes() == key))
            .map(|(_, _, rights)| *rights)
    }
}

/// One of the two keys of a rule, as Azure's `regenerateKeys` names it (`keyType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub(crate) enum KeyType {
    PrimaryKey,
    SecondaryKey,
}

/// A rule's keys as Azure's `listKeys` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuleKeys {
    pub name: String,
    pub primary: String,
    pub secondary: Option<String>,
}

impl RuleKeys {
    fn of(name: &str, keys: &[String]) -> Self {
        Self {
            name: name.to_owned(),
            primary: keys[0].clone(),
            secondary: keys.get(1).cloned(),
        }
    }
}

/// A new key as Service Bus makes one: 256 random bits, base64.
pub(crate) fn new_key() -> String {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random source failed");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
