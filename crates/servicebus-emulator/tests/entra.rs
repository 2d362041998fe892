//! Microsoft Entra ID as the emulator plays it: put-token takes JWTs of the issuer
//! `[namespace.entra]` trusts, with the rights of the roles assigned to the token's `oid`
//! (Azure Service Bus Data Sender / Receiver), and refuses another issuer, a forged signature
//! and a wrong audience with Azure's texts. Through azservicebus's token-credential client, as
//! azure_identity's credentials plug into it.

mod common;

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use azservicebus::{ServiceBusClient, ServiceBusSenderOptions};
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use common::*;
use ordo_servicebus_emulator::{DataRole, EmulatorConfig, EntraConfig, RoleAssignment};
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

const ISSUER: &str = "https://login.test/ordo-tenant/v2.0";
const AUDIENCE: &str = "https://servicebus.azure.net";
const SENDER: &str = "00000000-0000-0000-0000-00000000a001";
const RECEIVER: &str = "00000000-0000-0000-0000-00000000a002";

/// A token issuer: a P-256 key and what it writes into its tokens.
#[derive(Debug)]
struct Issuer {
    key: EcdsaKeyPair,
    public_pem: String,
}

impl Issuer {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        Self {
            key: EcdsaKeyPair::from_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &key.serialize_der(),
                &ring::rand::SystemRandom::new(),
            )
            .unwrap(),
            public_pem: key.public_key_pem(),
        }
    }

    fn token(&self, iss: &str, aud: &str, oid: &str, lifetime_s: i64) -> (String, i64) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "iss": iss, "aud": aud, "oid": oid, "nbf": now - 5, "exp": now + lifetime_s,
        });
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signed = format!("{header}.{claims}");
        let signature = self
            .key
            .sign(&ring::rand::SystemRandom::new(), signed.as_bytes())
            .unwrap();
        (
            format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref())),
            now + lifetime_s,
        )
    }
}

/// What azure_identity's credentials are to azservicebus: a source of access tokens.
#[derive(Debug)]
struct Credential {
    issuer: Arc<Issuer>,
    iss: &'static str,
    aud: &'static str,
    oid: &'static str,
}

#[async_trait::async_trait]
impl TokenCredential for Credential {
    async fn get_token(
        &self,
        _scopes: &[&str],
        _options: Option<TokenRequestOptions>,
    ) -> azure_core::Result<AccessToken> {
        let (token, expires) = self.issuer.token(self.iss, self.aud, self.oid, 3600);
        Ok(AccessToken::new(
            token,
            time::OffsetDateTime::from_unix_timestamp(expires).unwrap(),
        ))
    }
}

fn config(issuer: &Issuer, dir: &std::path::Path) -> EmulatorConfig {
    let public_key = dir.join("issuer.pem");
    std::fs::write(&public_key, &issuer.public_pem).unwrap();
    let mut config = EmulatorConfig::from_toml_str(RULES_CONFIG).unwrap();
    config.namespace.entra = Some(EntraConfig {
        issuer: ISSUER.into(),
        public_key,
        role_assignments: vec![
            RoleAssignment {
                principal_id: SENDER.into(),
                role: DataRole::Sender,
            },
            RoleAssignment {
                principal_id: RECEIVER.into(),
                role: DataRole::Receiver,
            },
        ],
    });
    config
}

async fn client_as(
    emulator: &ordo_servicebus_emulator::EmulatorHandle,
    credential: Credential,
) -> Client {
    let options = azservicebus::ServiceBusClientOptions {
        retry_options: azservicebus::ServiceBusRetryOptions {
            max_retries: 0,
            ..Default::default()
        },
        ..Default::default()
    };
    ServiceBusClient::unsecured()
        .new_from_token_credential(
            emulator.address().ip().to_string(),
            Arc::new(credential),
            options,
        )
        .await
        .unwrap()
}

