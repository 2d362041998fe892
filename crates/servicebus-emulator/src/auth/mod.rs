//! Authorization as Service Bus does it: named keys with rights (the namespace's authorization
//! rules), CBS put-token verifying a token against them, and the check that a link's
//! connection holds an unexpired token with the right for the link's entity.
//!
//! - `keys`: the authorization rules, their primary and secondary keys, rotation.
//! - `sas`: verifying a shared access signature (put-token with a SAS token).
//! - `jwt`: verifying a JWT from the issuer trusted in place of Microsoft Entra ID.
//! - this file: rights, grants, and what one connection may do ([`ConnAuth`]).
//!
//! Each refusal's description is followed by what was wrong (the key name, the audiences),
//! which the service does not say but a developer at the emulator wants to know.
//!
//! A link is refused with `amqp:unauthorized-access` and "Unauthorized access. 'Send' claim(s)
//! are required to perform this operation. Resource: '…'." (Azure/azure-sdk-for-java#27831,
//! Azure/azure-service-bus#258) unless a token for its entity carries the right: Send for senders
//! to a topic or queue, Listen for receivers and for `$management` of a queue or subscription,
//! Send for a topic's `$management`; Manage implies both.
//!
//! A link keeps running only while a token covers it. When the last such token expires and no
//! new one was put, Service Bus detaches the link with `amqp:link:detach-forced` and "The link
//! '…' is force detached. Code: RenewToken. Details: Unauthorized access. 'Listen' claim(s) are
//! required to perform this operation. Resource: '…'.." (Azure/azure-sdk-for-go#16394,
//! Azure/azure-sdk-for-python#23487, dapr/components-contrib#809); [`ConnAuth::lapsed`] is
//! that watch. The check is against the token, not the key: a key removed after the token was
//! put leaves the token valid until it expires, as on Service Bus
//! (Azure/azure-service-bus-dotnet#357), and the renewal after that is refused.

mod jwt;
mod keys;
mod sas;
#[cfg(test)]
mod tests;

use std::sync::Mutex;

use tokio::sync::Notify;

use crate::config::AccessRight;

pub(crate) use jwt::{verify_jwt, Issuer};
pub(crate) use keys::{new_key, KeyType, Keys, RuleKeys};
pub(crate) use sas::{verify, SAS_PREFIX};

/// The rights of one token or key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Rights {
    send: bool,
    listen: bool,
    /// Manage: Send and Listen, and the rule's keys (listed and regenerated over HTTP).
    manage: bool,
}

impl Rights {
    pub(crate) const ALL: Rights = Rights {
        send: true,
        listen: true,
        manage: true,
    };

    fn of(rights: &[AccessRight]) -> Self {
        let mut out = Rights::default();
        for right in rights {
            match right {
                AccessRight::Send => out.send = true,
                AccessRight::Listen => out.listen = true,
                AccessRight::Manage => out = Rights::ALL,
            }
        }
        out
    }

    fn has(self, right: Need) -> bool {
        match right {
            Need::Send => self.send,
            Need::Listen => self.listen,
        }
    }

    /// Whether these rights include Manage.
    pub(crate) fn manage(self) -> bool {
        self.manage
    }
}

/// The right a link needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    Send,
    Listen,
}

impl Need {
    fn claim(self) -> &'static str {
        match self {
            Need::Send => "Send",
            Need::Listen => "Listen",
        }
    }
}

/// A verified token: the rights it carries on `resource` (a lowercased path, `""` for the whole
/// namespace) until `expires_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    resource: String,
    rights: Rights,
    expires_ms: i64,
}

impl Grant {
    /// The same grant expiring no later than `latest_ms`.
    pub(crate) fn expiring_by(mut self, latest_ms: i64) -> Self {
        self.expires_ms = self.expires_ms.min(latest_ms);
        self
    }
}

/// Why put-token answered 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Denied(pub String);

