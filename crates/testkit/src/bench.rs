//! What the benchmarks share: the faster MongoDB stand-in and per-process resource usage.
//!
//! Benchmarks measure on the Rust SecantusDB server (`secantusd-rs`, provisioned into
//! `.ordo/tools/bin` by `scripts/bench.sh`); the Python server is a few times slower and would
//! make ordo look slower than it is. Tests keep using the Python server.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `secantusd-rs` process started for a benchmark; killed (and its data removed) on drop.
///
/// Known defect of secantusd-rs 0.5.3-beta.196: with several clients inserting at once, its
/// change streams skip whole inserted batches (4 concurrent `insert_many` writers of 1,000
/// documents: about a fifth of the events never appear; `scripts/probe-change-stream.py`
/// checks a server). One writer, as in the benchmarks, loses nothing, but a daemon's own writes
/// (checkpoints, leases) can rarely race an insert: a run that waits for an event forever is
/// most likely this. The Python server the tests use does not skip.
#[derive(Debug)]
pub struct RustSecantus {
    child: Child,
    dir: PathBuf,
}

impl Drop for RustSecantus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where `scripts/bench.sh` installs `secantusd-rs`.
pub fn default_rust_secantus() -> PathBuf {
    crate::paths::workspace_root().join(".ordo/tools/bin/secantusd-rs")
}

impl RustSecantus {
    /// The server's process id (for its CPU use).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts `bin` (default [`default_rust_secantus`]) on a free loopback port and points
    /// `ORDO_TEST_MONGODB_URI` at it, so every fixture of the benchmark uses it. Returns `None`
    /// when `ORDO_TEST_MONGODB_URI` is already set (a real server was asked for), when the
    /// binary is absent, or when it does not listen within 60 s. Call it before starting any
    /// thread: it sets a process environment variable.
    pub fn start_if_available(bin: Option<PathBuf>) -> Option<Self> {
        if std::env::var_os(crate::mongo::MONGODB_URI_ENV).is_some() {
            return None;
        }
        let bin = bin.unwrap_or_else(default_rust_secantus);
        if !bin.exists() {
            return None;
        }
        let port = crate::free_local_port();
        let dir =
            std::env::temp_dir().join(format!("ordo-bench-secantus-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let child = Command::new(&bin)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--enable-test-commands",
            ])
            .arg("--storage-path")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let server = RustSecantus { child, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() >= deadline {
                eprintln!(
                    "{} did not listen on port {port}; using the Python server",
                    bin.display()
                );
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::env::set_var(
            crate::mongo::MONGODB_URI_ENV,
            format!("mongodb://127.0.0.1:{port}/?directConnection=true"),
        );
        Some(server)
    }
}

/// CPU seconds (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// Peak resident set size of a process in bytes (`VmHWM`), from `/proc/<pid>/status`.
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        let spin = Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_add(1);
        }
        assert!(x > 0);
        assert!(cpu_seconds(pid).unwrap() > 0.0);
        assert!(peak_rss_bytes(pid).unwrap() > 1024 * 1024);
        assert_eq!(cpu_seconds(u32::MAX), None);
    }
}
