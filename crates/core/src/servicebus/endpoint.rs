//! What ordo reads from a connection string before handing it to the client: the host, the
//! emulator flag, and the credential.
//!
//! Besides keys and signatures, a connection string may name a Microsoft Entra ID credential
//! with `Authentication=ManagedIdentity|WorkloadIdentity|ClientSecret|AzureCli` (what
//! `[servicebus] namespace` and `auth` turn into); the client then puts JWTs from
//! azure_identity instead of SAS tokens. azservicebus drops any port in `Endpoint=` (plain AMQP
//! is always 5672, TLS always 5671), so [`Endpoint::parse`] refuses a string with another port.

use crate::secret::Secret;

/// What ordo needs to know about a connection string before handing it to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name of the namespace (or emulator address).
    pub host: String,
    /// `UseDevelopmentEmulator=true`: plain AMQP on 5672, no TLS.
    pub emulator: bool,
}

/// A connection string that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// No `Endpoint=` part.
    #[error("no Endpoint=sb://HOST part (value hidden: it holds a key)")]
    MissingEndpoint,
    /// `Endpoint=` is not `sb://host[:port][/]`.
    #[error("Endpoint {0:?} is not of the form sb://HOST")]
    BadEndpoint(String),
    /// A port the AMQP client would silently ignore.
    #[error("Endpoint port {port} cannot be used: the AMQP client always dials {expected}; give the emulator its own address (127.0.0.N) instead of a port")]
    Port {
        /// The port in the string.
        port: u16,
        /// The port the client dials.
        expected: u16,
    },
    /// Neither a key nor a signature nor an Entra ID credential.
    #[error("no SharedAccessKeyName/SharedAccessKey, SharedAccessSignature or Authentication (value hidden)")]
    MissingCredential,
    /// `Authentication=` names no credential ordo knows.
    #[error("Authentication {0:?} is not one of ManagedIdentity, WorkloadIdentity, ClientSecret, AzureCli")]
    UnknownAuthentication(String),
}

/// A Microsoft Entra ID credential, from azure_identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntraAuth {
    /// The managed identity of the VM, App Service or container (system-assigned, or the
    /// user-assigned one `AZURE_CLIENT_ID` names).
    ManagedIdentity,
    /// AKS workload identity: the federated token file and `AZURE_CLIENT_ID`/`AZURE_TENANT_ID`
    /// the webhook injects.
    WorkloadIdentity,
    /// An app registration's secret: `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`,
    /// `AZURE_CLIENT_SECRET`.
    ClientSecret,
    /// Whoever is logged in to the Azure CLI (`az account get-access-token`); for development.
    AzureCli,
}

impl EntraAuth {
    /// The value of `Authentication=` for this credential.
    pub fn as_str(self) -> &'static str {
        match self {
            EntraAuth::ManagedIdentity => "ManagedIdentity",
            EntraAuth::WorkloadIdentity => "WorkloadIdentity",
            EntraAuth::ClientSecret => "ClientSecret",
            EntraAuth::AzureCli => "AzureCli",
        }
    }

    /// Reads `Authentication=` (case and `_`/`-`/space insensitive, so `managed_identity` and
    /// "Managed Identity" both work).
    pub fn parse(text: &str) -> Result<Self, EndpointError> {
        let folded: String = text
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        match folded.as_str() {
            "managedidentity" => Ok(EntraAuth::ManagedIdentity),
            "workloadidentity" => Ok(EntraAuth::WorkloadIdentity),
            "clientsecret" => Ok(EntraAuth::ClientSecret),
            "azurecli" => Ok(EntraAuth::AzureCli),
            _ => Err(EndpointError::UnknownAuthentication(text.to_owned())),
        }
    }

    pub(super) fn credential(
        self,
    ) -> Result<std::sync::Arc<dyn azure_core::credentials::TokenCredential>, azure_core::Error>
    {
        use azure_identity::{
            AzureCliCredential, ClientSecretCredential, ManagedIdentityCredential,
            WorkloadIdentityCredential,
        };
        let env = |name: &str| {
            std::env::var(name).map_err(|_| {
                azure_core::Error::message(
                    azure_core::error::ErrorKind::Credential,
                    format!("Authentication=ClientSecret needs the environment variable {name}"),
                )
            })
        };
        Ok(match self {
            // As DefaultAzureCredential does: AZURE_CLIENT_ID picks a user-assigned identity
            // (a host with several has no default one); unset, the system-assigned identity.
            EntraAuth::ManagedIdentity => ManagedIdentityCredential::new(Some(
                azure_identity::ManagedIdentityCredentialOptions {
                    user_assigned_id: user_assigned_client_id()
                        .map(azure_identity::UserAssignedId::ClientId),
                    ..Default::default()
                },
            ))?,
            EntraAuth::WorkloadIdentity => WorkloadIdentityCredential::new(None)?,
            EntraAuth::ClientSecret => ClientSecretCredential::new(
                &env("AZURE_TENANT_ID")?,
                env("AZURE_CLIENT_ID")?,
                azure_core::credentials::Secret::new(env("AZURE_CLIENT_SECRET")?),
                None,
            )?,
            EntraAuth::AzureCli => AzureCliCredential::new(None)?,
        })
    }
}

