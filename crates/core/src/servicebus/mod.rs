//! The only place that knows the Service Bus client crate (azservicebus).
//!
//! ordo talks to Service Bus through the types of this module, so the official Azure crate can
//! replace azservicebus once it can accept sessions. Layout:
//! - this file: the client (`connect`), trusted CA files and the dead-letter count;
//! - `endpoint`: the connection string ([`Endpoint`]) and its Entra ID credential;
//! - `sender`: the producer's publishing side;
//! - `receiver`: the projector's session side.
//!
//! Two client quirks are handled here: azservicebus ignores `UseDevelopmentEmulator=true` (ordo
//! reads it and opens plain AMQP itself), and it drops any port in `Endpoint=` (plain AMQP is
//! always 5672, TLS always 5671), so a connection string with another port is refused at start
//! instead of silently dialling the wrong one.

use std::{path::Path, time::Duration};

use azservicebus::core::BasicRetryPolicy;
use azservicebus::{ServiceBusClient, ServiceBusClientOptions, ServiceBusRetryOptions};

use crate::secret::Secret;

mod endpoint;
pub mod receiver;
pub mod sender;

pub use endpoint::{entra_auth, Endpoint, EndpointError, EntraAuth};

/// The client type the daemons use.
pub(crate) type Client = ServiceBusClient<BasicRetryPolicy>;

/// A broker operation of ordo-core's own that failed (the client's error, as text): the
/// client's error type stays behind this module's seam.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BrokerError(String);

impl BrokerError {
    /// The client's error, as text (no public `From`: the client's type stays in here).
    fn client(e: azure_core::Error) -> Self {
        BrokerError(e.to_string())
    }
}

/// A CA file that cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    /// The file cannot be read or is not PEM.
    #[error("cannot read PEM certificates: {0}")]
    Read(String),
    /// The file holds no certificate.
    #[error("no PEM certificate in the file")]
    Empty,
    /// A certificate cannot be a trust anchor (then none of the file is trusted).
    #[error("a certificate cannot be trusted: {0}")]
    Unusable(String),
}

/// Trusts the CA certificates of a PEM file, next to the public roots, for every TLS
/// connection to Service Bus this process opens from now on (azservicebus's AMQP client keeps
/// one set of roots per process); returns how many were added.
pub fn trust_ca_file(path: &Path) -> Result<usize, CaFileError> {
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| CaFileError::Read(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| CaFileError::Read(e.to_string()))?;
    if certs.is_empty() {
        return Err(CaFileError::Empty);
    }
    let count = certs.len();
    fe2o3_amqp_client::connection::add_trusted_roots(certs)
        .map_err(|e| CaFileError::Unusable(e.to_string()))?;
    tracing::info!(file = %path.display(), certificates = count, "trusting CA certificates for Service Bus TLS");
    Ok(count)
}

/// The raw client, for tests that talk to the broker as ordo does (TLS, CA file, Entra ID):
/// [`connect`] behind the `test-client` feature, which only dev-dependencies turn on, so the
/// daemons themselves reach the client only through this crate's traits.
#[cfg(feature = "test-client")]
pub async fn test_client(
    conn: &Secret,
    identifier: &str,
) -> Result<ServiceBusClient<BasicRetryPolicy>, azure_core::Error> {
    connect(conn, identifier).await
}

/// How long the client gives one operation (a send, a receive with its wait, a settlement)
/// before it reports "Timeout elapsed".
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(20);

/// The longest a receive waits for its first message plus its batch window: 5 s under
/// [`OPERATION_TIMEOUT`], so the client never times out a receive whose message is arriving
/// (it would be taken from the link and then lost to the error).
pub const MAX_RECEIVE_WAIT: Duration = Duration::from_secs(15);

/// Opens a client: plain AMQP for the emulator, TLS otherwise. `identifier` names the client in
/// the broker's diagnostics.
pub(crate) async fn connect(conn: &Secret, identifier: &str) -> Result<Client, azure_core::Error> {
    let endpoint = Endpoint::parse(conn).map_err(|e| {
        azure_core::Error::message(azure_core::error::ErrorKind::Other, e.to_string())
    })?;
    let options = ServiceBusClientOptions {
        identifier: Some(identifier.to_string()),
        retry_options: ServiceBusRetryOptions {
            // ordo retries forever itself, with its own backoff. The client must not retry at all:
            // azservicebus 0.25 marks a rejected transfer settled, and its retry then reports the
            // settled message as sent, so a refused batch would count as published and be lost.
            max_retries: 0,
            try_timeout: OPERATION_TIMEOUT,
            ..ServiceBusRetryOptions::default()
        },
        ..ServiceBusClientOptions::default()
    };
    let entra = entra_auth(conn).map_err(|e| {
        azure_core::Error::message(azure_core::error::ErrorKind::Other, e.to_string())
    })?;
    match (entra, endpoint.emulator) {
        (Some(auth), true) => {
            ServiceBusClient::unsecured()
                .new_from_token_credential(endpoint.host, auth.credential()?, options)
                .await
        }
        (Some(auth), false) => {
            ServiceBusClient::new_from_token_credential(endpoint.host, auth.credential()?, options)
                .await
        }
        (None, true) => {
            ServiceBusClient::unsecured()
                .new_from_connection_string(conn.expose(), options)
                .await
        }
        (None, false) => ServiceBusClient::new_from_connection_string(conn.expose(), options).await,
    }
}

/// A client named `identifier` with a receiver on a subscription's dead-letter queue (never
/// session-enabled, so the attach is answered at once).
pub(crate) async fn dead_letter_receiver(
    conn: &Secret,
    topic: &str,
    subscription: &str,
    identifier: &str,
) -> Result<(Client, azservicebus::ServiceBusReceiver), azure_core::Error> {
    use azservicebus::{ServiceBusReceiverOptions, SubQueue};
    let mut client = connect(conn, identifier).await?;
    let receiver = client
        .create_receiver_for_subscription(
            topic,
            subscription,
            ServiceBusReceiverOptions {
                sub_queue: SubQueue::DeadLetter,
                identifier: Some(identifier.to_string()),
                ..Default::default()
            },
        )
        .await?;
    Ok((client, receiver))
}

/// Counts the messages in a subscription's dead-letter queue by peeking (no locks taken, nothing
/// removed), up to `cap`; returns `(count, capped)`.
pub async fn dead_letter_depth(
    conn: &Secret,
    topic: &str,
    subscription: &str,
    cap: usize,
) -> Result<(usize, bool), BrokerError> {
    let (client, mut receiver) = dead_letter_receiver(conn, topic, subscription, "ordo-status")
        .await
        .map_err(BrokerError::client)?;
    let mut count = 0;
    let mut from = Some(0);
    while count < cap {
        let page = receiver
            .peek_messages(250, from.take())
            .await
            .map_err(BrokerError::client)?;
        if page.is_empty() {
            break;
        }
        count += page.len();
    }
    let _ = receiver.dispose().await;
    let _ = client.dispose().await;
    Ok((count.min(cap), count >= cap))
}
