//! Verifying a JWT put on `$cbs`.
//!
//! A JWT (`type = "jwt"`, Microsoft Entra ID) is taken from the one issuer `[namespace.entra]`
//! names, in place of Entra: ES256-signed (Entra signs RS256; a test issuer's P-256 key keeps
//! the emulator free of an RSA implementation), `aud` the Service Bus resource
//! `https://servicebus.azure.net`, unexpired. It grants the rights of the roles assigned to its
//! `oid` on the whole namespace. Refusals: an unknown issuer "InvalidIssuer: Token issuer is
//! invalid.", a wrong audience "InvalidAudience: Invalid authorization token audience."
//! (Azure/azure-sdk-for-js#26360, MicrosoftDocs/azure-docs#19707), a bad signature, expired or
//! malformed token as for SAS.

use base64::Engine;

use super::{sas::INVALID_SIGNATURE, unexpired, Denied, Grant, Rights};
use crate::config::AccessRight;

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
    let expires_ms = unexpired(expires_s, now_ms)?;
    if let Some(nbf) = claims.get("nbf").and_then(|v| v.as_i64()) {
        if nbf.saturating_mul(1000) > now_ms {
            return Err(malformed("nbf is in the future"));
        }
    }
    let principal = text(&claims, "oid").unwrap_or_default();
    Ok(Grant {
        resource: String::new(),
        rights: issuer.rights_of(&principal),
        expires_ms,
    })
}
