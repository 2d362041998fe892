//! Standby: polling the stream's lease until this producer holds it, and claiming the
//! checkpoint under the new epoch before the term starts.
//!
//! Readiness stays true meanwhile unless the database fails: `/readyz` means "able to work or
//! to stand by", so a two-replica Deployment becomes Available and rolling updates do not
//! stall on the standby (deploy/k8s/base/producer.yaml). Holding the lease is shown by the
//! `ordo_lease_held` gauge. The lease is not taken while Service Bus refuses this producer: it
//! would hold the lease and publish nothing, while a standby that can publish waits behind it.

use std::time::Duration;

use ordo_core::checkpoint::CheckpointError;
use ordo_core::lease::{Lease, LeaseError};
use ordo_core::readiness::{dependency, Fault};
use ordo_core::retry::Retry;
use tokio_util::sync::CancellationToken;

use crate::checkpointer;
use crate::{Producer, ProducerError};

/// What the standby loop keeps from one poll to the next.
struct Standby {
    /// How often the lease is polled while another producer holds it.
    poll: Duration,
    /// The database fault held since an attempt failed, or carried from the term before.
    fault: Option<Fault>,
    /// "Another producer holds the lease" was logged.
    announced: bool,
    /// "Service Bus refuses this producer" was logged.
    broker_announced: bool,
    /// Retries of the lease's acquisition.
    acquiring: Retry,
    /// Retries of the checkpoint's claim under a newly acquired lease.
    claiming: Retry,
}

/// One attempt at the lease.
enum Attempt {
    /// Another producer holds it.
    HeldElsewhere,
    /// Acquired; the claim of the checkpoint under its epoch came to this.
    Acquired(Lease, Result<(), CheckpointError>),
    /// The lease store failed.
    Failed(LeaseError),
}

/// What one poll of the lease came to.
enum Polled {
    /// The lease is ours and the checkpoint claimed under its epoch.
    Held(Lease),
    /// Poll again after this long.
    Wait(Duration),
}

impl Producer {
    /// Polls the lease until acquired; `None` on shutdown. `carried` is a database fault from
    /// the term before; the first answer of the database drops it, whatever the answer says
    /// about the lease.
    pub(crate) async fn acquire(
        &self,
        cancel: &CancellationToken,
        carried: Option<Fault>,
    ) -> Result<Option<Lease>, ProducerError> {
        let mut standby = Standby {
            poll: (self.cfg.producer.lease_ttl / 5).max(Duration::from_millis(100)),
            fault: carried,
            announced: false,
            broker_announced: false,
            acquiring: Retry::new("acquire_lease", self.backoff),
            claiming: Retry::new("claim_checkpoint", self.backoff),
        };
        loop {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            let wait = match self.poll_lease(&mut standby).await? {
                Polled::Held(lease) => return Ok(Some(lease)),
                Polled::Wait(wait) => wait,
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return Ok(None),
            }
        }
    }

    /// One poll: unless the broker refuses this producer, tries to take the lease and claim
    /// the checkpoint, within a third of the lease's lifetime.
    async fn poll_lease(&self, s: &mut Standby) -> Result<Polled, ProducerError> {
        if self.readiness.failing().contains(&dependency::SERVICEBUS) {
            if !s.broker_announced {
                s.broker_announced = true;
                tracing::warn!(stream = %self.stream, holder = %self.holder, "standby: Service Bus refuses or does not answer this producer; not taking the lease until it does");
            }
            return Ok(Polled::Wait(s.poll));
        }
        s.broker_announced = false;
        // Bounded, so an unreachable database turns readiness off in about a third of the
        // lease rather than after the driver's server-selection timeout.
        let ttl = self.cfg.producer.lease_ttl;
        let bound = (ttl / 3).max(Duration::from_millis(500));
        let Ok(attempted) = tokio::time::timeout(bound, self.take_lease(ttl)).await else {
            self.readiness.hold(&mut s.fault, dependency::MONGODB);
            let e = format!("no answer within {bound:?}");
            return Ok(Polled::Wait(s.acquiring.next("database", &e)));
        };
        match attempted {
            Attempt::Acquired(lease, claimed) => self.claimed(s, claimed, lease),
            Attempt::HeldElsewhere => {
                s.fault = None;
                if !s.announced {
                    s.announced = true;
                    tracing::info!(stream = %self.stream, this_producer = %self.holder, "standby: another producer holds the lease");
                }
                Ok(Polled::Wait(s.poll))
            }
            Attempt::Failed(e) if e.is_retryable() => {
                self.readiness.hold(&mut s.fault, dependency::MONGODB);
                Ok(Polled::Wait(s.acquiring.next(lease_reason(&e), &e)))
            }
            Attempt::Failed(e) => Err(e.into()),
        }
    }

    /// Takes the lease if it is free or expired, and then claims the checkpoint under its
    /// epoch.
    async fn take_lease(&self, ttl: Duration) -> Attempt {
        match self
            .leases
            .try_acquire(&self.stream, &self.holder, ttl)
            .await
        {
            Ok(Some(lease)) => {
                let claimed = self.checkpoints.claim(&self.stream, lease.epoch).await;
                Attempt::Acquired(lease, claimed)
            }
            Ok(None) => Attempt::HeldElsewhere,
            Err(e) => Attempt::Failed(e),
        }
    }

    /// What the claim of the checkpoint under a new lease means: held, fenced by a newer
    /// producer (poll on), or a database fault (retry).
    fn claimed(
        &self,
        s: &mut Standby,
        claimed: Result<(), CheckpointError>,
        lease: Lease,
    ) -> Result<Polled, ProducerError> {
        match claimed {
            Ok(()) => Ok(Polled::Held(lease)),
            Err(CheckpointError::Fenced { .. }) => {
                s.fault = None;
                Ok(Polled::Wait(s.poll))
            }
            Err(e) if e.is_retryable() => {
                self.readiness.hold(&mut s.fault, dependency::MONGODB);
                Ok(Polled::Wait(s.claiming.next(checkpointer::reason(&e), &e)))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// The `reason` of a lease operation's retry.
pub(crate) fn lease_reason(e: &LeaseError) -> &'static str {
    match e {
        LeaseError::Mongo(e) => ordo_core::mongo::error_reason(e),
        LeaseError::Lost { .. } | LeaseError::Malformed { .. } => "refused",
    }
}
