//! `--check-config` refuses a broken configuration with one line naming the key.

const GOOD: &str = r#"
[mongodb]
uri = "mongodb://127.0.0.1:1/app?directConnection=true"
[servicebus]
connection_string = "Endpoint=sb://127.0.0.9;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true"
[producer]
checkpoint_interval = "1s"
"#;

fn check(config: &str) -> (bool, String) {
    let out = ordo_testkit::check_config(env!("CARGO_BIN_EXE_ordo-producer").as_ref(), config);
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
