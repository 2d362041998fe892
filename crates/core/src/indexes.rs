//! The unique index on (aggregateId, eventId) of the events collection.
//!
//! Without it the source can hold two documents with the same aggregate version, which the
//! projector cannot apply both of, and every gap fill is a collection scan. Both daemons check
//! it at start; the producer creates it when `[mongodb] create_indexes` allows, and `status`
//! shows it. Field names come from `[mongodb.fields]`.

use std::fmt;

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::ErrorKind;
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};

use crate::envelope::EventFields;
use crate::mongo::{is_duplicate_key, server_code};

/// Name given to the index when ordo creates it.
pub const EVENT_INDEX_NAME: &str = "ordo_aggregate_event_unique";

/// What the events collection has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexState {
    /// A unique index on exactly (aggregateId, eventId) exists, under this name.
    Present(String),
    /// ordo just created it.
    Created,
    /// No such index, and creating it was not allowed.
    Missing,
    /// An index on those keys exists but is not unique; ordo does not replace it.
    NotUnique(String),
    /// A unique index on those keys exists but with a `partialFilterExpression`: events
    /// outside its filter can repeat a version. ordo does not replace it.
    Partial(String),
    /// Creating it failed because the collection already holds duplicate versions.
    Duplicates(String),
    /// The server refused to create it (a role without `createIndex`, a conflicting index);
    /// the server's message.
    Refused(String),
}

impl IndexState {
    /// True when the collection enforces one document per aggregate version.
    pub fn is_enforced(&self) -> bool {
        matches!(self, IndexState::Present(_) | IndexState::Created)
    }
}

impl fmt::Display for IndexState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IndexState::Present(name) => write!(f, "unique index present ({name})"),
            IndexState::Created => write!(f, "unique index created ({EVENT_INDEX_NAME})"),
            IndexState::Missing => {
                f.write_str("MISSING: no unique index on (aggregate id, event id)")
            }
            IndexState::NotUnique(name) => {
                write!(f, "NOT UNIQUE: index {name} on (aggregate id, event id) allows duplicate versions")
            }
            IndexState::Partial(name) => {
                write!(f, "PARTIAL: unique index {name} on (aggregate id, event id) has a partialFilterExpression; events outside it can repeat a version")
            }
            IndexState::Refused(e) => write!(f, "MISSING: the server refused to create it: {e}"),
            IndexState::Duplicates(e) => {
                write!(
                    f,
                    "MISSING: cannot be created, the collection holds duplicate versions: {e}"
                )
            }
        }
    }
}

fn keys(fields: &EventFields) -> Document {
    doc! { &fields.aggregate_id: 1, &fields.event_id: 1 }
}

/// Looks for the unique (aggregateId, eventId) index on `coll`.
pub async fn event_index(
    coll: &Collection<Document>,
    fields: &EventFields,
) -> mongodb::error::Result<IndexState> {
    let want = keys(fields);
    let mut cursor = match coll.list_indexes().await {
        Ok(c) => c,
        // NamespaceNotFound: no collection yet, so no index.
        Err(e) if server_code(&e) == Some(26) => return Ok(IndexState::Missing),
        Err(e) => return Err(e),
    };
    // The best found so far that does not enforce: a partial unique index, else a plain one.
    let mut weaker = None;
    while let Some(index) = cursor.try_next().await? {
        let direction = |v: &Bson| match v {
            Bson::Int32(d) => matches!(d, 1 | -1),
            Bson::Int64(d) => matches!(d, 1 | -1),
            Bson::Double(d) => *d == 1.0 || *d == -1.0,
            _ => false,
        };
        let same_keys = index.keys.len() == 2
            && index
                .keys
                .iter()
                .zip(want.keys())
                .all(|((k, v), w)| k == w && direction(v));
        if !same_keys {
            continue;
        }
        let options = index.options.unwrap_or_default();
        let name = options.name.unwrap_or_default();
        match (
            options.unique == Some(true),
            options.partial_filter_expression.is_some(),
        ) {
            (true, false) => return Ok(IndexState::Present(name)),
            (true, true) => weaker = Some(IndexState::Partial(name)),
            (false, _) => {
                if !matches!(weaker, Some(IndexState::Partial(_))) {
                    weaker = Some(IndexState::NotUnique(name));
                }
            }
        }
    }
    Ok(weaker.unwrap_or(IndexState::Missing))
}

