//! Outcomes (dispositions) of the deliveries clients send us, held back a little.
//!
//! fe2o3-amqp 0.14, the AMQP stack of azservicebus, registers a delivery in its link's
//! unsettled map only *after* the transfer has been handed to its session task
//! (`SenderLink::send_payload_with_transfer`). A disposition processed before that
//! registration finds no entry and is dropped; the session forgets the delivery id, so nothing
//! sent later can settle it, and the client waits for an outcome that never comes (a batch send
//! hangs until its timeout; a `$cbs` or `$management` call never completes because
//! `MgmtClient::call` waits for the request's outcome before reading the reply). The window is
//! normally microseconds, but a client task that yields (tokio's cooperative budget, a busy
//! runtime) while the broker answers over loopback loses the race, about once in several
//! hundred sends under load.
//!
//! The broker cannot repair a lost outcome (a settled disposition is the only one fe2o3's
//! acceptor sends in `rcv-settle-mode` first, and the client discards repeats), so it leaves
//! the client time to register the delivery: every accept goes out [`OUTCOME_DELAY`] after the
//! delivery arrived. The delay is applied by a per-link task, so a client that pipelines
//! transfers is not slowed down, and the message itself is stored at once.

use std::time::Duration;

use fe2o3_amqp::link::{delivery::DeliveryInfo, ReceiverDisposer};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::task::TaskTracker;

/// How long an outcome is held back after its delivery arrived.
pub(crate) const OUTCOME_DELAY: Duration = Duration::from_millis(2);

/// Accepts deliveries of one link after [`OUTCOME_DELAY`], in arrival order.
#[derive(Debug, Clone)]
pub(crate) struct DelayedAccept {
    tx: mpsc::UnboundedSender<(Instant, DeliveryInfo)>,
}

impl DelayedAccept {
    /// Starts the link's accept task; it ends when every handle is dropped and the queue is
    /// drained, or when the link is gone.
    pub(crate) fn spawn(disposer: ReceiverDisposer, tracker: &TaskTracker) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, DeliveryInfo)>();
        tracker.spawn(async move {
            while let Some((due, info)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                if disposer.accept(info).await.is_err() {
                    return;
                }
            }
        });
        Self { tx }
    }

    /// Queues the accept of a delivery that arrived `arrived`.
    pub(crate) fn accept(&self, info: DeliveryInfo, arrived: Instant) -> bool {
        self.tx.send((arrived + OUTCOME_DELAY, info)).is_ok()
    }
}
