//! Keeping the stream's lease while active: renewed every ttl/3, each renewal bounded by the
//! time the lease has left, so a hung database connection cannot keep this producer publishing
//! past its lease while a standby takes over.

use std::sync::Arc;
use std::time::Duration;

use crate::standby::lease_reason;
use ordo_core::lease::{Lease, LeaseError, LeaseStore};
use ordo_core::retry::{Backoff, Retry};
use tokio_util::sync::CancellationToken;

use ordo_core::readiness::{dependency, Fault, Readiness};

/// Renews one term's lease.
#[derive(Debug)]
pub struct LeaseKeeper {
    /// The store.
    pub leases: LeaseStore,
    /// The lease as last renewed.
    pub lease: Lease,
    /// Retry delays.
    pub backoff: Backoff,
    /// Readiness.
    pub readiness: Arc<Readiness>,
    /// Cancelled when the lease is lost: stop reading and abandon sends at once.
    pub on_lost: Vec<CancellationToken>,
}

/// How the lease keeper's task ended.
#[derive(Debug)]
pub enum LeaseEnd {
    /// Asked to stop; the lease is still ours (to release).
    Stopped(Lease),
    /// Taken over: the database answered that another holder has it.
    Lost,
    /// Ran out before a renewal answered. The database fault held since the first failed
    /// renewal comes with it, so readiness stays off across the end of the term until the
    /// database answers again (see `Producer::acquire`).
    Expired(Fault),
}

impl LeaseKeeper {
    /// Renews until `stop` fires or the lease is lost; a malformed lease document ends it with
    /// that error.
    pub async fn run(mut self, stop: CancellationToken) -> Result<LeaseEnd, LeaseError> {
        let every = self.lease.ttl / 3;
        let mut retry = Retry::new("renew_lease", self.backoff);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return Ok(LeaseEnd::Stopped(self.lease)),
            }
            let mut fault = None;
            loop {
                // Bounded by what is left of the lease (at least a little, to get an answer
                // about a lease that just ran out): waiting longer cannot keep it.
                let bound = self.lease.remaining().max(Duration::from_millis(100));
                let renewed = tokio::select! {
                    r = tokio::time::timeout(bound, self.leases.renew(&self.lease)) => r,
                    _ = stop.cancelled() => return Ok(LeaseEnd::Stopped(self.lease)),
                };
                let (reason, error) = match renewed {
                    Ok(Ok(l)) => {
                        self.lease = l;
                        retry.reset();
                        break;
                    }
                    Ok(Err(LeaseError::Lost { .. })) => {
                        self.abandon();
                        return Ok(LeaseEnd::Lost);
                    }
                    Ok(Err(e)) if e.is_retryable() => (lease_reason(&e), e.to_string()),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => (
                        "database",
                        format!("renewal did not answer within {bound:?}"),
                    ),
                };
                // Held before the expiry check: a renewal that hangs until the lease is gone
                // fails only once, and its fault is what the term hands to the standby loop.
                self.readiness.hold(&mut fault, dependency::MONGODB);
                if self.lease.is_expired() {
                    tracing::error!(error, "lease expired before it could be renewed: stopping");
                    self.abandon();
                    let held = fault
                        .take()
                        .unwrap_or_else(|| self.readiness.fault(dependency::MONGODB));
                    return Ok(LeaseEnd::Expired(held));
                }
                let d = retry.next(reason, &error).min(self.lease.remaining());
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = stop.cancelled() => return Ok(LeaseEnd::Stopped(self.lease)),
                }
            }
        }
    }

    fn abandon(&self) {
        for t in &self.on_lost {
            t.cancel();
        }
    }
}