/// Checks the index, and creates it when missing and `create` is true.
pub async fn ensure_event_index(
    coll: &Collection<Document>,
    fields: &EventFields,
    create: bool,
) -> mongodb::error::Result<IndexState> {
    let state = event_index(coll, fields).await?;
    if state != IndexState::Missing || !create {
        return Ok(state);
    }
    let model = IndexModel::builder()
        .keys(keys(fields))
        .options(
            IndexOptions::builder()
                .unique(true)
                .name(EVENT_INDEX_NAME.to_string())
                .build(),
        )
        .build();
    match coll.create_index(model).await {
        Ok(_) => Ok(IndexState::Created),
        Err(e) if is_duplicate_key(&e) => Ok(IndexState::Duplicates(match e.kind.as_ref() {
            ErrorKind::Command(c) => c.message.clone(),
            _ => e.to_string(),
        })),
        // A refusal is an answer, not an outage: report it instead of retrying forever.
        Err(e) => match e.kind.as_ref() {
            ErrorKind::Command(c) => Ok(IndexState::Refused(format!(
                "{} ({}): {}",
                c.code_name, c.code, c.message
            ))),
            _ => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ordo_testkit::TestMongo;

    fn fields() -> EventFields {
        EventFields {
            aggregate_id: "streamId".into(),
            event_id: "version".into(),
            ..EventFields::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_index_is_created_once_found_after_and_only_when_allowed() {
        let mongo = TestMongo::start().await.expect("mongodb");
        let coll = mongo.database().collection::<Document>("events");
        assert_eq!(
            ensure_event_index(&coll, &fields(), false).await.unwrap(),
            IndexState::Missing
        );
        coll.insert_one(doc! { "streamId": "a", "version": 1 })
            .await
            .unwrap();
        assert_eq!(
            ensure_event_index(&coll, &fields(), false).await.unwrap(),
            IndexState::Missing,
            "not created when not allowed"
        );
        assert_eq!(
            ensure_event_index(&coll, &fields(), true).await.unwrap(),
            IndexState::Created
        );
        assert_eq!(
            ensure_event_index(&coll, &fields(), true).await.unwrap(),
            IndexState::Present(EVENT_INDEX_NAME.into())
        );
        let dup = coll
            .insert_one(doc! { "streamId": "a", "version": 1 })
            .await;
        assert!(
            dup.is_err_and(|e| is_duplicate_key(&e)),
            "the index enforces one document per version"
        );
    }

    /// A server that refuses the creation (here: ordo's index name taken by other keys) is an
    /// answer, reported as a state, not an error retried forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_creation_is_reported_not_retried() {
        let mongo = TestMongo::start().await.expect("mongodb");
        let coll = mongo.database().collection::<Document>("events");
        let other = IndexModel::builder()
            .keys(doc! { "streamId": 1 })
            .options(
                IndexOptions::builder()
                    .name(EVENT_INDEX_NAME.to_string())
                    .build(),
            )
            .build();
        coll.create_index(other).await.unwrap();
        let state = ensure_event_index(&coll, &fields(), true).await.unwrap();
        assert!(matches!(state, IndexState::Refused(_)), "{state:?}");
        assert!(!state.is_enforced());
        assert!(
            state.to_string().starts_with("MISSING: the server refused"),
            "{state}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn duplicates_and_a_non_unique_index_are_reported_not_hidden() {
        let mongo = TestMongo::start().await.expect("mongodb");
        let coll = mongo.database().collection::<Document>("events");
        coll.insert_many([
            doc! { "streamId": "a", "version": 1, "n": 1 },
            doc! { "streamId": "a", "version": 1, "n": 2 },
        ])
        .await
        .unwrap();
        let state = ensure_event_index(&coll, &fields(), true).await.unwrap();
        assert!(matches!(state, IndexState::Duplicates(_)), "{state:?}");
        assert!(state.to_string().contains("duplicate versions"));

        coll.create_index(
            IndexModel::builder()
                .keys(doc! { "streamId": 1, "version": 1 })
                .build(),
        )
        .await
        .unwrap();
        let state = ensure_event_index(&coll, &fields(), true).await.unwrap();
        assert!(matches!(state, IndexState::NotUnique(_)), "{state:?}");
    }

    /// A unique index that covers only the events matching a filter does not keep a version
    /// from repeating: it is reported, not counted as enforcement.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partial_unique_index_is_not_enforcement() {
        let mongo = TestMongo::start().await.expect("mongodb");
        let coll = mongo.database().collection::<Document>("events");
        coll.create_index(
            IndexModel::builder()
                .keys(doc! { "streamId": 1, "version": 1 })
                .options(
                    IndexOptions::builder()
                        .unique(true)
                        .partial_filter_expression(doc! { "kind": "NeverUsed" })
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
        // The hole it leaves: a repeated version is stored.
        coll.insert_many([
            doc! { "streamId": "a", "version": 1, "kind": "Created" },
            doc! { "streamId": "a", "version": 1, "kind": "Created" },
        ])
        .await
        .unwrap();
        let state = ensure_event_index(&coll, &fields(), true).await.unwrap();
        assert!(matches!(state, IndexState::Partial(_)), "{state:?}");
        assert!(!state.is_enforced());
        assert!(
            state.to_string().contains("partialFilterExpression"),
            "{state}"
        );
    }
}