/// Rejects a token whose expiry `expires_s` (Unix seconds) is not after `now_ms`; otherwise
/// the expiry in milliseconds.
fn unexpired(expires_s: i64, now_ms: i64) -> Result<i64, Denied> {
    let expires_ms = expires_s.saturating_mul(1000);
    if expires_ms <= now_ms {
        return Err(Denied(format!(
            "ExpiredToken: The token is expired. Expiration time: '{}'",
            time_text(expires_s)
        )));
    }
    Ok(expires_ms)
}

fn time_text(unix_s: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_s.max(0) as u64),
    )
    .to_string()
}

/// Whether a grant on `resource` covers `path`: the same entity or one under it.
fn covers(resource: &str, path: &str) -> bool {
    resource.is_empty()
        || path == resource
        || (path.starts_with(resource) && path.as_bytes().get(resource.len()) == Some(&b'/'))
}

/// Link paths as the grants see them: lowercased, host and slashes stripped.
pub(crate) fn link_path(address: &str) -> String {
    let trimmed = crate::namespace::strip_host(address);
    trimmed.trim_matches('/').to_ascii_lowercase()
}

/// The condition and description Service Bus detaches a link with when the token it depended
/// on expired.
pub(crate) fn renew_token_error(link: &str, why: &Unauthorized) -> (&'static str, String) {
    (
        "amqp:link:detach-forced",
        format!(
            "The link '{link}' is force detached. Code: RenewToken. Details: {}.",
            why.0
        ),
    )
}

/// What one connection is authorized for: tokens put on its `$cbs`, or a SASL PLAIN login.
#[derive(Debug, Default)]
pub(crate) struct ConnAuth {
    grants: Mutex<Vec<Grant>>,
    login: Mutex<Option<Rights>>,
    /// Woken when a token is put, so links waiting on an expiry look again.
    pub(crate) renewed: Notify,
}

/// Why a link may not (or no longer) run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unauthorized(pub String);

impl ConnAuth {
    pub(crate) fn login(&self, rights: Rights) {
        *self.login.lock().unwrap_or_else(|e| e.into_inner()) = Some(rights);
    }

    /// Keeps a verified token; one for the same resource replaces the older one.
    pub(crate) fn put(&self, grant: Grant) {
        let mut grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        grants.retain(|g| g.resource != grant.resource);
        grants.push(grant);
        drop(grants);
        self.renewed.notify_waiters();
    }

    /// Resolves once `path` is no longer authorized for `need`: the tokens covering it expired
    /// and none was put in time. Never resolves under a SASL PLAIN login, which does not expire.
    pub(crate) async fn lapsed(&self, path: &str, need: Need) -> Unauthorized {
        loop {
            let renewed = self.renewed.notified();
            tokio::pin!(renewed);
            renewed.as_mut().enable();
            let now = crate::clock::now_ms();
            match self.authorized_until(path, need, now) {
                Err(lapsed) => return lapsed,
                Ok(i64::MAX) => std::future::pending::<()>().await,
                Ok(until) => {
                    // A renewal may shorten the grant as well as lengthen it, so it is looked at
                    // as soon as it is put rather than at the old expiry.
                    let left = std::time::Duration::from_millis((until - now).max(0) as u64);
                    tokio::select! {
                        _ = tokio::time::sleep(left) => {}
                        _ = &mut renewed => {}
                    }
                }
            }
        }
    }

    /// Until when the connection may use `path` with `need` (`i64::MAX` after a SASL login).
    pub(crate) fn authorized_until(
        &self,
        path: &str,
        need: Need,
        now_ms: i64,
    ) -> Result<i64, Unauthorized> {
        if self
            .login
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|r| r.has(need))
        {
            return Ok(i64::MAX);
        }
        self.grants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|g| g.expires_ms > now_ms && g.rights.has(need) && covers(&g.resource, path))
            .map(|g| g.expires_ms)
            .max()
            .ok_or_else(|| {
                Unauthorized(format!(
                    "Unauthorized access. '{}' claim(s) are required to perform this operation. \
                     Resource: '{path}'.",
                    need.claim()
                ))
            })
    }
}
