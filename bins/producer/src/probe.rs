//! The broker probe: readiness follows Service Bus also while no event is being sent.

use std::sync::Arc;
use std::time::Duration;

use ordo_core::metrics as names;
use ordo_core::servicebus::sender::{PublishError, PublisherFactory};

use ordo_core::readiness::{dependency, Readiness};

/// Opens a publisher (connection, authentication, a sender link to the topic) every `every`,
/// so a broker that is unreachable, refuses the key or lacks the topic makes the producer not
/// ready even while no event is being sent. The attempt is bounded by `every` as well.
pub(crate) async fn probe_broker<F: PublisherFactory>(
    factory: Arc<F>,
    readiness: Arc<Readiness>,
    every: Duration,
) {
    let mut fault = None;
    loop {
        let opened = match tokio::time::timeout(every, factory.probe()).await {
            Ok(r) => r,
            Err(_) => Err(PublishError::Timeout(every)),
        };
        match opened {
            Ok(()) => fault = None,
            Err(e) => {
                readiness.hold(&mut fault, dependency::SERVICEBUS);
                ::metrics::counter!(names::RETRIES, "operation" => "probe_servicebus", "reason" => e.reason()).increment(1);
                tracing::warn!(error = %e, "Service Bus probe failed");
            }
        }
        tokio::time::sleep(every).await;
    }
}
