//! One held session: receive batches and apply them until it is idle, its lock is lost, or
//! shutdown, renewing the lock between steps.

use super::{Counted, Engine};
use ordo_core::metrics as m;
use ordo_core::servicebus::receiver::{ReceiveError, SessionReceiver};
use ordo_projection::ReadModel;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// State of a held session.
pub(super) struct Held {
    /// Per projection: the model and the version stored in the database.
    pub(super) models: Vec<Option<(ReadModel, i64)>>,
    pub(super) blocked: Option<i64>,
    pub(super) checked_blocked: bool,
    /// This worker wrote "blocked" into the session state while holding it: cleared here if a
    /// repair lifts the block before the session is released. A session accepted later is not
    /// read for it (that costs every session a `$management` link and a round trip): the repair
    /// clears the state of a session no worker holds (`repair::clear_session_state`).
    pub(super) state_says_blocked: bool,
}

/// What the session loop does after a batch.
pub(super) enum After {
    Continue,
    Drop,
}

impl Engine {
    /// Works one session until it is idle, its lock is lost, or shutdown, and releases it.
    pub async fn work_session<R: SessionReceiver>(
        &self,
        mut session: R,
        cancel: &CancellationToken,
    ) {
        self.hold_session(&mut session, cancel).await;
        session.close().await;
    }

    /// Works one session until it is idle, its lock is lost, or shutdown; the caller releases
    /// it (a worker does so in the background, [`super::accept`]).
    pub(super) async fn hold_session<R: SessionReceiver>(
        &self,
        session: &mut R,
        cancel: &CancellationToken,
    ) {
        let held_now = Counted::new(&self.activity.sessions_held, Some(m::SESSIONS_HELD));
        let sid = session.session_id().to_string();
        tracing::debug!(session = %sid, "session accepted");
        let mut held = Held {
            models: vec![None; self.projections.len()],
            blocked: None,
            checked_blocked: false,
            state_says_blocked: false,
        };
        let mut renewal = self.renewal(session);
        let mut idle_since = Instant::now();
        // How long the broker takes to hand over messages it holds, one round trip after a
        // receive asks for them (see `receive_floor`); unknown until the first batch.
        let mut delivery: Option<Duration> = None;
        loop {
            if cancel.is_cancelled() {
                break;
            }
            if Instant::now() >= renewal.due() {
                if let Err(e) = session.renew_lock().await {
                    self.lock_trouble(&sid, &e);
                    break;
                }
                metrics::counter!(m::LOCK_RENEWALS).increment(1);
                renewal.renewed();
            }
            let floor = self.receive_floor(delivery);
            let idle_limit = self.idle_limit().max(floor);
            let wait = self
                .cfg
                .receive_wait
                .min(idle_limit.saturating_sub(idle_since.elapsed()).max(floor))
                .max(Duration::from_millis(10));
            let asked = Instant::now();
            let msgs = match session.receive(self.cfg.batch_size, wait).await {
                Ok(v) => v,
                Err(e) => {
                    self.lock_trouble(&sid, &e);
                    break;
                }
            };
            if msgs.is_empty() {
                if idle_since.elapsed() >= idle_limit {
                    break;
                }
                continue;
            }
            delivery.get_or_insert(asked.elapsed());
            match self
                .batch(session, &mut held, msgs, &mut renewal, cancel)
                .await
            {
                After::Continue => idle_since = Instant::now(),
                After::Drop => break,
            }
        }
        drop(held_now);
        tracing::debug!(session = %sid, "session done");
    }

    /// The shortest a receive waits, and the shortest a session counts as idle: a receive asks
    /// the broker for messages, which arrive a round trip later, so a wait shorter than that
    /// round trip sees nothing even when the session holds messages. The session's first
    /// receive waits `receive_wait` in full (the broker hands out a session that has messages);
    /// from then on the time its first batch took stands for the round trip. Without it, a
    /// broker farther away than `busy_session_idle_timeout` (20 ms; other regions are) had
    /// every session released before its first message arrived, and nothing was applied.
    fn receive_floor(&self, delivery: Option<Duration>) -> Duration {
        delivery.map_or(self.cfg.receive_wait, |d| d.min(self.cfg.receive_wait))
    }

    /// How long a held session may stay idle now: `session_idle_timeout`, or the shorter
    /// `busy_session_idle_timeout` while other aggregates wait at the broker for the
    /// worker this idle session keeps: the process's last two accepts or more were each handed
    /// a session, none answered "no session available" in between. Workers in an accept are
    /// not free ones: under a backlog of small aggregates they are how the backlog is worked.
    fn idle_limit(&self) -> Duration {
        let idle = self.cfg.session_idle_timeout;
        if self.activity.sessions_in_a_row.load(Relaxed) >= 2 {
            self.cfg.busy_session_idle_timeout.min(idle)
        } else {
            idle
        }
    }

    pub(super) fn lock_trouble(&self, sid: &str, e: &ReceiveError) {
        if e.is_lock_lost() {
            metrics::counter!(m::LOCKS_LOST).increment(1);
            tracing::warn!(session = %sid, error = %e, "session lock lost; dropping its work");
        } else {
            tracing::warn!(session = %sid, error = %e, "session failed; releasing it");
        }
    }
}
