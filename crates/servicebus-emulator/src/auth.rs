//! Authorization as Service Bus does it with shared access signatures: named keys with rights
//! (the namespace's authorization rules), CBS put-token verifying a SAS token against them, and
//! the check that a link's connection holds an unexpired token with the right for the link's
//! entity.
//!
//! A SAS token is `SharedAccessSignature sr=URI&sig=SIG&se=EXPIRY&skn=KEYNAME`, where `sig` is
//! base64(HMAC-SHA256(key, sr + "\n" + se)) over `sr` exactly as it appears in the token (the
//! URL-encoded resource URI), and `se` is Unix seconds ("Service Bus access control with Shared
//! Access Signatures", learn.microsoft.com). The token grants the key's rights on the resource
//! `sr` names and everything under it. Put-token answers 401 with the texts the service uses:
//!
//! | failure | status description | source |
//! |---|---|---|
//! | unknown key name, bad signature, malformed | `InvalidSignature: The token has an invalid signature.` | sandrinodimattia/RedDog#4 |
//! | `sr` does not cover the put-token `name` | `InvalidAudience: The authorization header contains a token with a wrong audience.` | Azure/azure-sdk-for-net#27644 |
//! | `se` in the past | `ExpiredToken: The token is expired. Expiration time: '…'` | Azure/azure-service-bus-java#354 |
//!
//! A JWT (`type = "jwt"`, Microsoft Entra ID) is taken from the one issuer `[namespace.entra]`
//! names, in place of Entra: ES256-signed (Entra signs RS256; a test issuer's P-256 key keeps
//! the emulator free of an RSA implementation), `aud` the Service Bus resource
//! `https://servicebus.azure.net`, unexpired. It grants the rights of the roles assigned to its
//! `oid` on the whole namespace. Refusals: an unknown issuer "InvalidIssuer: Token issuer is
//! invalid.", a wrong audience "InvalidAudience: Invalid authorization token audience."
//! (Azure/azure-sdk-for-js#26360, MicrosoftDocs/azure-docs#19707), a bad signature, expired or
//! malformed token as for SAS.
//!
//! Each description is followed by what was wrong (the key name, the audiences), which the
//! service does not say but a developer at the emulator wants to know.
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

use std::sync::Mutex;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Notify;

use crate::config::{AccessRight, AuthorizationRule};

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

/// A rule's keys: the primary, then the secondary when it has one.
fn keys_of(rule: &AuthorizationRule) -> Vec<String> {
    std::iter::once(rule.key.clone())
        .chain(rule.secondary_key.clone())
        .collect()
}

/// The namespace's keys, by name.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    /// Name, its keys (primary, then secondary), rights.
    rules: Vec<(String, Vec<String>, Rights)>,
}

impl Keys {
    pub(crate) fn new(rules: &[AuthorizationRule]) -> Self {
        Self {
            rules: rules
                .iter()
                .map(|r| (r.name.clone(), keys_of(r), Rights::of(&r.rights)))
                .collect(),
        }
    }

    /// Adds a key, or replaces the one with the same name (a key rotation).
    pub(crate) fn put(&mut self, rule: &AuthorizationRule) {
        let entry = (rule.name.clone(), keys_of(rule), Rights::of(&rule.rights));
        match self.rules.iter_mut().find(|(n, _, _)| *n == rule.name) {
            Some(existing) => *existing = entry,
            None => self.rules.push(entry),
        }
    }

    /// Removes the key named `name`; whether there was one.
    pub(crate) fn remove(&mut self, name: &str) -> bool {
        let before = self.rules.len();
        self.rules.retain(|(n, _, _)| n != name);
        self.rules.len() != before
    }

    /// The keys of the rule named `name`, as `keys list` shows them.
    pub(crate) fn list(&self, name: &str) -> Option<RuleKeys> {
        self.get(name).map(|(keys, _)| RuleKeys::of(name, keys))
    }

    /// Replaces one key of the rule named `name` with `value` (Azure's `regenerateKeys`); the
    /// other key stays valid. A rule given only a primary key gains a secondary.
    pub(crate) fn regenerate(
        &mut self,
        name: &str,
        which: KeyType,
        value: String,
    ) -> Option<RuleKeys> {
        let (_, keys, _) = self.rules.iter_mut().find(|(n, _, _)| n == name)?;
        match (which, keys.len()) {
            (KeyType::PrimaryKey, _) => keys[0] = value,
            (KeyType::SecondaryKey, 1) => keys.push(value),
            (KeyType::SecondaryKey, _) => keys[1] = value,
        }
        Some(RuleKeys::of(name, keys))
    }

