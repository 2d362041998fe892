//! The daemons as real processes: spawn with a config file, wait for `/readyz`, signal, reap,
//! and show their logs when a test fails.

use std::ffi::OsString;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::lock::FileLock;
use crate::paths::{state_dir, workspace_root};

/// A daemon process (`ordo-producer`, `ordo-projector`, the emulator binary) under test.
///
/// Killed on drop; when dropped during a panic (a failing test) its log is printed to stderr.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Child,
    pid: u32,
    health_addr: SocketAddr,
    exit: Option<ExitStatus>,
    /// Holds `config.toml` and `daemon.log`.
    dir: tempfile::TempDir,
    http: reqwest::Client,
    /// Shows this daemon's log in the watchdog's report while the daemon lives.
    _watched: crate::watchdog::DaemonGuard,
}

impl Daemon {
    /// Runs `<binary> --config <file>` with `config_toml` written to a temporary file, stdout and
    /// stderr to a log file, and `extra_env` added to the inherited environment.
    /// `health_addr` is where the config tells the daemon to serve `/readyz`.
    pub fn spawn(
        binary: &Path,
        config_toml: &str,
        health_addr: SocketAddr,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::spawn_with_args(binary, config_toml, health_addr, extra_env, &[])
    }

    /// Like [`Daemon::spawn`], with `args` after `--config <file>` (e.g. a subcommand).
    pub fn spawn_with_args(
        binary: &Path,
        config_toml: &str,
        health_addr: SocketAddr,
        extra_env: &[(&str, &str)],
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let name = binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "daemon".to_owned());
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()?;
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config_toml)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log = File::create(dir.path().join("daemon.log"))?;
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .envs(
                extra_env
                    .iter()
                    .map(|(k, v)| (OsString::from(k), OsString::from(v))),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        let pid = child.id().context("spawned daemon has no pid")?;
        let watched = crate::watchdog::daemon(name.clone(), pid, dir.path().join("daemon.log"));
        Ok(Self {
            name,
            child,
            pid,
            health_addr,
            exit: None,
            dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?,
            _watched: watched,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Where the daemon serves `/healthz`, `/readyz` and `/metrics`.
    pub fn health_addr(&self) -> SocketAddr {
        self.health_addr
    }

    /// The config file the daemon was started with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// Whether `GET /readyz` answers 200 right now.
    pub async fn is_ready(&self) -> bool {
        let url = format!("http://{}/readyz", self.health_addr);
        matches!(self.http.get(url).send().await, Ok(r) if r.status().is_success())
    }

    /// Polls `/readyz` until it answers 200. Fails early, with the log, if the process exits.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status()? {
                bail!(
                    "{} exited with {status} before ready; log:\n{}",
                    self.name,
                    self.logs()
                );
            }
            if self.is_ready().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} not ready within {timeout:?}; log:\n{}",
                    self.name,
                    self.logs()
                );
            }
            tokio::time::sleep(crate::wait::POLL_INTERVAL * 2).await;
        }
    }

    /// GET `path` on the health port and return the body (e.g. `/metrics`).
    pub async fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let url = format!("http://{}{path}", self.health_addr);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await?))
    }

    /// The sum of every series of metric `name` on the daemon's `/metrics` right now; 0 when
    /// absent or when the daemon does not answer.
    pub async fn metric(&self, name: &str) -> f64 {
        crate::prom::sum(&self.metrics_text().await, name)
    }

    /// [`Daemon::metric`], only the samples labelled `label="value"`.
    pub async fn metric_where(&self, name: &str, label: (&str, &str)) -> f64 {
        crate::prom::sum_where(&self.metrics_text().await, name, label)
    }

    /// The daemon's `/metrics` now; empty when it does not answer 200.
    async fn metrics_text(&self) -> String {
        match self.http_get("/metrics").await {
            Ok((200, body)) => body,
            _ => String::new(),
        }
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn sigterm(&self) -> anyhow::Result<()> {
        self.signal(rustix::process::Signal::TERM)
    }

    /// Sends SIGKILL (a crash, no cleanup).
    pub fn kill9(&self) -> anyhow::Result<()> {
        self.signal(rustix::process::Signal::KILL)
    }

    fn signal(&self, signal: rustix::process::Signal) -> anyhow::Result<()> {
        if self.exit.is_some() {
            bail!("{} already exited", self.name);
        }
        let pid = i32::try_from(self.pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .context("invalid pid")?;
        rustix::process::kill_process(pid, signal)
            .map_err(std::io::Error::from)
            .with_context(|| format!("signalling {} ({})", self.name, self.pid))
    }

    /// Waits for the process to exit and returns its status; an error if it is still running
    /// after `timeout` (it is left running; drop kills it).
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                self.exit = Some(status);
                Ok(status)
            }
            Err(_) => bail!(
                "{} still running after {timeout:?}; log:\n{}",
                self.name,
                self.logs()
            ),
        }
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_exit_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait()?;
        }
        Ok(self.exit)
    }

    /// Everything the daemon wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- {} (pid {}) log -----\n{}\n----- end of {} log -----",
                self.name,
                self.pid,
                self.logs(),
                self.name
            );
        }
        if self.exit.is_none() {
            let _ = self.child.start_kill();
        }
    }
}

