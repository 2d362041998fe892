//! The long-running tasks of an active term, by name, and what their end means.
//!
//! The reader, the publishing workers' supervisor, the checkpointer and the lease keeper run
//! as separate tasks. Each is expected to end only when the term ends; one that ends early
//! (an error or a panic) ends the term: the producer stops with a [`TaskFailed`] error and the
//! process exits non-zero, so systemd or Kubernetes restarts it, instead of running on with a
//! part missing. Publishing workers are the exception: their supervisor restarts them.

use std::fmt;

use ordo_core::checkpoint::CheckpointError;
use ordo_core::lease::LeaseError;
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::checkpointer::CheckpointerEnd;
use crate::dispatch::WorkerError;
use crate::lease_keeper::LeaseEnd;
use crate::source::SourceError;
use crate::ProducerError;
use ordo_core::readiness::Fault;

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

/// What ended the first phase of a term.
pub(crate) enum Ended {
    /// The reader returned (shutdown, or a halt error).
    Reader(Result<(), SourceError>),
    /// Lease taken over or expired (with the lease keeper's database fault), or the checkpoint
    /// fenced.
    Lost(Option<Fault>),
    /// A task failed: the term stops with this error.
    Failed(ProducerError),
}

/// The tasks of an active term, and the tokens that ask them to stop.
pub(crate) struct TermTasks {
    pub reader: JoinHandle<Result<(), SourceError>>,
    pub publishers: JoinHandle<Result<(), WorkerError>>,
    pub checkpointer: JoinHandle<Result<CheckpointerEnd, CheckpointError>>,
    pub keeper: JoinHandle<Result<LeaseEnd, LeaseError>>,
    /// Stops the reader: shutdown, or the lease lost.
    pub stop_reading: CancellationToken,
    /// Abandons sends at once: the lease lost, a failed task, or the drain part of the grace
    /// period over.
    pub abandon: CancellationToken,
    /// Stops the checkpointer, which then hands back its state for the final save.
    pub stop_checkpointer: CancellationToken,
    /// Stops the lease keeper, which then hands back the lease to release.
    pub stop_keeper: CancellationToken,
}

impl TermTasks {
    /// Waits for the first task to end and says what its end means. Only the reader may end
    /// first on its own (shutdown or halt); the others end the term, as lost (lease taken
    /// over, checkpoint fenced, sends abandoned) or failed (an error, a panic, or a return
    /// nobody asked for).
    pub async fn first_to_end(&mut self) -> (TaskKind, Ended) {
        tokio::select! {
            r = &mut self.reader => (TaskKind::Reader, match r {
                Ok(r) => Ended::Reader(r),
                Err(e) => Ended::Failed(TaskFailed::joined(TaskKind::Reader, e).into()),
            }),
            r = &mut self.keeper => (TaskKind::LeaseKeeper, match r {
                Ok(Ok(LeaseEnd::Lost)) => Ended::Lost(None),
                Ok(Ok(LeaseEnd::Expired(fault))) => Ended::Lost(Some(fault)),
                Ok(Ok(LeaseEnd::Stopped(_))) => Ended::Failed(early(TaskKind::LeaseKeeper)),
                Ok(Err(e)) => Ended::Failed(e.into()),
                Err(e) => Ended::Failed(TaskFailed::joined(TaskKind::LeaseKeeper, e).into()),
            }),
            r = &mut self.checkpointer => (TaskKind::Checkpointer, match r {
                Ok(Ok(CheckpointerEnd::Fenced(_))) => Ended::Lost(None),
                Ok(Ok(CheckpointerEnd::Stopped(_))) => Ended::Failed(early(TaskKind::Checkpointer)),
                Ok(Err(e)) => Ended::Failed(e.into()),
                Err(e) => Ended::Failed(TaskFailed::joined(TaskKind::Checkpointer, e).into()),
            }),
            r = &mut self.publishers => (TaskKind::Publishers, match r {
                // Abandoned by the lease keeper on a lost lease: its own result says so too.
                Ok(Ok(())) if self.abandon.is_cancelled() => Ended::Lost(None),
                Ok(Ok(())) => Ended::Failed(early(TaskKind::Publishers)),
                Ok(Err(e)) => Ended::Failed(e.into()),
                Err(e) => Ended::Failed(TaskFailed::joined(TaskKind::Publishers, e).into()),
            }),
        }
    }

    /// After `ended` ended the term early: stops the others at once (a save in flight may wait
    /// on an unreachable database, and sends are abandoned) and waits only for the lease
    /// keeper, whose lease is worth releasing. Returns the keeper's end when it had one.
    pub async fn stop_after(self, ended: TaskKind) -> Option<LeaseEnd> {
        for stop in [
            &self.stop_reading,
            &self.abandon,
            &self.stop_checkpointer,
            &self.stop_keeper,
        ] {
            stop.cancel();
        }
        for (kind, handle) in [
            (TaskKind::Reader, self.reader.abort_handle()),
            (TaskKind::Publishers, self.publishers.abort_handle()),
            (TaskKind::Checkpointer, self.checkpointer.abort_handle()),
        ] {
            if kind != ended {
                handle.abort();
            }
        }
        // A handle that already ended must not be polled again.
        if ended != TaskKind::Checkpointer {
            let _ = self.checkpointer.await;
        }
        if ended == TaskKind::LeaseKeeper {
            return None;
        }
        self.keeper.await.ok().and_then(Result::ok)
    }
}

