//! What each daemon process costs: CPU, peak RSS, and the AMQP connections it holds.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

/// The inodes of the sockets established to `broker`, from `/proc/net/tcp`: read once per
/// sample for every process (they share this network namespace), as the kernel walks every
/// socket of the machine to print it, which churn's closed connections make long.
fn established_to(broker: SocketAddr) -> Option<HashSet<String>> {
    let IpAddr::V4(ip) = broker.ip() else {
        return None;
    };
    // The kernel prints the address as the in-memory (network order) word read as a host
    // integer, and the port in host order.
    let remote = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(ip.octets()),
        broker.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    Some(
        table
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 9 && f[2] == remote && f[3] == "01").then(|| f[9].to_string())
            })
            .collect(),
    )
}

/// AMQP connections process `pid` holds: its sockets (`/proc/<pid>/fd`) among `established`.
fn amqp_connections(pid: u32, established: &HashSet<String>) -> Option<usize> {
    let mut n = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                n += usize::from(established.contains(inode));
            }
        }
    }
    Some(n)
}

/// Samples the AMQP connections of a set of processes every second and keeps each one's
/// maximum, until stopped. (Every half second, with the table read once per process, the
/// sampling cost about 10 % of this process's CPU in the steady row, which the row counts as
/// the stand-ins'.)
pub(crate) struct ConnectionSampler {
    stop: Arc<AtomicBool>,
    max: Arc<Mutex<BTreeMap<u32, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnectionSampler {
    pub(crate) fn start(pids: Vec<u32>, broker: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(Mutex::new(BTreeMap::new()));
        let task = tokio::spawn({
            let (stop, max) = (stop.clone(), max.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    let established = established_to(broker).unwrap_or_default();
                    for &pid in &pids {
                        if let Some(n) = amqp_connections(pid, &established) {
                            let mut m = max.lock().unwrap_or_else(|e| e.into_inner());
                            let e = m.entry(pid).or_insert(0);
                            *e = (*e).max(n);
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
        Self { stop, max, task }
    }

    pub(crate) async fn finish(self) -> BTreeMap<u32, usize> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let m = self.max.lock().unwrap_or_else(|e| e.into_inner());
        m.clone()
    }
}

/// Busy and total jiffies of all CPUs since boot, from the first line of `/proc/stat`.
fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = fields.iter().take(8).sum();
    // user nice system idle iowait irq softirq steal: idle and iowait are not busy.
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// How busy the whole machine was during a row, and what the stand-ins cost: this process
/// (the embedded emulator, the load writer and the latency watch) and SecantusDB. On a small
/// machine shared by everything, a row whose `busy_fraction` is near 1 is bound by the cores,
/// not by a daemon.
pub(crate) struct MachineCpu {
    jiffies: Option<(u64, u64)>,
    own: Option<f64>,
    secantus: Option<(u32, f64)>,
}

impl MachineCpu {
    pub(crate) fn start(secantus_pid: Option<u32>) -> Self {
        let cpu = ordo_testkit::bench::cpu_seconds;
        Self {
            jiffies: machine_jiffies(),
            own: cpu(std::process::id()),
            secantus: secantus_pid.and_then(|pid| Some((pid, cpu(pid)?))),
        }
    }

    pub(crate) fn finish(&self, seconds: f64) -> Value {
        let cpu = ordo_testkit::bench::cpu_seconds;
        let busy = match (self.jiffies, machine_jiffies()) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                Some((b1 - b0) as f64 / (t1 - t0) as f64)
            }
            _ => None,
        };
        let own = self.own.zip(cpu(std::process::id())).map(|(a, b)| b - a);
        let secantus = self.secantus.and_then(|(pid, a)| Some(cpu(pid)? - a));
        json!({
            "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "busy_fraction": busy,
            "emulator_and_load_cpu_seconds": own,
            "emulator_and_load_cores": own.map(|c| c / seconds),
            "secantusdb_cpu_seconds": secantus,
            "secantusdb_cores": secantus.map(|c| c / seconds),
        })
    }
}

/// One process's CPU and peak RSS, per 1,000 of the `events` its row handled.
fn process_json(pid: u32, events: usize, connections: Option<usize>) -> Value {
    let cpu = ordo_testkit::bench::cpu_seconds(pid);
    let rss = ordo_testkit::bench::peak_rss_bytes(pid);
    let per_k = 1000.0 / events.max(1) as f64;
    json!({
        "pid": pid,
        "cpu_seconds": cpu,
        "cpu_ms_per_1000_events": cpu.map(|c| c * 1000.0 * per_k),
        "peak_rss_mib": rss.map(|r| r as f64 / 1048576.0),
        "peak_rss_kib_per_1000_events": rss.map(|r| r as f64 / 1024.0 * per_k),
        "amqp_connections": connections,
    })
}

/// [`process_json`] of every named process, with the most connections the sampler saw.
pub(crate) fn processes_json(
    pids: &[(String, u32)],
    connections: &BTreeMap<u32, usize>,
    events: usize,
) -> BTreeMap<String, Value> {
    pids.iter()
        .map(|(name, pid)| {
            (
                name.clone(),
                process_json(*pid, events, connections.get(pid).copied()),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spinning_thread_shows_as_busy_jiffies() {
        let (b0, t0) = machine_jiffies().expect("/proc/stat");
        let until = std::time::Instant::now() + Duration::from_millis(300);
        while std::time::Instant::now() < until {
            std::hint::spin_loop();
        }
        let (b1, t1) = machine_jiffies().expect("/proc/stat");
        // 300 ms of one core is about 30 jiffies at 100 Hz; other processes only add to it.
        assert!(b1 - b0 >= 20, "busy {b0} -> {b1}");
        assert!(b1 - b0 <= t1 - t0, "busy {} of {}", b1 - b0, t1 - t0);
    }

    #[test]
    fn counts_only_this_process_established_connections_to_the_broker() {
        let count = |pid, broker| amqp_connections(pid, &established_to(broker)?);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let broker = listener.local_addr().unwrap();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let pid = std::process::id();
        assert_eq!(count(pid, broker), Some(0));
        let a = std::net::TcpStream::connect(broker).unwrap();
        let b = std::net::TcpStream::connect(broker).unwrap();
        let _elsewhere = std::net::TcpStream::connect(other.local_addr().unwrap()).unwrap();
        let (_sa, _) = listener.accept().unwrap();
        let (_sb, _) = listener.accept().unwrap();
        // The accepted ends are this process's too, but their remote is the client's port.
        assert_eq!(count(pid, broker), Some(2));
        // Another process's sockets are not this one's, though the table lists them.
        let parent = std::os::unix::process::parent_id();
        assert_eq!(count(parent, broker), Some(0));
        drop((a, b));
        assert_eq!(count(u32::MAX, broker), None);
    }
}