/// Path of binary `name` from the package of the same name; see [`bin_path_in`].
pub fn bin_path(name: &str) -> PathBuf {
    bin_path_in(name, name)
}

/// Path of binary `bin` of package `package` in the cargo target directory the running test
/// executable belongs to (`target/<profile>/`), built with `cargo build` when absent.
///
/// An existing binary is used as is: run `cargo build` (or set `ORDO_TEST_REBUILD_BINS=1`)
/// after changing a daemon, or the tests see the old one. Builds are serialised across test
/// processes by a file lock and happen at most once per process and binary.
///
/// Panics when the binary can be neither found nor built: no test can proceed without it.
pub fn bin_path_in(package: &str, bin: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let dir = profile_dir().expect("locating the cargo target directory of this test executable");
    let path = dir.join(bin);
    let force = std::env::var_os("ORDO_TEST_REBUILD_BINS").is_some_and(|v| v == "1");
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if built.iter().any(|b| b == bin) || (path.exists() && !force) {
        return path;
    }
    let _lock = FileLock::acquire(&state_dir().join("cargo-build.lock")).expect("build lock");
    if !path.exists() || force {
        build(package, bin, &dir).unwrap_or_else(|e| panic!("building {bin}: {e:#}"));
    }
    assert!(
        path.exists(),
        "{} missing after cargo build",
        path.display()
    );
    built.push(bin.to_owned());
    path
}

/// `target/<profile>` for the running executable: test executables live in
/// `target/<profile>/deps`, binaries one level up.
fn profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    profile_dir_of(&exe).with_context(|| format!("no target/<profile> above {}", exe.display()))
}

fn profile_dir_of(exe: &Path) -> Option<PathBuf> {
    let parent = exe.parent()?;
    if parent
        .file_name()
        .is_some_and(|n| n == "deps" || n == "examples")
    {
        parent.parent().map(Path::to_path_buf)
    } else {
        Some(parent.to_path_buf())
    }
}

fn build(package: &str, bin: &str, profile_dir: &Path) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("profile directory name")?;
    let target_dir = profile_dir.parent().context("target directory")?;
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "-p", package, "--bin", bin, "--profile"])
        .arg(if profile == "debug" { "dev" } else { profile })
        .arg("--target-dir")
        .arg(target_dir);
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Runs `bin --check-config --config FILE` with `config` written to a temporary file and the
/// environment variables that would override it removed; returns the finished process.
pub fn check_config(bin: &Path, config: &str) -> std::process::Output {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).expect("config file");
    std::process::Command::new(bin)
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .env_remove("MONGODB_URI")
        .env_remove("AZURE_SERVICEBUS_CONNECTION_STRING")
        .output()
        .expect("the daemon runs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_dir_of_test_and_bin_executables() {
        assert_eq!(
            profile_dir_of(Path::new("/w/target/debug/deps/e2e-0123abcd")),
            Some(PathBuf::from("/w/target/debug"))
        );
        assert_eq!(
            profile_dir_of(Path::new("/w/target/release/ordo-producer")),
            Some(PathBuf::from("/w/target/release"))
        );
    }
}