/// A task that returned although nobody asked it to.
pub(crate) fn early(kind: TaskKind) -> ProducerError {
    TaskFailed {
        kind,
        reason: "ended before the term did".into(),
    }
    .into()
}

/// A task's outcome at the end of a term: its value, or the term's error.
pub(crate) fn joined<T, E: Into<ProducerError>>(
    kind: TaskKind,
    r: Result<Result<T, E>, JoinError>,
) -> Result<T, ProducerError> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(TaskFailed::joined(kind, e).into()),
    }
}

/// Like [`joined`] for a task asked to stop, waiting at most `within`: a task in the middle of
/// a database operation (a checkpoint save has no deadline of its own) can wait on a hung
/// server for good. `Ok(None)` when it did not stop in time; it is aborted then.
pub(crate) async fn stopped_within<T, E: Into<ProducerError>>(
    kind: TaskKind,
    mut handle: JoinHandle<Result<T, E>>,
    within: std::time::Duration,
) -> Result<Option<T>, ProducerError> {
    match tokio::time::timeout(within, &mut handle).await {
        Ok(r) => joined(kind, r).map(Some),
        Err(_) => {
            handle.abort();
            tracing::warn!(task = %kind, within_ms = within.as_millis() as u64, "task did not stop in time (waiting on the database?): abandoned");
            Ok(None)
        }
    }
}

/// Aborts the task when dropped: nothing a term or a reader started outlives it.
pub(crate) struct AbortOnDrop<T>(pub JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The panic message of a failed task, or why it did not finish.
pub fn panic_text(e: JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let text = ordo_core::restart::panic_message(e.into_panic().as_ref());
    format!("panicked: {text}")
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// Counts the tasks that are gone (returned, or dropped by an abort).
    #[derive(Clone, Default)]
    struct Gone(Arc<AtomicUsize>);

    struct OnDrop(Gone);

    impl Drop for OnDrop {
        fn drop(&mut self) {
            self.0 .0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A task that panics when `kind` is `failing`, and otherwise runs until it is aborted.
    fn task<T: Send + 'static>(kind: TaskKind, failing: TaskKind, gone: &Gone) -> JoinHandle<T> {
        let guard = OnDrop(gone.clone());
        tokio::spawn(async move {
            let _guard = guard;
            if kind == failing {
                panic!("{kind} bug");
            }
            std::future::pending::<T>().await
        })
    }

    fn term(failing: TaskKind, gone: &Gone) -> TermTasks {
        // The lease keeper is asked to stop, not aborted: it ends on its token.
        let keeper_stop = CancellationToken::new();
        let guard = OnDrop(gone.clone());
        let stop = keeper_stop.clone();
        let keeper = tokio::spawn(async move {
            let _guard = guard;
            if failing == TaskKind::LeaseKeeper {
                panic!("{failing} bug");
            }
            stop.cancelled().await;
            Ok(LeaseEnd::Lost)
        });
        TermTasks {
            reader: task(TaskKind::Reader, failing, gone),
            publishers: task(TaskKind::Publishers, failing, gone),
            checkpointer: task(TaskKind::Checkpointer, failing, gone),
            keeper,
            stop_reading: CancellationToken::new(),
            abandon: CancellationToken::new(),
            stop_checkpointer: CancellationToken::new(),
            stop_keeper: keeper_stop,
        }
    }

    async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .unwrap_or_else(|_| panic!("{what} did not finish"))
    }

    /// Each task of a term that panics ends the term with an error naming it (the process
    /// then exits non-zero, and systemd or Kubernetes starts it again), and the other three
    /// are stopped rather than left running without it.
    #[tokio::test]
    async fn a_panic_in_any_task_of_a_term_ends_the_term_and_stops_the_rest() {
        for failing in [
            TaskKind::Reader,
            TaskKind::Publishers,
            TaskKind::Checkpointer,
            TaskKind::LeaseKeeper,
        ] {
            let gone = Gone::default();
            let mut tasks = term(failing, &gone);
            let (which, ended) = within("first_to_end", tasks.first_to_end()).await;
            assert_eq!(which, failing);
            match ended {
                Ended::Failed(ProducerError::Task(TaskFailed { kind, reason })) => {
                    assert_eq!(kind, failing);
                    assert_eq!(reason, format!("panicked: {failing} bug"));
                }
                Ended::Failed(e) => panic!("{failing}: another error: {e}"),
                Ended::Reader(_) | Ended::Lost(_) => panic!("{failing}: not a failure"),
            }
            assert_eq!(gone.0.load(Ordering::SeqCst), 1, "{failing}: only it ended");
            let kept = within("stop_after", tasks.stop_after(failing)).await;
            assert_eq!(
                kept.is_some(),
                failing != TaskKind::LeaseKeeper,
                "{failing}: the keeper's end is waited for unless it is what failed"
            );
            assert_eq!(
                gone.0.load(Ordering::SeqCst),
                4,
                "{failing}: all four are gone"
            );
        }
    }

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
