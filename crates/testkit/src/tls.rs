//! A certificate authority made at test time, and a server certificate it signed that is valid
//! for every loopback address the emulator binds (127.0.0.1 to 127.0.0.254, and `localhost`).
//! The daemons trust the CA through `[servicebus] ca_file`, so tests run them over TLS the way
//! they run against Azure.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

/// The CA and the server certificate as PEM files, deleted with the value.
#[derive(Debug)]
pub struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    /// Makes a new CA and a server certificate for the loopback addresses.
    pub fn loopback() -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "ordo test CA");
        let ca = ca.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let mut server = CertificateParams::new(vec!["localhost".to_owned()])?;
        server
            .distinguished_name
            .push(DnType::CommonName, "ordo-servicebus-emulator");
        server
            .subject_alt_names
            .extend((1..=254).map(|n| SanType::IpAddress(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)))));
        let server = server.signed_by(&key, &ca, &ca_key)?;
        let dir = tempfile::tempdir().context("temporary directory for the test CA")?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        std::fs::write(dir.path().join("server.pem"), server.pem())?;
        std::fs::write(dir.path().join("server-key.pem"), key.serialize_pem())?;
        Ok(Self { dir })
    }

    /// The CA certificate, for `[servicebus] ca_file`.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server certificate, for the emulator's `tls_cert`.
    pub fn cert_file(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    /// The server key, for the emulator's `tls_key`.
    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("server-key.pem")
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
