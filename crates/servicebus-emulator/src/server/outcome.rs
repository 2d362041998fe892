//! Outcomes (dispositions) of the deliveries clients send us, in arrival order, after
//! [`OUTCOME_DELAY`] (none now).
//!
//! fe2o3-amqp 0.14 as published, the AMQP stack of azservicebus, registers a delivery in its
//! link's unsettled map only *after* the transfer has been handed to its session task
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
//! acceptor sends in `rcv-settle-mode` first, and the client discards repeats). The emulator
//! used to leave the client 2 ms to register the delivery; Service Bus leaves none, and with
//! no delay the race was lost within the first few dozen sends. The vendored client registers
//! first now (vendor/README.md), so the delay is zero, and every accept goes out
//! [`OUTCOME_DELAY`] after the delivery arrived. The delay is applied by a per-link task, so a client that pipelines
//! transfers is not slowed down, and the message itself is stored at once.

use std::time::Duration;

use fe2o3_amqp::link::{delivery::DeliveryInfo, ReceiverDisposer};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::task::TaskTracker;

/// How long an outcome is held back after its delivery arrived: not at all, as Service Bus
/// does. The vendored fe2o3-amqp 0.14 registers a delivery before writing its transfer
/// (vendor/README.md), so azservicebus no longer needs the 2 ms this used to be, and a client
/// that still loses the race fails here as it would against Azure. Test:
/// `crates/core/tests/connection.rs::an_outcome_that_arrives_at_once_is_never_lost`.
pub(crate) const OUTCOME_DELAY: Duration = Duration::ZERO;

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
