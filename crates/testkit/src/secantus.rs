//! SecantusDB, the MongoDB stand-in: installed once into the workspace's `.venv`, started
//! as a supervised process per fixture (killed with the harness, restartable on its port).

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use mongodb::bson::doc;
use mongodb::options::ClientOptions;
use mongodb::Client;
use tokio::time::Instant;

use crate::lock::FileLock;
use crate::paths::{state_dir, venv_dir};

/// The pinned SecantusDB release (a beta; newer ones may behave differently).
pub const SECANTUS_VERSION: &str = "0.7.0b3";

/// How long a started server gets to accept connections and answer `ping`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `secantus.cli.main` (what the `secantusd-py` script runs) with one addition: a thread
/// that SIGKILLs the server when its stdin reaches EOF. The harness holds the write end, so a
/// test process that dies without running destructors (aborted, killed by a test runner's
/// timeout) does not leave a server behind.
const LAUNCHER: &str = r#"
import os, sys, threading
def _watch_parent():
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os.kill(os.getpid(), 9)
threading.Thread(target=_watch_parent, daemon=True).start()
from secantus.cli import main
sys.argv[0] = "secantusd-py"
sys.exit(main())
"#;

/// How to start a SecantusDB server.
#[derive(Debug, Clone, Default)]
pub struct SecantusOptions {
    /// Extra command-line arguments, e.g. `--oplog-max-entries 50`.
    pub extra_args: Vec<String>,
    /// Store data in a temporary directory instead of `:memory:`, so [`SecantusDb::restart`]
    /// brings the same data back (an outage, not a wipe).
    pub persistent: bool,
}

impl SecantusOptions {
    /// Defaults: in-memory storage, test commands enabled, no extra arguments.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one command-line argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Caps the oplog at `n` entries, so tests can make a resume token fall out of history.
    pub fn oplog_max_entries(self, n: u64) -> Self {
        self.arg("--oplog-max-entries").arg(n.to_string())
    }

    /// Keeps data across [`SecantusDb::restart`].
    pub fn persistent(mut self) -> Self {
        self.persistent = true;
        self
    }
}

/// Makes sure `<workspace>/.venv` has the pinned SecantusDB and returns its python.
///
/// Parallel test processes (nextest runs one per test) serialise on a file lock; the first one
/// installs (about 30 s), the others find the marker file afterwards.
pub async fn ensure_secantus_installed() -> anyhow::Result<PathBuf> {
    tokio::task::spawn_blocking(install_blocking)
        .await
        .context("secantusdb install task panicked")?
}

