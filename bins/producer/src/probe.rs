//! The broker probe: readiness follows Service Bus also while no event is being sent.

use std::sync::Arc;
use std::time::Duration;

use ordo_core::metrics as names;
use ordo_core::servicebus::sender::{PublishError, PublisherFactory};
use tokio_util::sync::CancellationToken;

use ordo_core::readiness::{dependency, Readiness};

/// Opens a publisher (connection, authentication, a sender link to the topic) every `every`,
/// so a broker that is unreachable, refuses the key or lacks the topic makes the producer not
/// ready even while no event is being sent. The attempt is bounded by `every` as well. Ends
/// when `cancel` fires.
pub(crate) async fn probe_broker<F: PublisherFactory>(
    factory: Arc<F>,
    readiness: Arc<Readiness>,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut fault = None;
    loop {
        let attempt = tokio::time::timeout(every, factory.probe());
        let Some(attempted) = cancel.run_until_cancelled(attempt).await else {
            return;
        };
        let opened = match attempted {
            Ok(r) => r,
            Err(_) => Err(PublishError::Timeout(every)),
        };
        match opened {
            Ok(()) => fault = None,
            Err(e) => {
                readiness.hold(&mut fault, dependency::SERVICEBUS);
                // Counted here rather than by a `Retry`: the probe runs every `every` whether
                // it failed or not (`/readyz` returns within that time), there is no backoff.
                ::metrics::counter!(names::RETRIES, "operation" => "probe_servicebus", "reason" => e.reason()).increment(1);
                tracing::warn!(error = %e, "Service Bus probe failed");
            }
        }
        if cancel
            .run_until_cancelled(tokio::time::sleep(every))
            .await
            .is_none()
        {
            return;
        }
    }
}
