//! The envelope's wire forms, id bounds and field checks.

use super::*;
use mongodb::bson::{self, doc, oid::ObjectId, Bson, Document};
use proptest::prelude::*;

fn sample() -> Document {
    doc! {
        "_id": ObjectId::parse_str("6560f0a1b2c3d4e5f6a7b8c9").unwrap(),
        "aggregateId": "user-42",
        "aggregateType": "User",
        "eventId": 3_i64,
        "eventType": "UserEmailUpdated",
        "payload": { "email": "a@example.com", "age": 41_i32, "score": 1.5, "at": bson::DateTime::from_millis(1_700_000_000_000) },
        "timestamp": bson::DateTime::from_millis(1_700_000_000_123),
    }
}

#[test]
fn body_wire_form_is_stable() {
    let env = Envelope::from_event(&sample(), &EventFields::default(), "app", "events").unwrap();
    let body = String::from_utf8(env.to_body()).unwrap();
    assert_eq!(
        body,
        r#"{"aggregateId":"user-42","aggregateType":"User","eventId":3,"eventType":"UserEmailUpdated","payload":{"email":"a@example.com","age":41,"score":1.5,"at":{"$date":"2023-11-14T22:13:20Z"}},"timestamp":"2023-11-14T22:13:20.123Z","source":{"db":"app","collection":"events","id":{"$oid":"6560f0a1b2c3d4e5f6a7b8c9"}}}"#
    );
}

#[test]
fn message_wire_form_is_stable() {
    let env = Envelope::from_event(&sample(), &EventFields::default(), "app", "events").unwrap();
    let m = env.to_message();
    assert_eq!(m.session_id, "user-42");
    assert_eq!(m.message_id, "user-42:3");
    assert_eq!(m.subject, "UserEmailUpdated");
    assert_eq!(m.content_type, "application/json");
    assert_eq!(
        m.properties,
        vec![
            ("ordo-envelope".into(), PropertyValue::Int(1)),
            (
                "aggregateId".into(),
                PropertyValue::String("user-42".into())
            ),
            ("aggregateType".into(), PropertyValue::String("User".into())),
            (
                "eventType".into(),
                PropertyValue::String("UserEmailUpdated".into())
            ),
            ("eventId".into(), PropertyValue::Long(3)),
        ]
    );
}

#[test]
fn bson_types_survive_the_round_trip() {
    let env = Envelope::from_event(&sample(), &EventFields::default(), "app", "events").unwrap();
    let back = Envelope::decode(&env.to_body()).unwrap();
    assert_eq!(back, env);
    let payload = back.payload_document().unwrap();
    assert_eq!(payload.get("age"), Some(&Bson::Int32(41)));
    assert_eq!(
        payload.get("at"),
        Some(&Bson::DateTime(bson::DateTime::from_millis(
            1_700_000_000_000
        )))
    );
    assert_eq!(back.timestamp_millis(), Some(1_700_000_000_123));
}

#[test]
fn long_ids_are_hashed_stably_and_kept_in_the_body() {
    let long = "x".repeat(129);
    let sid = session_id(&long);
    assert!(sid.starts_with(HASHED_ID_PREFIX));
    assert!(sid.len() <= MAX_ID_LEN);
    assert_eq!(sid, session_id(&long));
    assert_eq!(session_id(&"y".repeat(128)), "y".repeat(128));
    let mut d = sample();
    d.insert("aggregateId", long.clone());
    let m = Envelope::from_event(&d, &EventFields::default(), "app", "events")
        .unwrap()
        .to_message();
    assert_eq!(m.session_id, sid);
    assert!(m.message_id.starts_with(HASHED_ID_PREFIX));
    assert!(m
        .properties
        .contains(&("aggregateId".into(), PropertyValue::String(long.clone()))));
    assert_eq!(Envelope::decode(&m.body).unwrap().aggregate_id, long);
}

/// An aggregate whose id is another aggregate's digest gets a session (and message ids)
/// of its own: before, it shared the long id's session, and the projector applied one's
/// events to the other's read model.
#[test]
fn an_id_that_looks_like_a_digest_never_shares_a_session() {
    let long = format!("s7-{}", "k".repeat(200));
    let lookalike = session_id(&long);
    assert!(lookalike.starts_with(HASHED_ID_PREFIX) && lookalike.len() <= MAX_ID_LEN);
    assert_ne!(session_id(&lookalike), lookalike);
    assert_ne!(session_id(&lookalike), session_id(&long));
    assert_ne!(message_id(&lookalike, 1), message_id(&long, 1));
    assert!(session_id(&lookalike).starts_with(HASHED_ID_PREFIX));
    // A short id with the prefix is hashed too; one without it is kept.
    assert_ne!(session_id("sha256:x"), "sha256:x");
    assert_ne!(session_id("SHA256:x"), "SHA256:x");
    assert_eq!(session_id("sha256x"), "sha256x");
}

