//! HTTP for operators: JSON snapshots of entities and dead-letter queues, and the keys of the
//! namespace's authorization rules (listed and regenerated as Azure's management API does, so
//! a key rotation can be rehearsed without restarting the emulator).

use std::sync::{atomic::Ordering, Arc};

use axum::{
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::auth::{KeyType, RuleKeys};
use crate::server::Shared;

#[derive(Clone)]
struct Http {
    shared: Arc<Shared>,
    /// `Endpoint=sb://HOST[:PORT]`, the start of every connection string shown.
    endpoint: Arc<str>,
}

pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, endpoint: String) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/stats", get(stats))
        .route("/dead-letters", get(dead_letters))
        .route("/keys/{rule}/listKeys", post(list_keys))
        .route("/keys/{rule}/regenerateKeys", post(regenerate_keys))
        .with_state(Http {
            shared,
            endpoint: endpoint.into(),
        });
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "inspection endpoint stopped");
    }
}

async fn stats(State(http): State<Http>) -> impl IntoResponse {
    let shared = &http.shared;
    Json(
        shared
            .namespace
            .stats(shared.connections.load(Ordering::Relaxed)),
    )
}

#[derive(Debug, Deserialize)]
struct DeadLetterQuery {
    entity: String,
}

async fn dead_letters(State(http): State<Http>, Query(query): Query<DeadLetterQuery>) -> Response {
    match http.shared.namespace.entity(&query.entity) {
        Some(entity) => Json(
            entity
                .dead_letters()
                .iter()
                .map(crate::wire::dead_lettered_message)
                .collect::<Vec<_>>(),
        )
        .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("entity not found: {}", query.entity),
        )
            .into_response(),
    }
}

/// A rule's keys in the shape of Azure's `AccessKeys` (what `az servicebus … keys list` and
/// `keys renew` print).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AccessKeys {
    key_name: String,
    primary_key: String,
    secondary_key: Option<String>,
    primary_connection_string: String,
    secondary_connection_string: Option<String>,
}

impl Http {
    fn access_keys(&self, keys: RuleKeys) -> AccessKeys {
        let connection_string =
            |key: &str| crate::handle::emulator_connection_string(&self.endpoint, &keys.name, key);
        AccessKeys {
            primary_connection_string: connection_string(&keys.primary),
            secondary_connection_string: keys.secondary.as_deref().map(connection_string),
            key_name: keys.name,
            primary_key: keys.primary,
            secondary_key: keys.secondary,
        }
    }

    /// Keys are shown and changed only for a caller holding a Manage key, given as
    /// `Authorization: SharedAccessKeyName=NAME;SharedAccessKey=KEY` (the two fields of a
    /// connection string), as Azure's management API is closed to callers without rights.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), (StatusCode, String)> {
        let refuse = |status: StatusCode, why: &str| Err((status, why.to_owned()));
        let Some(value) = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "the Authorization header is missing: give \
                 \"SharedAccessKeyName=NAME;SharedAccessKey=KEY\" of a rule with Manage rights",
            );
        };
        let field = |name: &str| {
            value
                .split(';')
                .find_map(|part| part.trim().strip_prefix(name)?.strip_prefix('='))
                .unwrap_or_default()
        };
        let rights = self.shared.keys().check_plain(
            field("SharedAccessKeyName").as_bytes(),
            field("SharedAccessKey").as_bytes(),
        );
        match rights {
            None => refuse(
                StatusCode::UNAUTHORIZED,
                "the Authorization header names no key of this namespace, or the wrong key",
            ),
            Some(rights) if !rights.manage() => refuse(
                StatusCode::FORBIDDEN,
                "the key in the Authorization header has no Manage right",
            ),
            Some(_) => Ok(()),
        }
    }
}

fn no_such_rule(rule: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!("authorization rule not found: {rule}"),
    )
        .into_response()
}

async fn list_keys(
    State(http): State<Http>,
    Path(rule): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = http.authorize(&headers) {
        return refused.into_response();
    }
    match http.shared.keys().list(&rule) {
        Some(keys) => Json(http.access_keys(keys)).into_response(),
        None => no_such_rule(&rule),
    }
}

/// The body of Azure's `regenerateKeys`: which key, and optionally its new value.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RegenerateKeys {
    key_type: KeyType,
    key: Option<String>,
}

async fn regenerate_keys(
    State(http): State<Http>,
    Path(rule): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(refused) = http.authorize(&headers) {
        return refused.into_response();
    }
    let request: RegenerateKeys = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!(
                    "the body must be {{\"keyType\": \"PrimaryKey\" | \"SecondaryKey\", \"key\": \
                     optional new value}}: {e}"
                ),
            )
                .into_response()
        }
    };
    let value = match request.key {
        Some(key) if key.is_empty() || key.contains(';') || key.trim() != key => {
            return (
                StatusCode::BAD_REQUEST,
                format!("key {key:?}: a key must be non-empty, without ';' or surrounding spaces"),
            )
                .into_response()
        }
        Some(key) => key,
        None => crate::auth::new_key(),
    };
    match http
        .shared
        .edit_keys(|keys| keys.regenerate(&rule, request.key_type, value))
    {
        Some(keys) => {
            tracing::info!(rule = %rule, key_type = ?request.key_type, "key regenerated");
            Json(http.access_keys(keys)).into_response()
        }
        None => no_such_rule(&rule),
    }
}
