//! Says where a hung test hangs, before the test runner kills it.
//!
//! The runner (nextest's `slow-timeout` in `.config/nextest.toml`) kills a test process after
//! 300 s and shows only what the test printed, which for a hung test is nothing: the daemons'
//! logs are printed when a test panics, and a hang does not panic. So the first wait or daemon
//! spawn of a test process starts this watchdog, a plain OS thread (it fires even when every
//! runtime worker is blocked). If the process is still running after
//! `ORDO_TEST_WATCHDOG_SECS` (default 240 s), it prints the wait in progress with its caller's
//! line, and the tail of every live daemon's log.

use std::panic::Location;
use std::path::PathBuf;
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// How long a test process runs before the watchdog reports; below the runner's 300 s.
const DEFAULT_AFTER: Duration = Duration::from_secs(240);
/// Lines of each daemon's log the report shows.
const LOG_TAIL_LINES: usize = 150;

struct State {
    /// Waits in progress: (id, caller, start). Waits can nest or run side by side.
    waits: Vec<(u64, &'static Location<'static>, Instant)>,
    /// Live daemons: (id, name, pid, log file).
    daemons: Vec<(u64, String, u32, PathBuf)>,
    next_id: u64,
}

static STATE: Mutex<State> = Mutex::new(State {
    waits: Vec::new(),
    daemons: Vec::new(),
    next_id: 0,
});

impl State {
    fn take_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

fn arm() {
    static ARMED: Once = Once::new();
    ARMED.call_once(|| {
        let after = std::env::var("ORDO_TEST_WATCHDOG_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(DEFAULT_AFTER, Duration::from_secs);
        let started = Instant::now();
        let _ = std::thread::Builder::new()
            .name("ordo-test-watchdog".into())
            .spawn(move || {
                std::thread::sleep(after);
                eprintln!("{}", report(started.elapsed()));
            });
    });
}

fn report(ran: Duration) -> String {
    render(&state(), ran)
}

/// What the watchdog prints.
fn render(s: &State, ran: Duration) -> String {
    let mut out = format!(
        "===== ordo-testkit watchdog: this test process has run {:.0} s =====\n",
        ran.as_secs_f64()
    );
    for (_, caller, since) in &s.waits {
        out.push_str(&format!(
            "a wait started at {caller} {:.1} s ago has not returned\n",
            since.elapsed().as_secs_f64()
        ));
    }
    if s.waits.is_empty() {
        out.push_str("no wait_until/wait_for is in progress: the test is stuck elsewhere\n");
    }
    out.push_str(&threads());
    for (_, name, pid, log) in &s.daemons {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        let (state, wchan) = state_of(&PathBuf::from(format!("/proc/{pid}")));
        out.push_str(&format!(
            "----- {name} (pid {pid}, state {state}, waiting in {wchan}): last {} lines -----\n{}\n",
            tail.len(),
            tail.join("\n")
        ));
    }
    out.push_str("===== end of watchdog report =====");
    out
}

/// This process's threads, each with its state and the kernel function it waits in: a runtime
/// worker blocked in `futex_wait` is a blocking call inside async code, all of them in
/// `ep_poll` an await that nothing will wake.
fn threads() -> String {
    let mut out = String::from("threads (name, state, waiting in):\n");
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let (state, wchan) = state_of(&dir);
        out.push_str(&format!("  {} {state} {wchan}\n", name.trim()));
    }
    out
}

/// The state letter (R running, S sleeping, D disk, T stopped, Z zombie) and the kernel wait
/// channel of the process or thread at `dir` (`/proc/PID` or `/proc/self/task/TID`); `?` when
/// it is gone.
fn state_of(dir: &std::path::Path) -> (String, String) {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let stat = read("stat");
    // The state follows the name's closing parenthesis.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("?")
        .to_owned();
    let wchan = read("wchan").trim().to_owned();
    (state, if wchan.is_empty() { "?".into() } else { wchan })
}

/// Marks a wait by `caller` as in progress until the returned guard drops.
pub(crate) fn waiting(caller: &'static Location<'static>) -> WaitGuard {
    arm();
    let mut s = state();
    let id = s.take_id();
    s.waits.push((id, caller, Instant::now()));
    WaitGuard(id)
}

pub(crate) struct WaitGuard(u64);

impl Drop for WaitGuard {
    fn drop(&mut self) {
        state().waits.retain(|(id, ..)| *id != self.0);
    }
}

/// Registers a live process (a daemon, a database server) with its log; the report shows its
/// state and the log's tail until the guard drops.
pub(crate) fn daemon(name: String, pid: u32, log: PathBuf) -> DaemonGuard {
    arm();
    let mut s = state();
    let id = s.take_id();
    s.daemons.push((id, name, pid, log));
    DaemonGuard(id)
}

#[derive(Debug)]
pub(crate) struct DaemonGuard(u64);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        state().daemons.retain(|(id, ..)| *id != self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_the_wait_in_progress_and_tails_live_daemon_logs() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("daemon.log");
        let lines: Vec<String> = (0..LOG_TAIL_LINES + 10)
            .map(|i| format!("line {i}"))
            .collect();
        std::fs::write(&log, lines.join("\n")).unwrap();
        let here = Location::caller();
        let s = State {
            waits: vec![(2, here, Instant::now())],
            daemons: vec![(0, "ordo-producer".into(), std::process::id(), log)],
            next_id: 1,
        };
        let report = render(&s, Duration::from_secs(241));
        assert!(report.contains("has run 241 s"), "{report}");
        assert!(
            report.contains("threads (name, state, waiting in):"),
            "{report}"
        );
        assert!(
            report.contains(&format!("a wait started at {here}")),
            "{report}"
        );
        let me = std::process::id();
        assert!(
            report.contains(&format!("ordo-producer (pid {me}, state ")),
            "{report}"
        );
        assert!(report.contains("last 150 lines"), "{report}");
        assert!(report.contains("\nline 10\n"), "{report}");
        assert!(report.contains("line 159"), "{report}");
        assert!(!report.contains("\nline 9\n"), "{report}");
        let idle = State {
            waits: Vec::new(),
            daemons: Vec::new(),
            next_id: 0,
        };
        let report = render(&idle, Duration::from_secs(1));
        assert!(
            report.contains("no wait_until/wait_for is in progress"),
            "{report}"
        );
    }

    #[test]
    fn an_outer_wait_is_still_reported_after_an_inner_one_ends() {
        let outer_at = Location::caller();
        let outer = waiting(outer_at);
        let inner_at = inner_location();
        let inner = waiting(inner_at);
        let both = report(Duration::ZERO);
        assert!(
            both.contains(&format!("a wait started at {outer_at}")),
            "{both}"
        );
        assert!(
            both.contains(&format!("a wait started at {inner_at}")),
            "{both}"
        );
        drop(inner);
        let after = report(Duration::ZERO);
        assert!(
            after.contains(&format!("a wait started at {outer_at}")),
            "{after}"
        );
        assert!(
            !after.contains(&format!("a wait started at {inner_at}")),
            "{after}"
        );
        drop(outer);
        assert!(!report(Duration::ZERO).contains(&format!("{outer_at}")));
    }

    #[track_caller]
    fn inner_location() -> &'static Location<'static> {
        Location::caller()
    }

    #[test]
    fn a_daemon_is_reported_while_its_guard_lives() {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("watched-{:?}", std::thread::current().id());
        let guard = daemon(name.clone(), 1, dir.path().join("daemon.log"));
        assert!(report(Duration::ZERO).contains(&name));
        drop(guard);
        assert!(!report(Duration::ZERO).contains(&name));
    }
}
