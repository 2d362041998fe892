//! Authorization: tokens are verified, links need the right for their entity, either key of a
//! rule works until it is regenerated, and keys are listed and regenerated over HTTP.

use super::*;

/// A connection string for the same emulator with another key name and key.
fn with_key(emulator: &EmulatorHandle, name: &str, key: &str) -> String {
    let namespace = EmulatorConfig::default_ordo().namespace;
    emulator
        .connection_string()
        .replace(&namespace.key_name, name)
        .replace(&namespace.key, key)
}

async fn client_for(connection_string: String) -> Result<Client, String> {
    azservicebus::ServiceBusClient::unsecured()
        .new_from_connection_string(connection_string, Default::default())
        .await
        .map_err(|e| format!("{e:?}"))
}

/// Whether a client of `connection_string` may open a sender on `mixed`; the error is the
/// client's text.
async fn can_send(connection_string: String) -> Result<(), String> {
    let mut client = client_for(connection_string).await?;
    within(
        30,
        client.create_sender("mixed", ServiceBusSenderOptions::default()),
    )
    .await
    .map(|_| ())
    .map_err(|e| format!("{e:?}"))
}

/// A rule named `sender` with the Send right only.
fn send_rule(
    key: &str,
    secondary_key: Option<&str>,
) -> ordo_servicebus_emulator::AuthorizationRule {
    ordo_servicebus_emulator::AuthorizationRule {
        name: "sender".into(),
        key: key.into(),
        secondary_key: secondary_key.map(Into::into),
        rights: vec![ordo_servicebus_emulator::AccessRight::Send],
    }
}

#[test]
fn tokens_are_verified_and_links_need_the_right_for_their_entity() {
    run(async {
        let mut config = EmulatorConfig::from_toml_str(RULES_CONFIG).unwrap();
        config.namespace.authorization_rules = vec![send_rule("sender-key", None)];
        let emulator = start(config).await;
        // A wrong key and an unknown key name: put-token answers 401, no link opens.
        for (name, key) in [("sender", "wrong"), ("nobody", "sender-key")] {
            let mut client = client_for(with_key(&emulator, name, key)).await.unwrap();
            let refused = within(
                30,
                client.create_sender("mixed", ServiceBusSenderOptions::default()),
            )
            .await
            .map(|_| ())
            .unwrap_err();
            let text = format!("{refused:?}");
            assert!(text.contains("InvalidSignature"), "{name}/{key}: {text}");
        }
        // A Send key sends, and cannot receive.
        let mut client = client_for(with_key(&emulator, "sender", "sender-key"))
            .await
            .unwrap();
        send_to(&mut client, "mixed", vec![message("k", "k:1", b"1")])
            .await
            .unwrap();
        assert_eq!(active(&emulator, "mixed/Subscriptions/s"), 1);
        let refused = within(
            30,
            client.create_receiver_for_subscription("mixed", "plain", Default::default()),
        )
        .await
        .map(|_| ())
        .unwrap_err();
        let text = format!("{refused:?}");
        assert!(text.contains("'Listen' claim(s) are required"), "{text}");
        emulator.shutdown().await;
    });
}

/// A rule has two keys, as on Service Bus, and tokens signed with either are accepted; after
/// the secondary is regenerated (put again with a new one), the old secondary is refused and
/// the primary still works: the steps of a rotation without downtime.
#[test]
fn either_key_of_a_rule_authorizes_and_a_regenerated_one_stops() {
    run(async {
        let rule = |secondary: &str| send_rule("primary-key", Some(secondary));
        let mut config = EmulatorConfig::from_toml_str(RULES_CONFIG).unwrap();
        config.namespace.authorization_rules = vec![rule("secondary-key")];
        let emulator = start(config).await;
        let sends = |key: &str| can_send(with_key(&emulator, "sender", key));
        sends("primary-key").await.unwrap();
        sends("secondary-key").await.unwrap();
        emulator.put_key(rule("secondary-key-2"));
        let refused = sends("secondary-key").await.unwrap_err();
        assert!(refused.contains("InvalidSignature"), "{refused}");
        sends("secondary-key-2").await.unwrap();
        sends("primary-key").await.unwrap();
        emulator.shutdown().await;
    });
}

/// A rotation as docs/operations.md runs it, over the emulator's HTTP copy of Azure's
/// `listKeys` and `regenerateKeys`: the key nobody uses is regenerated, a client moves to the
/// connection string returned, then the old key is regenerated. Each regenerated key stops
/// signing at once, the other keeps working, and keys are shown only to a Manage key.
#[test]
fn keys_are_listed_and_regenerated_over_http_for_a_manage_key_only() {
    run(async {
        let mut config = EmulatorConfig::from_toml_str(RULES_CONFIG).unwrap();
        config.namespace.authorization_rules =
            vec![send_rule("primary-key", Some("secondary-key"))];
        let root = format!(
            "SharedAccessKeyName={};SharedAccessKey={}",
            config.namespace.key_name, config.namespace.key
        );
        let emulator = start(config).await;
        let ip = emulator.address().ip();
        let http = emulator
            .serve_http(std::net::SocketAddr::new(ip, 0))
            .await
            .unwrap();
        let keys = KeysApi { http, root };
        keys.refuses_what_azure_refuses().await;
        keys.lists_the_keys().await;
        // 1. Regenerate the key nobody uses; the connection string returned works as it is.
        let moved = keys.regenerates_the_unused_key(&emulator).await;
        // 2. Then the old one, to a chosen value.
        keys.regenerates_the_old_key(&emulator, moved).await;
        emulator.shutdown().await;
    });
}

