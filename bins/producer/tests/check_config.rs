//! `--check-config` refuses a broken configuration with one line naming the key.

use std::process::Command;

const GOOD: &str = r#"
[mongodb]
uri = "mongodb://127.0.0.1:1/app?directConnection=true"
[servicebus]
connection_string = "Endpoint=sb://127.0.0.9;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true"
[producer]
checkpoint_interval = "1s"
"#;

fn check(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("producer.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ordo-producer"))
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .env_remove("MONGODB_URI")
        .env_remove("AZURE_SERVICEBUS_CONNECTION_STRING")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[test]
fn good_config_passes_and_the_example_file_is_valid() {
    assert!(check(GOOD).0);
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config/producer.toml"
    ))
    .unwrap();
    let (ok, err) = check(&example);
    assert!(ok, "{err}");
}

#[test]
fn broken_configs_fail_with_one_line_naming_the_key() {
    for (config, key) in [
        (
            GOOD.replace("checkpoint_interval", "checkpoint_intervall"),
            "producer.checkpoint_intervall",
        ),
        (
            GOOD.replace("connection_string = ", "# connection_string = "),
            "servicebus.connection_string",
        ),
        (
            GOOD.replace("\"1s\"", "\"1 fortnightish\""),
            "producer.checkpoint_interval",
        ),
    ] {
        let (ok, err) = check(&config);
        assert!(!ok, "{key}: accepted");
        assert_eq!(err.lines().count(), 1, "{key}: {err}");
        assert!(err.contains(key), "{key}: {err}");
    }
}
