//! Verifying a shared access signature put on `$cbs`.
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

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{covers, unexpired, Denied, Grant, Keys};

pub(super) const INVALID_SIGNATURE: &str = "InvalidSignature: The token has an invalid signature.";
pub(super) const INVALID_AUDIENCE: &str =
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
    let expires_ms = unexpired(expires_s, now_ms)?;
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
        expires_ms,
    })
}
