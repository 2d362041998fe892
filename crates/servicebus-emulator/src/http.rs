//! Inspection over HTTP for operators: JSON snapshots of entities and dead-letter queues.

use std::sync::{atomic::Ordering, Arc};

use axum::{
    extract::{Query, State},
    http::StatusCode,
    response::IntoResponse,
    routing::get,
    Json, Router,
};
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::server::Shared;

pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/stats", get(stats))
        .route("/dead-letters", get(dead_letters))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "inspection endpoint stopped");
    }
}

async fn stats(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
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

async fn dead_letters(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<DeadLetterQuery>,
) -> axum::response::Response {
    match shared.namespace.entity(&query.entity) {
        Some(entity) => Json(
            entity
                .dead_letters()
                .iter()
                .map(crate::stats::DeadLetteredMessage::of)
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
