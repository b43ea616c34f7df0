//! The HTTP/JSON adapter (axum): routes, bodies read as bytes (so malformed JSON is our
//! `{"error", "field"}` too), and [`ServeError`] mapped to status codes.

use crate::openapi;
use crate::security;
use crate::service::{ServeError, Server};
use crate::task;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use gpo_ops::auth::ServerAuth;
use serde_json::json;
use std::sync::Arc;

/// What the HTTP adapter holds.
#[derive(Clone)]
pub struct HttpState {
    /// The server.
    pub server: Arc<Server>,
    /// The `/metrics` text, rendered on demand.
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
}

/// A JSON body (axum's `json` feature is not enabled in the workspace).
fn json_body(status: StatusCode, v: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn error(status: StatusCode, error: &str, field: Option<&str>) -> Response {
    json_body(status, &json!({"error": error, "field": field}))
}

/// The response of a failed request.
pub fn error_response(e: &ServeError) -> Response {
    match e {
        ServeError::Invalid(f) => error(StatusCode::BAD_REQUEST, &f.message, Some(&f.field)),
        ServeError::NotFound(f) => error(StatusCode::NOT_FOUND, &f.message, Some(&f.field)),
        ServeError::Busy => error(
            StatusCode::TOO_MANY_REQUESTS,
            "the server is at its concurrency and queue limits; retry later",
            None,
        ),
        ServeError::Deadline => error(
            StatusCode::GATEWAY_TIMEOUT,
            "the request's deadline passed",
            None,
        ),
        ServeError::Internal(m) => error(StatusCode::INTERNAL_SERVER_ERROR, m, None),
    }
}

fn reply(r: Result<serde_json::Value, ServeError>) -> Response {
    match r {
        Ok(v) => json_body(StatusCode::OK, &v),
        Err(e) => error_response(&e),
    }
}

async fn predict(State(s): State<HttpState>, body: Bytes) -> Response {
    let srv = &s.server;
    reply(
        srv.handle("predict", async {
            let t = task::predict_from_json(&body, &srv.options.limits)
                .map_err(ServeError::Invalid)?;
            let p = srv.predict(t).await?;
            Ok(json!({"predictions": p.iter().map(|d| json!({"distribution": d})).collect::<Vec<_>>()}))
        })
        .await,
    )
}

async fn rerank(State(s): State<HttpState>, body: Bytes) -> Response {
    let srv = &s.server;
    reply(
        srv.handle("rerank", async {
            let t = task::rerank_from_json(&body, &srv.options.limits)
                .map_err(ServeError::Invalid)?;
            let r = srv.rerank(t).await?;
            Ok(json!({"results": r.iter().map(|&(i, s)| json!({"index": i, "score": s})).collect::<Vec<_>>()}))
        })
        .await,
    )
}

async fn groups(State(s): State<HttpState>, body: Bytes) -> Response {
    let srv = &s.server;
    reply(
        srv.handle("groups", async {
            let c =
                task::group_from_json(&body, &srv.options.limits).map_err(ServeError::Invalid)?;
            let (id, n) = srv.create_group(c).await?;
            Ok(json!({"group_id": id, "context_size": n}))
        })
        .await,
    )
}

async fn info(State(s): State<HttpState>) -> Response {
    json_body(StatusCode::OK, s.server.info())
}

async fn readyz(State(s): State<HttpState>) -> Response {
    if s.server.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "warming up\n").into_response()
    }
}

async fn metrics(State(s): State<HttpState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        (s.metrics)(),
    )
        .into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such route (see /docs)", None)
}

/// The HTTP routes. Every one but the probes and the API document needs the token `auth`
/// checks (when it has one).
pub fn router(state: HttpState, auth: ServerAuth) -> Router {
    let guarded = Router::new()
        .route("/v1/predict", post(predict))
        .route("/v1/rerank", post(rerank))
        .route("/v1/groups", post(groups))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            auth,
            security::require_token,
        ));
    Router::new()
        .merge(guarded)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route(
            "/openapi.json",
            get(|| async { json_body(StatusCode::OK, &openapi::document()) }),
        )
        .route(
            "/docs",
            get(|| async { axum::response::Html(openapi::DOCS_HTML) }),
        )
        .fallback(not_found)
        .with_state(state)
}
