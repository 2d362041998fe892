//! Microsoft Entra ID for tests: a token issuer the emulator trusts (`[namespace.entra]`), and
//! a stand-in for the Azure CLI that hands its tokens to azure_identity's `AzureCliCredential`,
//! so the daemons run their Entra ID code path (`[servicebus] auth = "azure_cli"`) against the
//! emulator.

use std::{
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

/// The `iss` of the test issuer's tokens.
pub const ISSUER: &str = "https://login.ordo.test/tenant/v2.0";
/// The audience of Service Bus tokens.
pub const AUDIENCE: &str = "https://servicebus.azure.net";

/// A P-256 key that signs ES256 tokens, with its public key as a PEM file.
#[derive(Debug)]
pub struct TestIssuer {
    key: EcdsaKeyPair,
    dir: tempfile::TempDir,
}

impl TestIssuer {
    /// A new issuer key.
    pub fn new() -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let dir = tempfile::tempdir().context("temporary directory for the test issuer")?;
        std::fs::write(dir.path().join("issuer.pem"), key.public_key_pem())?;
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|e| anyhow::anyhow!("test issuer key: {e}"))?;
        Ok(Self { key, dir })
    }

    /// The public key, for `[namespace.entra] public_key`.
    pub fn public_key_file(&self) -> PathBuf {
        self.dir.path().join("issuer.pem")
    }

    /// A Service Bus token for principal `oid`, valid for `lifetime_s`; and its expiry (Unix s).
    pub fn token(&self, oid: &str, lifetime_s: i64) -> anyhow::Result<(String, i64)> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "iss": ISSUER, "aud": AUDIENCE, "oid": oid, "nbf": now - 5, "exp": now + lifetime_s,
        });
        let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
        let signature = self
            .key
            .sign(&ring::rand::SystemRandom::new(), signed.as_bytes())
            .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
        Ok((
            format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref())),
            now + lifetime_s,
        ))
    }

    /// A directory holding an `az` that answers `az account get-access-token` with a one-hour
    /// token for `oid`, as the Azure CLI does; put it first on a daemon's `PATH`.
    pub fn fake_azure_cli(&self, oid: &str) -> anyhow::Result<PathBuf> {
        let (token, expires) = self.token(oid, 3600)?;
        let dir = self.dir.path().join(format!("az-{oid}"));
        std::fs::create_dir_all(&dir)?;
        let answer = serde_json::json!({
            "accessToken": token,
            "expiresOn": "2099-01-01 00:00:00.000000",
            "expires_on": expires,
            "tokenType": "Bearer",
        });
        write_executable(
            &dir.join("az"),
            &format!("#!/bin/sh\ncat <<'EOF'\n{answer}\nEOF\n"),
        )?;
        Ok(dir)
    }
}

fn write_executable(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}