fn install_blocking() -> anyhow::Result<PathBuf> {
    let venv = venv_dir();
    let python = venv.join("bin").join("python");
    let marker = venv.join(format!(".ordo-secantusdb-{SECANTUS_VERSION}"));
    if marker.exists() && python.exists() {
        return Ok(python);
    }
    let _lock = FileLock::acquire(&state_dir().join("secantusdb-install.lock"))?;
    if marker.exists() && python.exists() {
        return Ok(python);
    }
    if !python.exists() {
        let base = std::env::var("ORDO_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());
        run_logged(Command::new(&base).arg("-m").arg("venv").arg(&venv))
            .with_context(|| format!("creating virtual environment {}", venv.display()))?;
    }
    run_logged(
        Command::new(venv.join("bin").join("pip"))
            .args(["install", "--disable-pip-version-check", "--quiet"])
            .arg(format!("SecantusDB=={SECANTUS_VERSION}")),
    )
    .with_context(|| {
        format!(
            "installing SecantusDB=={SECANTUS_VERSION} into {}",
            venv.display()
        )
    })?;
    std::fs::write(&marker, b"installed by ordo-testkit\n")
        .with_context(|| format!("writing {}", marker.display()))?;
    Ok(python)
}

fn run_logged(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A SecantusDB server process on 127.0.0.1. Killed (SIGKILL, it ignores SIGTERM) on drop.
#[derive(Debug)]
pub struct SecantusDb {
    python: PathBuf,
    port: u16,
    options: SecantusOptions,
    process: Option<Running>,
    /// Data directory for persistent servers; kept across restarts, removed on drop.
    data_dir: Option<tempfile::TempDir>,
    /// Holds the log file of every incarnation of the server.
    log_dir: tempfile::TempDir,
    starts: u32,
}

#[derive(Debug)]
struct Running {
    child: Child,
    /// Closing this makes the launcher kill the server; see [`LAUNCHER`].
    stdin: Option<ChildStdin>,
    log_path: PathBuf,
    /// Shows the server's log and state in the watchdog's report while it runs.
    _watched: crate::watchdog::DaemonGuard,
}

impl SecantusDb {
    /// Installs SecantusDB when needed and starts a server on a free loopback port, returning
    /// once it answers `ping`.
    pub async fn start(options: SecantusOptions) -> anyhow::Result<Self> {
        let python = ensure_secantus_installed().await?;
        let data_dir = if options.persistent {
            Some(
                tempfile::Builder::new()
                    .prefix("ordo-secantus-data-")
                    .tempdir()?,
            )
        } else {
            None
        };
        let mut server = Self {
            python,
            port: 0,
            options,
            process: None,
            data_dir,
            log_dir: tempfile::Builder::new()
                .prefix("ordo-secantus-log-")
                .tempdir()?,
            starts: 0,
        };
        // The free port can be taken between probing and binding; try a few.
        let mut last_err = None;
        for _ in 0..4 {
            server.port = crate::net::free_local_port();
            match server.launch().await {
                Ok(()) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mongodb://127.0.0.1:<port>/?directConnection=true`.
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.child.id())
    }

    /// Whether the process is alive (not killed, not crashed).
    pub fn is_running(&mut self) -> bool {
        match self.process.as_mut() {
            Some(p) => matches!(p.child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILLs the server and reaps it. Idempotent. Connections drop at once; an in-memory
    /// server's data is gone (use [`SecantusOptions::persistent`] to keep it).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
            drop(p.stdin.take());
        }
    }

    /// SIGSTOPs (`hang = true`) or SIGCONTs the server: a hung database, whose connections
    /// stay open and whose every command waits, unlike a killed one that refuses at once.
    pub fn hang(&mut self, hang: bool) -> anyhow::Result<()> {
        let p = self.process.as_ref().context("secantusdb is not running")?;
        let pid = i32::try_from(p.child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .context("invalid pid")?;
        let signal = if hang {
            rustix::process::Signal::STOP
        } else {
            rustix::process::Signal::CONT
        };
        rustix::process::kill_process(pid, signal).context("signalling secantusdb")
    }

    /// Kills the server if it runs and starts it again on the same port, returning once it
    /// answers `ping`.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        // The old socket may linger for a moment after SIGKILL; retry the bind briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.launch().await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "restarting secantusdb, retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Everything the server printed, across restarts.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for i in 1..=self.starts {
            let path = self.log_dir.path().join(format!("secantusd-{i}.log"));
            if let Ok(text) = std::fs::read_to_string(&path) {
                out.push_str(&text);
            }
        }
        out
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let log_path = self
            .log_dir
            .path()
            .join(format!("secantusd-{}.log", self.starts));
        let log = File::create(&log_path)?;
        let storage = match &self.data_dir {
            Some(dir) => dir.path().display().to_string(),
            None => ":memory:".to_owned(),
        };
        // Without a log sync per commit, acknowledged writes die with a SIGKILLed process; a
        // persistent server exists precisely to survive that.
        let sync = self.data_dir.as_ref().map(|_| "--sync-on-commit");
        let mut child = Command::new(&self.python)
            .arg("-c")
            .arg(LAUNCHER)
            .args(["--host", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--storage-path", &storage, "--enable-test-commands"])
            .args(sync)
            .args(&self.options.extra_args)
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting secantusdb with {}", self.python.display()))?;
        let stdin = child.stdin.take().context("secantusdb stdin")?;
        let watched = crate::watchdog::daemon(
            format!("secantusdb (port {})", self.port),
            child.id(),
            log_path.clone(),
        );
        self.process = Some(Running {
            child,
            stdin: Some(stdin),
            log_path,
            _watched: watched,
        });
        match self.wait_answering().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let logs = self
                    .process
                    .as_ref()
                    .map(|p| tail(&p.log_path))
                    .unwrap_or_default();
                self.kill();
                Err(e.context(format!(
                    "secantusdb on port {} did not start; log:\n{logs}",
                    self.port
                )))
            }
        }
    }

    async fn wait_answering(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            if let Some(p) = self.process.as_mut() {
                if let Some(status) = p.child.try_wait()? {
                    bail!("secantusdb exited during startup with {status}");
                }
            }
            let connected = tokio::task::spawn_blocking(move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })
            .await?;
            if connected {
                break;
            }
            if Instant::now() >= deadline {
                bail!("secantusdb did not listen within {STARTUP_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let mut opts = ClientOptions::parse(self.uri()).await?;
        opts.server_selection_timeout = Some(deadline.saturating_duration_since(Instant::now()));
        let client = Client::with_options(opts)?;
        client
            .database("admin")
            .run_command(doc! { "ping": 1 })
            .await
            .context("pinging secantusdb")?;
        client.shutdown().await;
        Ok(())
    }
}

impl Drop for SecantusDb {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last 8 KiB of a log file, for error messages.
fn tail(path: &Path) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(8192)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The orphan guard: when the harness's end of the pipe closes (as when the test process
    /// dies without running destructors), the server kills itself.
    #[tokio::test]
    async fn server_dies_when_the_harness_goes_away() {
        let mut server = SecantusDb::start(SecantusOptions::new()).await.unwrap();
        let running = server.process.as_mut().unwrap();
        drop(running.stdin.take());
        crate::wait_until(Duration::from_secs(10), || {
            let exited = matches!(running.child.try_wait(), Ok(Some(_)));
            async move { exited }
        })
        .await;
    }
}