    fn get(&self, name: &str) -> Option<(&[String], Rights)> {
        self.rules
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, keys, rights)| (keys.as_slice(), *rights))
    }

    /// SASL PLAIN: a key name and key that match a rule authorize the whole connection.
    pub(crate) fn check_plain(&self, name: &[u8], key: &[u8]) -> Option<Rights> {
        self.rules
            .iter()
            .find(|(n, keys, _)| n.as_bytes() == name && keys.iter().any(|k| k.as_bytes() == key))
            .map(|(_, _, rights)| *rights)
    }
}

/// One of the two keys of a rule, as Azure's `regenerateKeys` names it (`keyType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub(crate) enum KeyType {
    PrimaryKey,
    SecondaryKey,
}

/// A rule's keys as Azure's `listKeys` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuleKeys {
    pub name: String,
    pub primary: String,
    pub secondary: Option<String>,
}

impl RuleKeys {
    fn of(name: &str, keys: &[String]) -> Self {
        Self {
            name: name.to_owned(),
            primary: keys[0].clone(),
            secondary: keys.get(1).cloned(),
        }
    }
}

/// A new key as Service Bus makes one: 256 random bits, base64.
pub(crate) fn new_key() -> String {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random source failed");
    base64::engine::general_purpose::STANDARD.encode(bytes)
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

const INVALID_SIGNATURE: &str = "InvalidSignature: The token has an invalid signature.";
const INVALID_AUDIENCE: &str =
    "InvalidAudience: The authorization header contains a token with a wrong audience.";

/// Host and path of a URI (scheme dropped), lowercased, without trailing slashes.
fn split_uri(uri: &str) -> (String, String) {
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    (
        host.to_ascii_lowercase(),
        path.trim_matches('/').to_ascii_lowercase(),
    )
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

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// How every SAS token starts.
pub(crate) const SAS_PREFIX: &str = "SharedAccessSignature ";

/// Verifies a put-token request: `token` for audience `name` at `now_ms`.
pub(crate) fn verify(token: &str, name: &str, keys: &Keys, now_ms: i64) -> Result<Grant, Denied> {
    let malformed = |what: &str| Denied(format!("{INVALID_SIGNATURE} ({what})"));
    let fields = token
        .strip_prefix(SAS_PREFIX)
        .ok_or_else(|| malformed("the token does not start with 'SharedAccessSignature '"))?;
    let field = |key: &str| {
        fields
            .split('&')
            .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
    };
    let (Some(sr), Some(sig), Some(se), Some(skn)) =
        (field("sr"), field("sig"), field("se"), field("skn"))
    else {
        return Err(malformed("sr, sig, se and skn are all required"));
    };
    let Some((rule_keys, rights)) = keys.get(skn) else {
        return Err(Denied(format!(
            "{INVALID_SIGNATURE} (no authorization rule is named {skn:?})"
        )));
    };
    let signature = percent_decode(sig)
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .ok_or_else(|| malformed("sig is not URL-encoded base64"))?;
    // Either key of the rule signs (Azure: primary and secondary).
    let signed = rule_keys.iter().any(|key| {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any length");
        mac.update(format!("{sr}\n{se}").as_bytes());
        mac.verify_slice(&signature).is_ok()
    });
    if !signed {
        return Err(Denied(format!(
            "{INVALID_SIGNATURE} (the signature does not match key {skn:?})"
        )));
    }
    let expires_s: i64 = se
        .parse()
        .map_err(|_| malformed(&format!("se {se:?} is not Unix seconds")))?;
    if expires_s.saturating_mul(1000) <= now_ms {
        return Err(Denied(format!(
            "ExpiredToken: The token is expired. Expiration time: '{}'",
            time_text(expires_s)
        )));
    }
    let resource_uri = percent_decode(sr).ok_or_else(|| malformed("sr is not URL-encoded"))?;
    let (token_host, resource) = split_uri(&resource_uri);
    let (audience_host, audience) = split_uri(name);
    if token_host != audience_host || !covers(&resource, &audience) {
        return Err(Denied(format!(
            "{INVALID_AUDIENCE} (token for {resource_uri:?}, audience {name:?})"
        )));
    }
    Ok(Grant {
        resource: audience,
        rights,
        expires_ms: expires_s.saturating_mul(1000),
    })
}

/// The token issuer trusted in place of Microsoft Entra ID.
#[derive(Debug)]
pub(crate) struct Issuer {
    issuer: String,
    /// The uncompressed P-256 point the issuer's signatures verify against.
    point: Vec<u8>,
    roles: Vec<(String, Rights)>,
}

const SERVICE_BUS_AUDIENCE: &str = "https://servicebus.azure.net";

impl Issuer {
    /// Reads the issuer's public key; the error says what is wrong with the file.
    pub(crate) fn load(config: &crate::config::EntraConfig) -> Result<Self, String> {
        use rustls::pki_types::{pem::PemObject, SubjectPublicKeyInfoDer};
        let spki = SubjectPublicKeyInfoDer::from_pem_file(&config.public_key)
            .map_err(|e| format!("not a PEM public key: {e}"))?;
        // A P-256 SubjectPublicKeyInfo is a fixed 26-byte prefix (algorithm and curve OIDs,
        // BIT STRING header) followed by the 65-byte uncompressed point.
        const P256_SPKI_PREFIX: [u8; 26] = [
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        let der: &[u8] = spki.as_ref();
        let point = der
            .strip_prefix(&P256_SPKI_PREFIX[..])
            .filter(|p| p.len() == 65 && p[0] == 0x04)
            .ok_or("not a P-256 (ES256) public key")?;
        Ok(Self {
            issuer: config.issuer.clone(),
            point: point.to_vec(),
            roles: config
                .role_assignments
                .iter()
                .map(|a| {
                    let rights = match a.role {
                        crate::config::DataRole::Sender => Rights::of(&[AccessRight::Send]),
                        crate::config::DataRole::Receiver => Rights::of(&[AccessRight::Listen]),
                        crate::config::DataRole::Owner => Rights::ALL,
                    };
                    (a.principal_id.clone(), rights)
                })
                .collect(),
        })
    }

    fn rights_of(&self, principal: &str) -> Rights {
        self.roles
            .iter()
            .filter(|(p, _)| p == principal)
            .fold(Rights::default(), |acc, (_, r)| Rights {
                send: acc.send || r.send,
                listen: acc.listen || r.listen,
                manage: acc.manage || r.manage,
            })
    }
}

/// Verifies a put-token request with a JWT at `now_ms` against the trusted issuer.
pub(crate) fn verify_jwt(
    token: &str,
    issuer: Option<&Issuer>,
    now_ms: i64,
) -> Result<Grant, Denied> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let malformed = |what: &str| Denied(format!("{INVALID_SIGNATURE} ({what})"));
    let mut parts = token.split('.');
    let (Some(header_b64), Some(claims_b64), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("a JWT has three dot-separated parts"));
    };
    let json = |part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    };
    let (Some(header_json), Some(claims)) = (json(header_b64), json(claims_b64)) else {
        return Err(malformed("header and claims must be base64url JSON"));
    };
    let text =
        |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    let iss = text(&claims, "iss").unwrap_or_default();
    let Some(issuer) = issuer.filter(|i| i.issuer == iss) else {
        return Err(Denied(format!(
            "InvalidIssuer: Token issuer is invalid. (issuer {iss:?} is not trusted)"
        )));
    };
    if text(&header_json, "alg").as_deref() != Some("ES256") {
        return Err(malformed("the trusted issuer signs with ES256"));
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| malformed("the signature is not base64url"))?;
    let signed = format!("{header_b64}.{claims_b64}");
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_FIXED,
        &issuer.point,
    )
    .verify(signed.as_bytes(), &signature)
    .map_err(|_| {
        Denied(format!(
            "{INVALID_SIGNATURE} (not signed by issuer {iss:?})"
        ))
    })?;
    let audience = text(&claims, "aud").unwrap_or_default();
    if audience.trim_end_matches('/') != SERVICE_BUS_AUDIENCE {
        return Err(Denied(format!(
            "InvalidAudience: Invalid authorization token audience. (aud {audience:?}, expected {SERVICE_BUS_AUDIENCE:?})"
        )));
    }
    let expires_s = claims
        .get("exp")
        .and_then(|v| v.as_i64())
        .ok_or_else(|| malformed("exp is required"))?;
    if expires_s.saturating_mul(1000) <= now_ms {
        return Err(Denied(format!(
            "ExpiredToken: The token is expired. Expiration time: '{}'",
            time_text(expires_s)
        )));
    }
    if let Some(nbf) = claims.get("nbf").and_then(|v| v.as_i64()) {
        if nbf.saturating_mul(1000) > now_ms {
            return Err(malformed("nbf is in the future"));
        }
    }
    let principal = text(&claims, "oid").unwrap_or_default();
    Ok(Grant {
        resource: String::new(),
        rights: issuer.rights_of(&principal),
        expires_ms: expires_s.saturating_mul(1000),
    })
}

