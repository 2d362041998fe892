use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::sas::{INVALID_AUDIENCE, INVALID_SIGNATURE};
use super::*;
use crate::config::{AccessRight, AuthorizationRule};

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
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
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