const LIST: &str = "/keys/sender/listKeys";
const REGENERATE: &str = "/keys/sender/regenerateKeys";

/// The emulator's HTTP keys endpoint and a connection string's key of the root (Manage) rule.
struct KeysApi {
    http: std::net::SocketAddr,
    root: String,
}

impl KeysApi {
    /// POSTs `body` to `path` with `auth` as the Authorization header: the status and body.
    async fn post(
        &self,
        path: &'static str,
        auth: Option<String>,
        body: &'static str,
    ) -> (u16, String) {
        let http = self.http;
        tokio::task::spawn_blocking(move || http_request(http, "POST", path, auth.as_deref(), body))
            .await
            .unwrap()
    }

    /// POSTs as the root rule.
    async fn post_as_root(&self, path: &'static str, body: &'static str) -> (u16, String) {
        self.post(path, Some(self.root.clone()), body).await
    }

    /// Refused: no key, a wrong key, a key without Manage, an unknown rule, a bad body.
    async fn refuses_what_azure_refuses(&self) {
        let (status, why) = self.post(LIST, None, "").await;
        assert_eq!(
            (status, why.contains("Authorization header is missing")),
            (401, true),
            "{why}"
        );
        let wrong = Some("SharedAccessKeyName=sender;SharedAccessKey=nope".to_owned());
        assert_eq!(self.post(LIST, wrong, "").await.0, 401);
        let sender = Some("SharedAccessKeyName=sender;SharedAccessKey=primary-key".to_owned());
        let (status, why) = self.post(LIST, sender, "").await;
        assert_eq!(
            (status, why.contains("no Manage right")),
            (403, true),
            "{why}"
        );
        let (status, why) = self.post_as_root("/keys/nobody/listKeys", "").await;
        assert_eq!(
            (status, why.as_str()),
            (404, "authorization rule not found: nobody")
        );
        let (status, why) = self
            .post_as_root(REGENERATE, r#"{"keyType":"TertiaryKey"}"#)
            .await;
        assert_eq!((status, why.contains("TertiaryKey")), (400, true), "{why}");
        let (status, why) = self
            .post_as_root(REGENERATE, r#"{"keyType":"PrimaryKey","key":"a;b"}"#)
            .await;
        assert_eq!((status, why.contains("\"a;b\"")), (400, true), "{why}");
    }

    /// A Manage key sees both keys, and the connection string listed works.
    async fn lists_the_keys(&self) {
        let (status, listed) = self.post_as_root(LIST, "").await;
        assert_eq!(status, 200, "{listed}");
        let listed = json(&listed);
        assert_eq!(listed["keyName"], "sender");
        assert_eq!(listed["primaryKey"], "primary-key");
        assert_eq!(listed["secondaryKey"], "secondary-key");
        can_send(
            listed["primaryConnectionString"]
                .as_str()
                .unwrap()
                .to_owned(),
        )
        .await
        .unwrap();
    }

    /// Regenerates the secondary key: the connection string returned (given back) works, the
    /// old secondary key stops signing, the primary key goes on.
    async fn regenerates_the_unused_key(&self, emulator: &EmulatorHandle) -> String {
        let (status, renewed) = self
            .post_as_root(REGENERATE, r#"{"keyType":"SecondaryKey"}"#)
            .await;
        assert_eq!(status, 200, "{renewed}");
        let renewed = json(&renewed);
        let new_secondary = renewed["secondaryKey"].as_str().unwrap().to_owned();
        assert_ne!(new_secondary, "secondary-key");
        assert_eq!(
            new_secondary.len(),
            44,
            "256 bits in base64, as Azure's keys"
        );
        assert_eq!(renewed["primaryKey"], "primary-key");
        let moved = renewed["secondaryConnectionString"]
            .as_str()
            .unwrap()
            .to_owned();
        can_send(moved.clone()).await.unwrap();
        let refused = can_send(with_key(emulator, "sender", "secondary-key"))
            .await
            .unwrap_err();
        assert!(refused.contains("InvalidSignature"), "{refused}");
        can_send(with_key(emulator, "sender", "primary-key"))
            .await
            .unwrap();
        moved
    }

    /// Regenerates the primary key to a chosen value: the old primary key stops signing, the
    /// client that `moved` to the secondary goes on, and the chosen key signs.
    async fn regenerates_the_old_key(&self, emulator: &EmulatorHandle, moved: String) {
        let (status, renewed) = self
            .post_as_root(REGENERATE, r#"{"keyType":"PrimaryKey","key":"chosen"}"#)
            .await;
        assert_eq!(status, 200, "{renewed}");
        assert_eq!(json(&renewed)["primaryKey"], "chosen");
        let refused = can_send(with_key(emulator, "sender", "primary-key"))
            .await
            .unwrap_err();
        assert!(refused.contains("InvalidSignature"), "{refused}");
        can_send(moved).await.unwrap();
        can_send(with_key(emulator, "sender", "chosen"))
            .await
            .unwrap();
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap()
}
