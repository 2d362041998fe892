//! Tests of the configuration: the shipped file is the default, and a misspelt key or a bad
//! value is refused, naming it.

use super::*;

#[test]
fn shipped_config_is_the_ordo_default() {
    let text = include_str!("../../../../config/servicebus-emulator.toml");
    let config = EmulatorConfig::from_toml_str(text).unwrap();
    assert_eq!(config, EmulatorConfig::default_ordo());
}

/// Why the fields topics, subscriptions and queues share are repeated, not flattened: an
/// unknown key in any of them is refused, naming it.
#[test]
fn a_misspelt_entity_key_is_refused_naming_it() {
    for (text, key) in [
        ("[[topics]]\nname = \"t\"\npartition_cont = 2\n", "partition_cont"),
        (
            "[[topics]]\nname = \"t\"\n[[topics.subscriptions]]\nname = \"s\"\nlock_duraton = \"30s\"\n",
            "lock_duraton",
        ),
        ("[[queues]]\nname = \"q\"\nmax_delivery_cont = 3\n", "max_delivery_cont"),
    ] {
        let err = EmulatorConfig::from_toml_str(text).unwrap_err().to_string();
        assert!(err.contains("unknown field") && err.contains(key), "{err}");
    }
}

#[test]
fn errors_name_key_and_value() {
    let text = "[[topics]]\nname = \"t\"\n[[topics.subscriptions]]\nname = \"s\"\nlock_duration = \"10m\"\n";
    let err = EmulatorConfig::from_toml_str(text).unwrap_err().to_string();
    assert!(
        err.contains("topics[0].subscriptions[0].lock_duration"),
        "{err}"
    );
    assert!(err.contains("10m"), "{err}");

    let text = "[[topics]]\nname = \"t\"\ndefault_message_ttl = \"soon\"\n";
    let err = EmulatorConfig::from_toml_str(text).unwrap_err().to_string();
    assert!(
        err.contains("default_message_ttl") && err.contains("soon"),
        "{err}"
    );
}
