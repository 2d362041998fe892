//! [`ReceiveError`]: what a failed connect, accept or session operation means to the worker,
//! told by the client error's type and AMQP condition rather than its text where the client
//! keeps them.

use super::Accepted;

/// The AMQP condition Service Bus refuses a next-available-session accept with when no
/// session became available within its server timeout.
pub const CONDITION_TIMEOUT: &str = "com.microsoft:timeout";

/// Why a receiver operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The session lock (or a message lock) was lost: another worker may own the session now,
    /// so nothing received under it may be settled any more.
    #[error("session lock lost: {0}")]
    LockLost(String),
    /// The broker refused the link with an AMQP condition (missing entity, no sessions,
    /// access refused, ...).
    #[error("service bus refused the link ({condition}): {description}")]
    Refused {
        /// The AMQP error condition, e.g. `amqp:not-found`.
        condition: String,
        /// The broker's description.
        description: String,
    },
    /// The claims-based authorization of the link failed (a wrong or revoked key).
    #[error("service bus authorization failed: {0}")]
    Unauthorized(String),
    /// The connection or the broker failed; the session is unusable but nothing is known lost.
    #[error("service bus: {0}")]
    Broker(String),
}

impl ReceiveError {
    /// Whether this is a lock loss (counted in `ordo_locks_lost_total`).
    pub fn is_lock_lost(&self) -> bool {
        matches!(self, ReceiveError::LockLost(_))
    }

    /// A short, bounded label for the `reason` of `ordo_retries_total`.
    pub fn reason(&self) -> String {
        match self {
            ReceiveError::LockLost(_) => "lock_lost".into(),
            ReceiveError::Refused { condition, .. } => condition.clone(),
            ReceiveError::Unauthorized(_) => "unauthorized".into(),
            ReceiveError::Broker(_) => "broker".into(),
        }
    }

    /// Classifies a failed connect or accept by the error's type and AMQP condition: what the
    /// accept gave when the broker answered, or the fault.
    pub(super) fn of_accept<S>(e: azure_core::Error) -> Result<Accepted<S>, Self> {
        use fe2o3_amqp_client::link::ReceiverAttachError;
        match e.downcast_ref::<ReceiverAttachError>() {
            Some(ReceiverAttachError::RemoteClosedWithError(err)) => {
                let condition = condition_text(&err.condition);
                if condition == CONDITION_TIMEOUT {
                    return Ok(Accepted::Idle);
                }
                return Err(ReceiveError::Refused {
                    condition,
                    description: err.description.clone().unwrap_or_default(),
                });
            }
            Some(ReceiverAttachError::IncomingSourceIsNone) => return Ok(Accepted::Unclear),
            _ => {}
        }
        // The only request-response calls of a connect or accept are CBS put-token calls: a
        // status error there is the broker refusing the credentials.
        if let Some(fe2o3_amqp_management::error::Error::Status(status)) =
            e.downcast_ref::<fe2o3_amqp_management::error::Error>()
        {
            return Err(ReceiveError::Unauthorized(status.to_string()));
        }
        Err(ReceiveError::Broker(e.to_string()))
    }

    /// A failed connect or attach outside an accept: every answer but success is a fault.
    pub(super) fn of_fault(e: azure_core::Error) -> Self {
        match Self::of_accept::<()>(e) {
            Err(e) => e,
            Ok(_) => ReceiveError::Broker("the broker refused the link without a reason".into()),
        }
    }

    pub(super) fn classify(e: azure_core::Error) -> Self {
        let text = format!("{e} {e:?}");
        let lower = text.to_ascii_lowercase();
        if lower.contains("lock") || lower.contains("410") || lower.contains("gone") {
            ReceiveError::LockLost(e.to_string())
        } else {
            ReceiveError::Broker(e.to_string())
        }
    }
}

/// The condition symbol as the broker sent it (`amqp:not-found`, `com.microsoft:timeout`).
fn condition_text(c: &fe2o3_amqp_types::definitions::ErrorCondition) -> String {
    use fe2o3_amqp_types::definitions::ErrorCondition;
    use fe2o3_amqp_types::primitives::Symbol;
    let symbol = match c {
        ErrorCondition::AmqpError(e) => Symbol::from(e),
        ErrorCondition::ConnectionError(e) => Symbol::from(e),
        ErrorCondition::SessionError(e) => Symbol::from(e),
        ErrorCondition::LinkError(e) => Symbol::from(e),
        ErrorCondition::Custom(s) => s.clone(),
        // Transaction conditions, when the client crate is built with transactions.
        #[allow(unreachable_patterns)]
        other => return format!("{other:?}"),
    };
    symbol.as_str().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::error::ErrorKind;
    use fe2o3_amqp_client::link::ReceiverAttachError;
    use fe2o3_amqp_types::definitions::{AmqpError, Error as AmqpErr, ErrorCondition};
    use fe2o3_amqp_types::primitives::Symbol;

    /// What azservicebus hands back when the broker refuses a session receiver's attach.
    fn refused(condition: ErrorCondition) -> azure_core::Error {
        let e = ReceiverAttachError::RemoteClosedWithError(AmqpErr::new(
            condition,
            Some("refused".to_string()),
            None,
        ));
        azure_core::Error::new(ErrorKind::Io, e)
    }

    fn classify(e: azure_core::Error) -> Result<Accepted<()>, ReceiveError> {
        ReceiveError::of_accept(e)
    }

    #[test]
    fn no_session_available_is_told_by_its_condition_not_its_text() {
        let idle = refused(ErrorCondition::Custom(Symbol::from(CONDITION_TIMEOUT)));
        assert!(matches!(classify(idle), Ok(Accepted::Idle)));
        // A connection that timed out says "timed out" but is a fault.
        let io = azure_core::Error::new(
            ErrorKind::Io,
            std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        );
        assert!(matches!(classify(io), Err(ReceiveError::Broker(_))));
    }

    #[test]
    fn refusals_carry_their_condition() {
        let missing = refused(ErrorCondition::AmqpError(AmqpError::NotFound));
        assert!(matches!(
            classify(missing),
            Err(ReceiveError::Refused { condition, .. }) if condition == "amqp:not-found"
        ));
        let sessionless = refused(ErrorCondition::AmqpError(AmqpError::NotAllowed));
        assert!(matches!(
            classify(sessionless).unwrap_err().reason().as_str(),
            "amqp:not-allowed"
        ));
        let unclear =
            azure_core::Error::new(ErrorKind::Io, ReceiverAttachError::IncomingSourceIsNone);
        assert!(matches!(classify(unclear), Ok(Accepted::Unclear)));
    }

    #[test]
    fn a_refused_token_is_unauthorized() {
        let status = fe2o3_amqp_management::error::Error::Status(
            fe2o3_amqp_management::error::StatusError {
                code: fe2o3_amqp_management::status::StatusCode(
                    std::num::NonZeroU16::new(401).unwrap(),
                ),
                description: Some("InvalidSignature".into()),
            },
        );
        let e = azure_core::Error::new(ErrorKind::Other, status);
        assert!(matches!(classify(e), Err(ReceiveError::Unauthorized(_))));
    }
}
