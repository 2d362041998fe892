//! Loading, overriding and validating the shared sections.
use super::*;
use serde::Deserialize;

#[derive(Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Sample {
    mongodb: MongoConfig,
    servicebus: ServiceBusConfig,
    telemetry: TelemetryConfig,
    shutdown: ShutdownConfig,
}

impl Validate for Sample {
    fn validate(&mut self) -> Result<(), ConfigError> {
        self.mongodb.validate()?;
        self.servicebus.validate()?;
        self.telemetry.validate()?;
        self.shutdown.validate()
    }
}

const GOOD: &str = r#"
[mongodb]
uri = "mongodb://user:pw@127.0.0.1:27017/app?directConnection=true"
[servicebus]
connection_string = "Endpoint=sb://127.0.0.2;SharedAccessKeyName=k;SharedAccessKey=s3cret;UseDevelopmentEmulator=true"
[shutdown]
grace_period = "5s"
"#;

fn load(text: &str, env: &[(&str, &str)]) -> Result<Sample, ConfigError> {
    load_str(text, "test.toml", &Env::from_pairs(env.iter().copied()))
}

#[test]
fn an_entra_namespace_becomes_a_connection_string_naming_the_credential() {
    let text = GOOD.replace(
        "connection_string = \"Endpoint=sb://127.0.0.2;SharedAccessKeyName=k;SharedAccessKey=s3cret;UseDevelopmentEmulator=true\"",
        "namespace = \"ns.servicebus.windows.net\"\nauth = \"workload_identity\"",
    );
    let cfg = load(&text, &[]).unwrap();
    assert_eq!(
        cfg.servicebus.connection_string().expose(),
        "Endpoint=sb://ns.servicebus.windows.net/;Authentication=WorkloadIdentity"
    );
    let bad = text.replace("workload_identity", "password");
    let e = load(&bad, &[]).unwrap_err();
    assert_eq!(e.key(), Some("servicebus.auth"));
    assert!(e.to_string().contains("\"password\""), "{e}");
}

#[test]
fn good_file_resolves_database_from_uri_and_redacts_secrets() {
    let cfg = load(GOOD, &[]).unwrap();
    assert_eq!(cfg.mongodb.database(), "app");
    assert_eq!(cfg.shutdown.grace_period, Duration::from_secs(5));
    let shown = render(&cfg);
    assert!(shown.contains("uri = \"***\""), "{shown}");
    assert!(
        !shown.contains("s3cret") && !shown.contains("pw@"),
        "{shown}"
    );
}

#[test]
fn misspelt_key_is_named() {
    let e = load(&format!("{GOOD}\n[telemetry]\nlog_levle = \"info\"\n"), &[]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("telemetry.log_levle: unknown field `log_levle`"),
        "{e}"
    );
}

#[test]
fn bad_duration_is_named_with_its_value() {
    let e = load(&GOOD.replace("\"5s\"", "\"5 parsecs\""), &[]).unwrap_err();
    assert_eq!(e.key(), Some("shutdown.grace_period"), "{e}");
    assert!(
        e.to_string().contains("5 parsecs") || e.to_string().contains("parsecs"),
        "{e}"
    );
}

#[test]
fn missing_connection_string_names_every_source() {
    let e = load("[mongodb]\nuri = \"mongodb://h/app\"\n", &[]).unwrap_err();
    assert_eq!(e.key(), Some("servicebus.connection_string"));
    assert!(
        e.to_string().contains("AZURE_SERVICEBUS_CONNECTION_STRING"),
        "{e}"
    );
}

#[test]
fn environment_overrides_file_and_legacy_names_work() {
    let cfg = load(
        GOOD,
        &[
            ("MONGODB_URI", "mongodb://other:27017/legacy"),
            ("AZURE_SERVICEBUS_TOPIC_NAME", "legacy-topic"),
            ("ORDO__SERVICEBUS__TOPIC", "12345"),
            ("ORDO__SHUTDOWN__GRACE_PERIOD", "2s"),
            ("ORDO__MONGODB__FIELDS__AGGREGATE_ID", "streamId"),
        ],
    )
    .unwrap();
    assert_eq!(cfg.mongodb.database(), "legacy");
    assert_eq!(
        cfg.servicebus.topic, "12345",
        "ORDO__ wins and numeric text stays a string"
    );
    assert_eq!(cfg.shutdown.grace_period, Duration::from_secs(2));
    assert_eq!(cfg.mongodb.fields.aggregate_id, "streamId");
}

