//! The long-running tasks of an active term, by name, and what their end means.
//!
//! The reader, the publishing workers' supervisor, the checkpointer and the lease keeper run
//! as separate tasks. Each is expected to end only when the term ends; one that ends early
//! (an error or a panic) ends the term: the producer stops with a [`TaskFailed`] error and the
//! process exits non-zero, so systemd or Kubernetes restarts it, instead of running on with a
//! part missing. Publishing workers are the exception: their supervisor restarts them.

use std::fmt;

use tokio::task::JoinError;

/// The task kinds of a term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// Reads the change stream and scans, queues messages.
    Reader,
    /// Supervises the publishing workers.
    Publishers,
    /// Saves the acknowledged prefix.
    Checkpointer,
    /// Renews the lease.
    LeaseKeeper,
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskKind::Reader => "reader",
            TaskKind::Publishers => "publishers",
            TaskKind::Checkpointer => "checkpointer",
            TaskKind::LeaseKeeper => "lease keeper",
        })
    }
}

/// A task of the term ended before the term did.
#[derive(Debug, thiserror::Error)]
#[error("the {kind} task failed: {reason}")]
pub struct TaskFailed {
    /// Which task.
    pub kind: TaskKind,
    /// Its error or panic message.
    pub reason: String,
}

impl TaskFailed {
    /// From a task's join error (a panic, or an abort nobody asked for).
    pub fn joined(kind: TaskKind, e: JoinError) -> Self {
        Self {
            kind,
            reason: panic_text(e),
        }
    }
}

/// The panic message of a failed task, or why it did not finish.
pub fn panic_text(e: JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let payload = e.into_panic();
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    format!("panicked: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_is_named_by_task_and_message() {
        let e = tokio::spawn(async { panic!("checkpoint bug") })
            .await
            .unwrap_err();
        let failed = TaskFailed::joined(TaskKind::Checkpointer, e);
        assert_eq!(
            failed.to_string(),
            "the checkpointer task failed: panicked: checkpoint bug"
        );
    }
}