/// Runs `$attach` and checks the link is refused, naming `$reason`. The emulator writes the
/// attach with a null terminus and the detach with the reason in one step, as Service Bus
/// does; fe2o3-amqp 0.14 answers the null terminus with a detach of its own, and the reason
/// must survive that crossing every time, not once in a few tries.
macro_rules! refused_with {
    ($reason:expr, $attach:expr) => {{
        let reason: &str = $reason;
        match tokio::time::timeout(std::time::Duration::from_secs(10), $attach).await {
            Ok(Ok(_)) => panic!("the link was attached; expected a refusal naming {reason:?}"),
            Ok(Err(e)) => assert!(
                format!("{e:?}").contains(reason),
                "refused without naming {reason:?}: {e:?}"
            ),
            Err(_) => panic!("no answer to the attach within 10 s; expected {reason:?}"),
        }
    }};
}

#[test]
fn tokens_of_the_trusted_issuer_carry_the_rights_of_the_principals_roles() {
    run(async {
        let issuer = Arc::new(Issuer::new());
        let dir = tempfile::tempdir().unwrap();
        let emulator = start(config(&issuer, dir.path())).await;
        let as_ = |oid| Credential {
            issuer: issuer.clone(),
            iss: ISSUER,
            aud: AUDIENCE,
            oid,
        };
        let mut sender = client_as(&emulator, as_(SENDER)).await;
        let mut link = within(
            10,
            sender.create_sender("mixed", ServiceBusSenderOptions::default()),
        )
        .await
        .unwrap();
        within(10, link.send_message(message("k", "k:1", b"jwt")))
            .await
            .unwrap();
        refused_with!("'Listen' claim(s) are required", async {
            let mut client = client_as(&emulator, as_(SENDER)).await;
            client
                .create_receiver_for_subscription("mixed", "plain", Default::default())
                .await
        });
        let mut receiver_client = client_as(&emulator, as_(RECEIVER)).await;
        let mut receiver = within(
            10,
            receiver_client.create_receiver_for_subscription("mixed", "plain", Default::default()),
        )
        .await
        .unwrap();
        let got = within(
            10,
            receiver
                .receive_messages_with_max_wait_time(1, Some(std::time::Duration::from_secs(5))),
        )
        .await
        .unwrap();
        assert_eq!(got[0].body().unwrap(), b"jwt");
        receiver.complete_message(&got[0]).await.unwrap();
        refused_with!("'Send' claim(s) are required", async {
            let mut client = client_as(&emulator, as_(RECEIVER)).await;
            client
                .create_sender("mixed", ServiceBusSenderOptions::default())
                .await
        });
        emulator.shutdown().await;
    });
}

#[test]
fn another_issuer_a_forged_signature_and_a_wrong_audience_are_refused() {
    run(async {
        let issuer = Arc::new(Issuer::new());
        let forger = Arc::new(Issuer::new());
        let dir = tempfile::tempdir().unwrap();
        let emulator = start(config(&issuer, dir.path())).await;
        let cases = [
            (
                issuer.clone(),
                "https://login.test/other/v2.0",
                AUDIENCE,
                "InvalidIssuer: Token issuer is invalid.",
            ),
            (
                forger,
                ISSUER,
                AUDIENCE,
                "InvalidSignature: The token has an invalid signature.",
            ),
            (
                issuer,
                ISSUER,
                "https://storage.azure.com",
                "InvalidAudience: Invalid authorization token audience.",
            ),
        ];
        for (signer, iss, aud, text) in cases {
            let mut client = client_as(
                &emulator,
                Credential {
                    issuer: signer,
                    iss,
                    aud,
                    oid: SENDER,
                },
            )
            .await;
            let refused = within(
                20,
                client.create_sender("mixed", ServiceBusSenderOptions::default()),
            )
            .await
            .map(|_| ())
            .unwrap_err();
            let refused = format!("{refused:?}");
            assert!(refused.contains(text), "{iss} {aud}: {refused}");
        }
        assert_eq!(active(&emulator, "mixed/Subscriptions/plain"), 0);
        emulator.shutdown().await;
    });
}
