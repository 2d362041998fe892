//! `--check-config` validates the projections file the configuration names, not only the
//! configuration, and refuses a broken one with exit status 2 and a line naming the file.

use std::path::Path;

use ordo_projector::config::ProjectorSection;
use ordo_testkit::ConfigFile;

const PROJECTIONS: &str = r#"
[[projections]]
name = "users"
collection = "users"
[[projections.on.UserRegistered]]
set = { email = "$payload.email" }
"#;

/// A configuration whose typed `[projector]` names `projections` as its projections file,
/// written by the serializer, which quotes and escapes the path. `--check-config` connects to
/// nothing, so the addresses need not answer.
fn config(projections: &Path) -> String {
    ConfigFile::new(
        "mongodb://127.0.0.1:1/app?directConnection=true",
        "app",
        "Endpoint=sb://127.0.0.9;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true",
        "events",
        "127.0.0.1:9464".parse().unwrap(),
        "info",
    )
    .section(
        "projector",
        &ProjectorSection {
            projections_file: projections.to_path_buf(),
            ..ProjectorSection::default()
        },
    )
    .render()
}

/// Runs `--check-config` with `projections` written to a file the config names (or no file at
/// all); returns (exit code, stdout, stderr).
fn check(projections: Option<&str>) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("projections.toml");
    if let Some(text) = projections {
        std::fs::write(&file, text).unwrap();
    }
    let out = ordo_testkit::check_config(
        env!("CARGO_BIN_EXE_ordo-projector").as_ref(),
        &config(&file),
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[test]
fn a_valid_projections_file_is_checked_and_listed() {
    let (code, out, err) = check(Some(PROJECTIONS));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("configuration is valid"), "{out}");
    assert!(out.contains(": users"), "the projections are listed: {out}");
}

#[test]
fn a_broken_projections_file_fails_the_check_naming_the_file() {
    for (projections, expected) in [
        (
            Some(PROJECTIONS.replace("set = ", "sett = ")),
            "projections file",
        ),
        (
            Some(PROJECTIONS.replace("\"$payload.email\"", "\"$payload.\"")),
            "projections file",
        ),
        (Some(String::new()), "defines no projection"),
        (None, "projector.projections_file: cannot read"),
    ] {
        let (code, _, err) = check(projections.as_deref());
        assert_eq!(code, 2, "exit status 2 for {projections:?}: {err}");
        assert!(
            err.starts_with("ordo-projector: config error:") && err.contains(expected),
            "{projections:?} -> {err}"
        );
        assert!(err.contains("projections.toml"), "names the file: {err}");
    }
}