/// The client id of the user-assigned managed identity to use: `AZURE_CLIENT_ID`, when set.
fn user_assigned_client_id() -> Option<String> {
    std::env::var("AZURE_CLIENT_ID")
        .ok()
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
}

/// The Entra ID credential a connection string names with `Authentication=`, if any.
pub fn entra_auth(conn: &Secret) -> Result<Option<EntraAuth>, EndpointError> {
    for part in conn.expose().split(';') {
        if let Some((k, v)) = part.split_once('=') {
            if k.trim().eq_ignore_ascii_case("authentication") {
                return EntraAuth::parse(v.trim()).map(Some);
            }
        }
    }
    Ok(None)
}

impl Endpoint {
    /// Parses the parts of a connection string ordo cares about.
    pub fn parse(conn: &Secret) -> Result<Endpoint, EndpointError> {
        let mut endpoint = None;
        let mut emulator = false;
        let mut key_name = false;
        let mut key = false;
        let mut sas = false;
        let entra = entra_auth(conn)?.is_some();
        for part in conn.expose().split(';') {
            let Some((k, v)) = part.split_once('=') else {
                continue;
            };
            match k.trim().to_ascii_lowercase().as_str() {
                "endpoint" => endpoint = Some(v.trim().to_string()),
                "usedevelopmentemulator" => emulator = v.trim().eq_ignore_ascii_case("true"),
                "sharedaccesskeyname" => key_name = !v.trim().is_empty(),
                "sharedaccesskey" => key = !v.trim().is_empty(),
                "sharedaccesssignature" => sas = !v.trim().is_empty(),
                _ => {}
            }
        }
        let endpoint = endpoint.ok_or(EndpointError::MissingEndpoint)?;
        let rest = endpoint
            .strip_prefix("sb://")
            .ok_or_else(|| EndpointError::BadEndpoint(endpoint.clone()))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(EndpointError::BadEndpoint(endpoint.clone()));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                let port: u16 = p
                    .parse()
                    .map_err(|_| EndpointError::BadEndpoint(endpoint.clone()))?;
                (h.to_string(), Some(port))
            }
            _ => (authority.to_string(), None),
        };
        let expected = if emulator { 5672 } else { 5671 };
        if let Some(port) = port {
            if port != expected {
                return Err(EndpointError::Port { port, expected });
            }
        }
        if !(sas || entra || (key_name && key)) {
            return Err(EndpointError::MissingCredential);
        }
        Ok(Endpoint { host, emulator })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Endpoint, EndpointError> {
        Endpoint::parse(&Secret::new(s))
    }

    #[test]
    fn emulator_and_cloud_strings_parse() {
        assert_eq!(
            parse("Endpoint=sb://127.0.0.3;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true").unwrap(),
            Endpoint { host: "127.0.0.3".into(), emulator: true }
        );
        assert_eq!(
            parse(
                "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=v"
            )
            .unwrap(),
            Endpoint {
                host: "ns.servicebus.windows.net".into(),
                emulator: false
            }
        );
        assert!(parse("Endpoint=sb://localhost:5672;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true").is_ok());
    }

    #[test]
    fn unusable_strings_are_refused_with_the_reason() {
        assert_eq!(
            parse("SharedAccessKey=v"),
            Err(EndpointError::MissingEndpoint)
        );
        assert_eq!(
            parse("Endpoint=sb://localhost:5673;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true"),
            Err(EndpointError::Port { port: 5673, expected: 5672 })
        );
        assert_eq!(
            parse("Endpoint=sb://ns.servicebus.windows.net"),
            Err(EndpointError::MissingCredential)
        );
        assert!(matches!(
            parse("Endpoint=https://x;SharedAccessSignature=s"),
            Err(EndpointError::BadEndpoint(_))
        ));
        assert_eq!(
            parse("Endpoint=sb://ns.servicebus.windows.net/;Authentication=Password"),
            Err(EndpointError::UnknownAuthentication("Password".into()))
        );
    }

    #[test]
    fn an_entra_credential_stands_in_for_a_key() {
        let conn =
            Secret::new("Endpoint=sb://ns.servicebus.windows.net/;Authentication=Managed Identity");
        assert!(Endpoint::parse(&conn).is_ok());
        assert_eq!(entra_auth(&conn), Ok(Some(EntraAuth::ManagedIdentity)));
        for (text, auth) in [
            ("workload_identity", EntraAuth::WorkloadIdentity),
            ("client-secret", EntraAuth::ClientSecret),
            ("AzureCli", EntraAuth::AzureCli),
        ] {
            assert_eq!(EntraAuth::parse(text), Ok(auth));
        }
    }
}
