//! Probes, load, drain, metrics and the OpenAPI document: the routes operators use.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use bytes::Bytes;
use serde::Serialize;

use super::{ApiResult, ErrorBody};
use crate::metrics::Load;
use crate::registry::Registry;
use crate::{Error, metrics};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Status {
    /// `ok` for /healthz, `ready` for /readyz.
    pub status: &'static str,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", operation_id = "healthz", tag = "operations", security(()),
    responses((status = 200, description = "Alive", body = Status)))]
pub async fn healthz() -> Json<Status> {
    Json(Status { status: "ok" })
}

/// Readiness: a runtime is loaded, so sessions can be made. Stays ready while draining, so
/// that the operator can still reach the pod to watch it empty.
#[utoipa::path(get, path = "/readyz", operation_id = "readyz", tag = "operations", security(()),
    responses(
        (status = 200, description = "Ready", body = Status),
        (status = 503, description = "The runtime is still loading (`not_ready`)", body = ErrorBody),
    ))]
pub async fn readyz(State(registry): State<Registry>) -> ApiResult<Json<Status>> {
    if registry.ready() {
        Ok(Json(Status { status: "ready" }))
    } else {
        Err(Error::NotReady.into())
    }
}

/// The manager's load: what the operator places and scales on.
#[utoipa::path(get, path = "/v1/load", operation_id = "get_load", tag = "operations",
    responses((status = 200, description = "Current load", body = Load)))]
pub async fn load(State(registry): State<Registry>) -> Json<Load> {
    Json(registry.load())
}

/// How a drain treats the sessions already here.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DrainQuery {
    /// `true`: hand every session to the managers sharing the store (each is suspended with
    /// no owner; the next request through a gateway resumes it on another manager, under the
    /// same id). `false` (the default): they carry on here until they end.
    pub move_sessions: Option<bool>,
}

/// Starts draining: new sessions answer 503 `draining`; existing ones continue, or are moved
/// out through the store (`move_sessions=true`, in the background: the load shows them go).
/// Idempotent.
#[utoipa::path(post, path = "/v1/drain", operation_id = "drain", tag = "operations",
    params(DrainQuery),
    responses((status = 200, description = "Draining; the load after the change", body = Load)))]
pub async fn drain(
    State(registry): State<Registry>,
    axum::extract::Query(query): axum::extract::Query<DrainQuery>,
) -> Json<Load> {
    registry.set_draining(true);
    if query.move_sessions == Some(true) {
        let mover = registry.clone();
        tokio::spawn(async move { mover.move_out().await });
    }
    Json(registry.load())
}

/// Stops draining: new sessions are taken again.
#[utoipa::path(delete, path = "/v1/drain", operation_id = "undrain", tag = "operations",
    responses((status = 200, description = "Not draining; the load after the change", body = Load)))]
pub async fn undrain(State(registry): State<Registry>) -> Json<Load> {
    registry.set_draining(false);
    Json(registry.load())
}

/// Prometheus metrics in the OpenMetrics text format; the README lists the names.
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "operations",
    responses((status = 200, description = "OpenMetrics text",
        content_type = "application/openmetrics-text", body = String)))]
pub async fn metrics(State(registry): State<Registry>) -> impl IntoResponse {
    let text = registry.metrics().render(&registry.load());
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text)
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", operation_id = "openapi", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of every route",
        content_type = "application/json")))]
pub async fn openapi_json(Extension(doc): Extension<OpenApiJson>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], doc.0)
}

/// The OpenAPI document, serialized once when the router is made.
#[derive(Debug, Clone)]
pub struct OpenApiJson(pub Bytes);
