//! docs/configuration.md lists exactly the keys of the typed configuration of each daemon.

use std::collections::BTreeSet;

use ordo_producer::ProducerConfig;
use ordo_projector::ProjectorConfig;
use ordo_testkit::paths::workspace_root;

/// Tables that are sections (their keys are listed one by one); any other table-valued key
/// (e.g. `producer.scan_sort`) is one key.
const NESTED: &[&str] = &["mongodb.fields"];

fn keys(value: serde_json::Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let serde_json::Value::Object(sections) = value else {
        panic!("a config serializes to a table")
    };
    for (section, body) in sections {
        let serde_json::Value::Object(fields) = body else {
            out.insert(section);
            continue;
        };
        for (field, v) in fields {
            let key = format!("{section}.{field}");
            match v {
                serde_json::Value::Object(inner) if NESTED.contains(&key.as_str()) => {
                    out.extend(inner.keys().map(|k| format!("{key}.{k}")));
                }
                _ => {
                    out.insert(key);
                }
            }
        }
    }
    out
}

fn documented(daemon: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(workspace_root().join("docs/configuration.md")).unwrap();
    let mut in_section = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            in_section = h.trim() == daemon;
            continue;
        }
        if in_section {
            if let Some(rest) = line.strip_prefix("| `") {
                out.insert(rest.split('`').next().unwrap().to_string());
            }
        }
    }
    out
}

fn check(daemon: &str, value: serde_json::Value) {
    let code = keys(value);
    let docs = documented(daemon);
    assert!(!code.is_empty());
    let missing: Vec<_> = code.difference(&docs).collect();
    let stale: Vec<_> = docs.difference(&code).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/configuration.md is out of date for {daemon}: undocumented {missing:?}, no longer in the code {stale:?}; \
         run `cargo build --bins && python3 scripts/gen-config-reference.py`"
    );
}

#[test]
fn producer_keys_are_documented() {
    check(
        "ordo-producer",
        serde_json::to_value(ProducerConfig::default()).unwrap(),
    );
}

#[test]
fn projector_keys_are_documented() {
    check(
        "ordo-projector",
        serde_json::to_value(ProjectorConfig::default()).unwrap(),
    );
}

#[test]
fn metrics_reference_lists_exactly_the_exported_names() {
    let text = std::fs::read_to_string(workspace_root().join("docs/metrics.md")).unwrap();
    let documented: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .map(|rest| rest.split('`').next().unwrap().to_string())
        .collect();
    let code: BTreeSet<String> = ordo_core::metrics::ALL
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        documented, code,
        "docs/metrics.md is out of date with crates/core/src/metrics.rs"
    );
}