proptest! {
    /// Distinct aggregate ids never share a session id: kept ids never start with the
    /// digest prefix, and digests of distinct ids differ.
    #[test]
    fn distinct_ids_have_distinct_sessions(a in ".{0,80}", b in ".{0,80}", long in any::<bool>()) {
        let widen = |s: &str| if long { format!("{s}{}", "w".repeat(130)) } else { s.to_string() };
        let (a, b) = (widen(&a), widen(&b));
        prop_assume!(a != b);
        prop_assert_ne!(session_id(&a), session_id(&b));
        // An id equal to the other's session id (a digest) is no exception.
        let sb = session_id(&b);
        if sb != b {
            prop_assert_ne!(session_id(&sb), sb);
        }
    }
}

#[test]
fn ids_are_measured_in_bytes_not_characters() {
    // 106 CJK characters: 318 bytes, under 128 characters but over 128 bytes.
    let wide = "账".repeat(106);
    assert!(wide.chars().count() < MAX_ID_LEN && wide.len() > MAX_ID_LEN);
    let sid = session_id(&wide);
    assert!(
        sid.starts_with(HASHED_ID_PREFIX) && sid.len() <= MAX_ID_LEN,
        "{sid}"
    );
    // 42 three-byte characters are 126 bytes: kept; plus ":1" it is 128: kept; ":10" is 129.
    let edge = "账".repeat(42);
    assert_eq!(session_id(&edge), edge);
    assert_eq!(message_id(&edge, 1), format!("{edge}:1"));
    assert!(message_id(&edge, 10).starts_with(HASHED_ID_PREFIX));
}

#[test]
fn a_timestamp_of_another_type_is_treated_as_absent() {
    let mut d = sample();
    d.insert("timestamp", 1_700_000_000_i64);
    let env = Envelope::from_event(&d, &EventFields::default(), "app", "events").unwrap();
    assert_eq!(env.timestamp, None);
    d.insert("timestamp", "2023-11-14T22:13:20.123+00:00");
    let env = Envelope::from_event(&d, &EventFields::default(), "app", "events").unwrap();
    assert_eq!(env.timestamp_millis(), Some(1_700_000_000_123));
    d.insert("timestamp", "yesterday");
    let env = Envelope::from_event(&d, &EventFields::default(), "app", "events").unwrap();
    assert_eq!(env.timestamp, None);
}

#[test]
fn invalid_events_name_the_field_and_value() {
    let mut d = sample();
    d.remove("aggregateId");
    let e = Envelope::from_event(&d, &EventFields::default(), "app", "events").unwrap_err();
    assert_eq!(e.to_string(), "field `aggregateId` is missing");

    let mut d = sample();
    d.insert("eventId", "three");
    let e = Envelope::from_event(&d, &EventFields::default(), "app", "events").unwrap_err();
    assert_eq!(
        e.to_string(),
        "field `eventId` has invalid value \"three\": an integer aggregate version >= 1"
    );

    let mut d = sample();
    d.insert("eventId", 0_i32);
    assert!(Envelope::from_event(&d, &EventFields::default(), "app", "events").is_err());

    let mut d = sample();
    d.insert("eventId", 2.5);
    assert!(Envelope::from_event(&d, &EventFields::default(), "app", "events").is_err());
    d.insert("eventId", 2.0);
    assert_eq!(
        Envelope::from_event(&d, &EventFields::default(), "app", "events")
            .unwrap()
            .event_id,
        2
    );
}

#[test]
fn custom_field_names_are_honoured() {
    let fields = EventFields {
        aggregate_id: "streamId".into(),
        event_id: "version".into(),
        event_type: "type".into(),
        payload: "data".into(),
        ..EventFields::default()
    };
    let d = doc! { "_id": 1, "streamId": "s", "version": 1, "type": "T", "data": { "a": 1 } };
    let env = Envelope::from_event(&d, &fields, "db", "c").unwrap();
    assert_eq!((env.aggregate_id.as_str(), env.event_id), ("s", 1));
}

#[test]
fn decode_rejects_garbage_and_newer_versions() {
    assert!(matches!(
        Envelope::decode(b"not json"),
        Err(DecodeError::Json(_))
    ));
    assert!(matches!(
        Envelope::check_version(Some(2)),
        Err(DecodeError::Version(2))
    ));
    Envelope::check_version(Some(1)).unwrap();
}

proptest! {
    #[test]
    fn message_id_is_unique_per_event_and_stable(
        a in "[a-zA-Z0-9:_-]{1,140}", b in "[a-zA-Z0-9:_-]{1,140}",
        x in 1i64..1_000_000, y in 1i64..1_000_000,
    ) {
        let ma = message_id(&a, x);
        prop_assert_eq!(&ma, &message_id(&a, x));
        prop_assert!(ma.len() <= MAX_ID_LEN);
        prop_assert!(session_id(&a).len() <= MAX_ID_LEN);
        prop_assert_ne!(&ma, &message_id(&a, x + 1));
        prop_assert_ne!(&ma, &message_id(&format!("{a}:{x}"), y));
        if (a.as_str(), x) != (b.as_str(), y) {
            // The eventId is last and has no colon, so the text splits back into the pair
            // at its last colon: distinct events never share a MessageId.
            prop_assert_ne!(ma, message_id(&b, y));
        }
    }
}
