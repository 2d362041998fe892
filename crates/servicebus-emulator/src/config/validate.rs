//! What a TOML parser cannot check: names, ranges, uniqueness. Each error names the key
//! (`topics[0].subscriptions[1].lock_duration`) and the value, so a wrong file is fixed at once.

use std::{collections::HashSet, time::Duration};

use super::{EmulatorConfig, IngressConfig, NamespaceConfig, StoreConfig, TopicConfig};
use crate::error::ConfigError;

impl EmulatorConfig {
    /// Checks the values a TOML parser cannot: names, ranges, uniqueness.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_namespace(&self.namespace)?;
        let mut names = HashSet::new();
        for (i, topic) in self.topics.iter().enumerate() {
            let key = |field: &str| format!("topics[{i}].{field}");
            check_ingress(&key, &mut names, topic.ingress())?;
            validate_subscriptions(i, topic)?;
        }
        for (i, queue) in self.queues.iter().enumerate() {
            let key = |field: &str| format!("queues[{i}].{field}");
            check_ingress(&key, &mut names, queue.ingress())?;
            check_store(&key, queue.store())?;
        }
        Ok(())
    }
}

/// The keys (unique, non-empty names and keys), the token lifetime, the TLS pair.
fn validate_namespace(namespace: &NamespaceConfig) -> Result<(), ConfigError> {
    let mut key_names = HashSet::new();
    for (i, rule) in namespace.keys().iter().enumerate() {
        let key = |field: &str| match i {
            0 => format!("namespace.{field}"),
            _ => format!("namespace.authorization_rules[{}].{field}", i - 1),
        };
        if rule.name.is_empty() || !key_names.insert(rule.name.clone()) {
            return Err(invalid(
                key(if i == 0 { "key_name" } else { "name" }),
                &rule.name,
                "key names must be non-empty and unique",
            ));
        }
        if rule.key.is_empty() {
            return Err(invalid(key("key"), "", "a key must not be empty"));
        }
    }
    if let Some(lifetime) = namespace.max_token_lifetime {
        check_positive("namespace.max_token_lifetime", lifetime)?;
    }
    match (&namespace.tls_cert, &namespace.tls_key) {
        (Some(_), None) => Err(invalid(
            "namespace.tls_key".into(),
            "(absent)",
            "tls_cert needs tls_key",
        )),
        (None, Some(_)) => Err(invalid(
            "namespace.tls_cert".into(),
            "(absent)",
            "tls_key needs tls_cert",
        )),
        _ => Ok(()),
    }
}

/// What topics and queues share as ingress points: a valid name unique in the namespace
/// (case-insensitive), the message size, the duplicate detection window and the default TTL.
fn check_ingress(
    key: &dyn Fn(&str) -> String,
    names: &mut HashSet<String>,
    ingress: IngressConfig<'_>,
) -> Result<(), ConfigError> {
    check_name(&key("name"), ingress.name)?;
    if !names.insert(ingress.name.to_ascii_lowercase()) {
        return Err(invalid(key("name"), ingress.name, "duplicate entity name"));
    }
    check_size(
        &key("max_message_size_bytes"),
        ingress.max_message_size_bytes,
    )?;
    check_window(
        &key("duplicate_detection_window"),
        ingress.duplicate_detection_window,
    )?;
    check_positive(&key("default_message_ttl"), ingress.default_message_ttl)
}

/// What subscriptions and queues share as message stores: the lock duration and the delivery
/// count.
fn check_store(key: &dyn Fn(&str) -> String, store: StoreConfig) -> Result<(), ConfigError> {
    check_lock(&key("lock_duration"), store.lock_duration)?;
    check_delivery_count(&key("max_delivery_count"), store.max_delivery_count)
}

/// The subscriptions of the `i`th topic: unique names within it, locks, delivery counts, TTLs.
fn validate_subscriptions(i: usize, topic: &TopicConfig) -> Result<(), ConfigError> {
    let mut subs = HashSet::new();
    for (j, sub) in topic.subscriptions.iter().enumerate() {
        let key = |field: &str| format!("topics[{i}].subscriptions[{j}].{field}");
        check_name(&key("name"), &sub.name)?;
        if !subs.insert(sub.name.to_ascii_lowercase()) {
            return Err(invalid(
                key("name"),
                &sub.name,
                "duplicate subscription name",
            ));
        }
        check_store(&key, sub.store())?;
        if let Some(ttl) = sub.default_message_ttl {
            check_positive(&key("default_message_ttl"), ttl)?;
        }
    }
    Ok(())
}

fn invalid(key: String, value: impl std::fmt::Display, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        reason: reason.to_owned(),
    }
}

fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 260
        && !name.starts_with('/')
        && !name.ends_with('/')
        && !name.starts_with('$')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | '~'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key.to_owned(),
            format!("{name:?}"),
            "names use letters, digits, '-', '_', '.', '~' and inner '/' only",
        ))
    }
}

fn check_size(key: &str, size: u64) -> Result<(), ConfigError> {
    if (1024..=100 * 1024 * 1024).contains(&size) {
        Ok(())
    } else {
        Err(invalid(
            key.to_owned(),
            size,
            "must be between 1024 and 104857600 bytes",
        ))
    }
}

fn check_window(key: &str, window: Option<Duration>) -> Result<(), ConfigError> {
    match window {
        Some(w) if w.is_zero() || w > Duration::from_secs(7 * 24 * 3600) => Err(invalid(
            key.to_owned(),
            humantime::format_duration(w),
            "must be between 1s and 7 days",
        )),
        _ => Ok(()),
    }
}

fn check_lock(key: &str, lock: Duration) -> Result<(), ConfigError> {
    if lock >= Duration::from_millis(100) && lock <= Duration::from_secs(300) {
        Ok(())
    } else {
        Err(invalid(
            key.to_owned(),
            humantime::format_duration(lock),
            "must be between 100ms and 5m",
        ))
    }
}

fn check_positive(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        Err(invalid(key.to_owned(), "0s", "must be positive"))
    } else {
        Ok(())
    }
}

fn check_delivery_count(key: &str, count: u32) -> Result<(), ConfigError> {
    if (1..=2000).contains(&count) {
        Ok(())
    } else {
        Err(invalid(key.to_owned(), count, "must be between 1 and 2000"))
    }
}
