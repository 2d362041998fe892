//! The daemon runner against a stand-in daemon (a small Python HTTP server that behaves like
//! ordo's daemons: `--config FILE`, `/readyz` on the configured address, exit 0 on SIGTERM).

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::time::Duration;

use ordo_testkit::{bin_path, free_health_addr, Daemon};

const FAKE_DAEMON: &str = r#"#!/usr/bin/env python3
import http.server, os, signal, sys, threading, time
config = open(sys.argv[sys.argv.index("--config") + 1]).read()
values = dict(l.split(" = ", 1) for l in config.splitlines() if " = " in l)
host, port = values["health"].strip('"').rsplit(":", 1)
ready_at = time.monotonic() + float(values.get("ready_after_s", "0"))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/readyz" and time.monotonic() >= ready_at
        self.send_response(200 if ok else 503)
        self.end_headers()
        self.wfile.write(os.environ.get("FAKE_GREETING", "").encode())
    def log_message(self, *a):
        pass
server = http.server.HTTPServer((host, int(port)), H)
def stop(*_):
    print("fake daemon: sigterm, shutting down", flush=True)
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
print("fake daemon: started with", values.get("name", "?"), flush=True)
server.serve_forever()
"#;

fn fake_daemon(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("fake-daemon");
    std::fs::write(&path, FAKE_DAEMON).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The fake daemon's configuration file: `keys`, written by the TOML serializer.
fn fake_config(keys: &[(&str, toml::Value)]) -> String {
    let table: toml::Table = keys
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    toml::to_string(&table).unwrap()
}

/// The fake daemon of `dir`, configured with nothing but its health address.
fn spawn_with_health_only(dir: &tempfile::TempDir) -> Daemon {
    let health = free_health_addr();
    Daemon::spawn(
        &fake_daemon(dir),
        &fake_config(&[("health", health.to_string().into())]),
        health,
        &[],
    )
    .unwrap()
}

#[tokio::test]
async fn ready_then_graceful_stop_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let health = free_health_addr();
    let config = fake_config(&[
        ("name", "alpha".into()),
        ("health", health.to_string().into()),
        ("ready_after_s", 0.3.into()),
    ]);
    let mut daemon = Daemon::spawn(
        &fake_daemon(&dir),
        &config,
        health,
        &[("FAKE_GREETING", "hi")],
    )
    .unwrap();

    daemon.wait_ready(Duration::from_secs(20)).await.unwrap();
    assert!(daemon.is_ready().await);
    let (status, body) = daemon.http_get("/readyz").await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "hi"),
        "extra_env reaches the process"
    );
    assert!(
        daemon.logs().contains("started with \"alpha\""),
        "{}",
        daemon.logs()
    );

    daemon.sigterm().unwrap();
    let status = daemon.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(daemon.logs().contains("sigterm, shutting down"));
}

#[tokio::test]
async fn kill9_is_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = spawn_with_health_only(&dir);
    daemon.wait_ready(Duration::from_secs(20)).await.unwrap();
    daemon.kill9().unwrap();
    let status = daemon.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.signal(), Some(9));
    assert!(!daemon.is_ready().await);
}

#[tokio::test]
async fn wait_ready_fails_fast_with_the_log_when_the_process_exits() {
    let dir = tempfile::tempdir().unwrap();
    let health = free_health_addr();
    // No `health` key: the fake daemon dies with a KeyError.
    let mut daemon = Daemon::spawn(
        &fake_daemon(&dir),
        &fake_config(&[("name", "x".into())]),
        health,
        &[],
    )
    .unwrap();
    let err = daemon
        .wait_ready(Duration::from_secs(20))
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("before ready") && msg.contains("KeyError"),
        "{msg}"
    );
}

#[tokio::test]
async fn wait_exit_times_out_on_a_running_process() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = spawn_with_health_only(&dir);
    assert!(daemon.wait_exit(Duration::from_millis(200)).await.is_err());
    assert!(daemon.try_exit_status().unwrap().is_none());
}

#[test]
fn bin_path_finds_or_builds_a_workspace_binary() {
    let path = bin_path("ordo-servicebus-emulator");
    assert!(path.is_file(), "{}", path.display());
    assert_eq!(
        path.parent(),
        std::env::current_exe().unwrap().parent().unwrap().parent()
    );
    let out = std::process::Command::new(&path)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