fn time_text(unix_s: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_s.max(0) as u64),
    )
    .to_string()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new(&[
            AuthorizationRule {
                name: "root".into(),
                key: "secret".into(),
                secondary_key: None,
                rights: vec![AccessRight::Manage],
            },
            AuthorizationRule {
                name: "sender".into(),
                key: "s-key".into(),
                secondary_key: Some("s-key-2".into()),
                rights: vec![AccessRight::Send],
            },
        ])
    }

    /// A token the way the SDKs make one.
    fn token(sr: &str, key_name: &str, key: &str, expires_s: i64) -> String {
        let encoded: String = sr
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
        mac.update(format!("{encoded}\n{expires_s}").as_bytes());
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let sig: String = sig
            .bytes()
            .map(|b| match b {
                b'+' | b'/' | b'=' => format!("%{b:02X}"),
                _ => (b as char).to_string(),
            })
            .collect();
        format!("SharedAccessSignature sr={encoded}&sig={sig}&se={expires_s}&skn={key_name}")
    }

    const NOW: i64 = 1_700_000_000_000;
    const LATER: i64 = 1_700_000_600;

    #[test]
    fn either_key_of_a_rule_signs_and_a_replaced_key_does_not() {
        for key in ["s-key", "s-key-2"] {
            let t = token("amqp://h/topic", "sender", key, NOW / 1000 + 60);
            assert!(verify(&t, "amqp://h/topic", &keys(), NOW).is_ok(), "{key}");
            assert!(keys().check_plain(b"sender", key.as_bytes()).is_some());
        }
        // The secondary regenerated (a rotation step): tokens signed with the old one fail.
        let mut rotated = keys();
        rotated.put(&AuthorizationRule {
            name: "sender".into(),
            key: "s-key".into(),
            secondary_key: Some("s-key-3".into()),
            rights: vec![AccessRight::Send],
        });
        let old = token("amqp://h/topic", "sender", "s-key-2", NOW / 1000 + 60);
        let refused = verify(&old, "amqp://h/topic", &rotated, NOW).unwrap_err();
        assert!(refused.0.contains("InvalidSignature"), "{}", refused.0);
        let new = token("amqp://h/topic", "sender", "s-key-3", NOW / 1000 + 60);
        assert!(verify(&new, "amqp://h/topic", &rotated, NOW).is_ok());
    }

    #[test]
    fn a_valid_token_grants_its_keys_rights_on_its_audience() {
        let t = token("amqps://h/topic", "sender", "s-key", LATER);
        let grant = verify(&t, "amqp://h/topic", &keys(), NOW).unwrap();
        let auth = ConnAuth::default();
        auth.put(grant);
        assert_eq!(
            auth.authorized_until("topic", Need::Send, NOW),
            Ok(LATER * 1000)
        );
        let denied = auth
            .authorized_until("topic", Need::Listen, NOW)
            .unwrap_err();
        assert!(
            denied.0.contains("'Listen' claim(s) are required"),
            "{denied:?}"
        );
        assert!(auth.authorized_until("other", Need::Send, NOW).is_err());
        assert!(auth
            .authorized_until("topic", Need::Send, LATER * 1000)
            .is_err());
    }

    #[test]
    fn a_namespace_token_covers_every_entity_and_manage_covers_listen() {
        let t = token("sb://h/", "root", "secret", LATER);
        let auth = ConnAuth::default();
        auth.put(verify(&t, "sb://h/topic/subscriptions/sub", &keys(), NOW).unwrap());
        assert!(auth
            .authorized_until("topic/subscriptions/sub/$management", Need::Listen, NOW)
            .is_ok());
    }

    #[test]
    fn put_token_refusals_say_what_azure_says() {
        let k = keys();
        let cases = [
            (
                token("sb://h/t", "nobody", "secret", LATER),
                "sb://h/t",
                INVALID_SIGNATURE,
            ),
            (
                token("sb://h/t", "root", "wrong", LATER),
                "sb://h/t",
                INVALID_SIGNATURE,
            ),
            (
                token("sb://h/t", "root", "secret", LATER),
                "sb://h/other",
                INVALID_AUDIENCE,
            ),
            (
                token("sb://x/t", "root", "secret", LATER),
                "sb://h/t",
                INVALID_AUDIENCE,
            ),
            (
                token("sb://h/t", "root", "secret", NOW / 1000 - 1),
                "sb://h/t",
                "ExpiredToken: The token is expired.",
            ),
            ("garbage".to_owned(), "sb://h/t", INVALID_SIGNATURE),
        ];
        for (t, audience, text) in cases {
            let Denied(description) = verify(&t, audience, &k, NOW).unwrap_err();
            assert!(description.starts_with(text), "{description}");
        }
    }

    #[test]
    fn a_token_for_an_entity_does_not_cover_a_longer_name() {
        assert!(covers("topic", "topic/subscriptions/a"));
        assert!(!covers("topic", "topic2"));
        assert!(covers("", "anything"));
    }
}