#[test]
fn the_other_daemons_section_in_the_environment_is_ignored() {
    let cfg = load(GOOD, &[("ORDO__PROJECTOR__MAX_CONCURRENT_SESSIONS", "32")]).unwrap();
    assert_eq!(cfg.shutdown.grace_period, Duration::from_secs(5));
    let e = load(GOOD, &[("ORDO__PROJECTR__MAX_CONCURRENT_SESSIONS", "32")]).unwrap_err();
    assert_eq!(
        e.key(),
        Some("projectr"),
        "a misspelt section is still refused: {e}"
    );
}

#[test]
fn unknown_env_key_is_named_with_its_variable() {
    let e = load(GOOD, &[("ORDO__SHUTDOWN__GRACE", "1s")]).unwrap_err();
    assert!(
        e.to_string().contains("shutdown.grace") && e.to_string().contains("ORDO__SHUTDOWN__GRACE"),
        "{e}"
    );
}

/// A value that parses but is out of range names its variable too, not only a value that does
/// not parse.
#[test]
fn an_out_of_range_env_value_is_named_with_its_variable() {
    let e = load(GOOD, &[("ORDO__SHUTDOWN__GRACE_PERIOD", "20m")]).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("shutdown.grace_period")
            && text.contains("out of range")
            && text.contains("(set by ORDO__SHUTDOWN__GRACE_PERIOD)"),
        "{text}"
    );
    // From the file, no variable is named.
    let file = GOOD.replace("grace_period = \"5s\"", "grace_period = \"20m\"");
    let e = load(&file, &[]).unwrap_err().to_string();
    assert!(e.contains("out of range") && !e.contains("set by"), "{e}");
}

#[test]
fn secret_file_is_read_and_conflicts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("uri");
    std::fs::write(&f, "mongodb://h:1/fromfile\n").unwrap();
    let text = GOOD.replace(
        "uri = \"mongodb://user:pw@127.0.0.1:27017/app?directConnection=true\"",
        &format!("uri_file = {:?}", f.display().to_string()),
    );
    assert_eq!(load(&text, &[]).unwrap().mongodb.database(), "fromfile");
    let e = load(GOOD, &[("ORDO__MONGODB__URI_FILE", f.to_str().unwrap())]).unwrap_err();
    assert_eq!(e.key(), Some("mongodb.uri_file"), "{e}");
}

#[test]
fn syntax_errors_name_the_file() {
    let e = load("[mongodb\n", &[]).unwrap_err();
    assert!(e.to_string().starts_with("config file test.toml:"), "{e}");
}

#[test]
fn database_comes_from_uri_path() {
    assert_eq!(
        database_from_uri("mongodb://h:1/app?x=1").as_deref(),
        Some("app")
    );
    assert_eq!(database_from_uri("mongodb://h:1/?x=1"), None);
    assert_eq!(database_from_uri("mongodb://h:1"), None);
}

#[test]
fn a_slash_in_the_password_is_neither_the_database_nor_shown() {
    assert_eq!(
        database_from_uri("mongodb://u:pa/ss@h:1/app?x=1").as_deref(),
        Some("app")
    );
    assert_eq!(database_from_uri("mongodb://u:pa/ss@h:1"), None);
    let text = GOOD.replace(
        "user:pw@127.0.0.1:27017/app",
        "user:se/cr.et@127.0.0.1:27017/a.b",
    );
    let e = load(&text, &[]).unwrap_err().to_string();
    assert!(
        e.contains("mongodb.database") && e.contains("value hidden"),
        "{e}"
    );
    assert!(!e.contains("cr.et") && !e.contains("a.b"), "{e}");
}
