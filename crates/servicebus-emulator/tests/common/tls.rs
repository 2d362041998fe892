//! A certificate authority made for one test, for the emulator's AMQPS listener.

use std::net::{IpAddr, Ipv4Addr};

use ordo_servicebus_emulator::EmulatorConfig;

/// A CA made for one test and a server certificate it signed, valid for every 127.0.0.N the
/// tests bind, as PEM files in a directory that lives as long as the value.
pub struct TestCa {
    _dir: tempfile::TempDir,
    pub ca_file: std::path::PathBuf,
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
}

impl TestCa {
    pub fn loopback() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "ordo emulator test CA");
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut server = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        server
            .distinguished_name
            .push(DnType::CommonName, "ordo emulator");
        server
            .subject_alt_names
            .extend((1..=254).map(|n| SanType::IpAddress(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)))));
        let server = server.signed_by(&key, &ca, &ca_key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        Self {
            ca_file: write("ca.pem", ca.pem()),
            cert_file: write("server.pem", server.pem()),
            key_file: write("server-key.pem", key.serialize_pem()),
            _dir: dir,
        }
    }

    /// `config` serving AMQPS with this CA's server certificate.
    pub fn serve(&self, mut config: EmulatorConfig) -> EmulatorConfig {
        config.namespace.tls_cert = Some(self.cert_file.clone());
        config.namespace.tls_key = Some(self.key_file.clone());
        config
    }

    /// Makes azservicebus (its AMQP client's process-wide TLS roots) trust this CA.
    pub fn trust_in_azservicebus(&self) {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let ca = CertificateDer::from_pem_file(&self.ca_file).unwrap();
        fe2o3_amqp_client::connection::add_trusted_roots(vec![ca]).unwrap();
    }
}
