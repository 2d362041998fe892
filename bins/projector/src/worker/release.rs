//! Sessions a worker is done with, released in the background while it works its next.

use super::Activity;
use ordo_core::metrics as m;
use ordo_core::servicebus::receiver::SessionReceiver;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// How many sessions one worker may have closing at once before it waits for one to finish.
const RELEASES_IN_FLIGHT: usize = 4;

/// How long a release may take before it is given up: the broker ends the session lock when
/// its connection goes, or when the lock expires. Below the default grace period (20 s), so a
/// release that hangs does not make a shutdown report work in flight.
const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// A worker's sessions being released. Closing a session receiver takes round trips (detach
/// its link, and its `$management` link if one was attached; its AMQP session is kept for the
/// next accept on the connection), and the broker hands the session
/// to another worker only once it is closed; nothing of this worker depends on it, so the
/// worker accepts its next session meanwhile. At most [`RELEASES_IN_FLIGHT`] at once, and all
/// of them are waited for before the worker returns, so a shutdown releases its sessions. A
/// worker that panics leaves its releases running (see the `Drop`), each bounded by
/// [`RELEASE_WAIT`].
pub(super) struct Releasing<R> {
    closing: tokio::task::JoinSet<()>,
    _session: std::marker::PhantomData<fn(R)>,
}

impl<R> Default for Releasing<R> {
    fn default() -> Self {
        Self {
            closing: tokio::task::JoinSet::new(),
            _session: std::marker::PhantomData,
        }
    }
}

impl<R: SessionReceiver + 'static> Releasing<R> {
    /// Closes `session` in the background, first waiting for a release to finish if
    /// [`RELEASES_IN_FLIGHT`] are under way.
    pub(super) async fn release(&mut self, session: R, activity: &Activity) {
        while let Some(joined) = self.closing.try_join_next() {
            released(joined, activity);
        }
        if self.closing.len() >= RELEASES_IN_FLIGHT {
            if let Some(joined) = self.closing.join_next().await {
                released(joined, activity);
            }
        }
        let sid = session.session_id().to_string();
        self.closing.spawn(async move {
            match tokio::time::timeout(RELEASE_WAIT, session.close()).await {
                Ok(()) => tracing::debug!(session = %sid, "session released"),
                Err(_) => {
                    tracing::warn!(session = %sid, "releasing the session took over {RELEASE_WAIT:?}; given up")
                }
            }
        });
    }

    /// Waits for every release under way.
    pub(super) async fn finish(&mut self, activity: &Activity) {
        while let Some(joined) = self.closing.join_next().await {
            released(joined, activity);
        }
    }
}

impl<R> Drop for Releasing<R> {
    /// A worker that panicked would abort its releases with the `JoinSet`; they run on instead,
    /// so the broker hands those sessions out again as soon as they are closed, not when their
    /// connection goes or their lock expires.
    fn drop(&mut self) {
        self.closing.detach_all();
    }
}

/// Reports a release that panicked: a bug, counted as `ordo_task_restarts_total{task =
/// "session_release"}` and in [`Activity::restarts`]. Nothing is lost: the receiver was dropped, which detaches its link, and
/// its unsettled messages come back from the broker.
fn released(joined: Result<(), tokio::task::JoinError>, activity: &Activity) {
    if let Err(e) = joined {
        if e.is_panic() {
            tracing::error!(error = %e, "releasing a session panicked");
            metrics::counter!(m::TASK_RESTARTS, "task" => "session_release").increment(1);
            activity.restarts.fetch_add(1, Relaxed);
        }
    }
}
