//! Probes, load, drain, metrics and the OpenAPI document: the routes operators use.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::Serialize;

use super::{ApiResult, ErrorBody};
use crate::metrics::Load;
use crate::registry::Registry;
use crate::registry::runtimes::DocumentFacts;
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
    responses(
        (status = 200, description = "Draining; the load after the change", body = Load),
        (status = 400, description = "`invalid_query`: `move_sessions` is not `true` or `false`", body = ErrorBody),
    ))]
pub async fn drain(
    State(registry): State<Registry>,
    query: Result<axum::extract::Query<DrainQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Load>> {
    let axum::extract::Query(query) = query.map_err(|e| {
        super::ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "invalid_query",
            e.body_text(),
        )
    })?;
    registry.set_draining(true);
    if query.move_sessions == Some(true) {
        let mover = registry.clone();
        tokio::spawn(async move { mover.move_out().await });
    }
    Ok(Json(registry.load()))
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
pub async fn openapi_json(
    State(registry): State<Registry>,
    Extension(doc): Extension<OpenApiJson>,
) -> impl IntoResponse {
    let auth = doc.auth;
    let mut doc = (*doc.doc).clone();
    narrow(&mut doc, &registry.document_facts());
    if auth {
        say_unauthorized(&mut doc);
    }
    ([(header::CONTENT_TYPE, "application/json")], Json(doc))
}

/// The OpenAPI document as the code derives it, made once with the router; each request for
/// it narrows it to this manager (see [`narrow`]).
#[derive(Debug, Clone)]
pub struct OpenApiJson {
    pub doc: std::sync::Arc<serde_json::Value>,
    /// The manager needs a token: every route but the open ones may answer 401.
    pub auth: bool,
}

/// Adds the 401 a token-guarded route answers without the token to every operation that
/// needs one (those not marked open with an empty security requirement).
fn say_unauthorized(doc: &mut serde_json::Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for operation in paths
        .values_mut()
        .filter_map(|p| p.as_object_mut())
        .flat_map(|p| p.values_mut())
    {
        let open = operation["security"].as_array().is_some_and(|s| {
            s.iter()
                .any(|r| r.as_object().is_some_and(|r| r.is_empty()))
        });
        if !open && operation["responses"].is_object() {
            operation["responses"]["401"] = serde_json::json!({
                "description": "`unauthorized`: no `Authorization: Bearer <token>`, or another token",
                "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ErrorBody" } } }
            });
        }
    }
}

/// Narrows the document's bounds to what this manager takes, so that a request the document
/// allows is one the manager serves: the runtimes it runs and each one's languages and
/// memory floor, its memory and deadline ceilings.
pub fn narrow(doc: &mut serde_json::Value, facts: &DocumentFacts) {
    use serde_json::json;
    let schemas = &mut doc["components"]["schemas"];
    for name in ["CreateRequest", "ExecuteRequest"] {
        if let Some(timeout) = schemas[name]["properties"].get_mut("timeout_ms") {
            timeout["maximum"] = json!(facts.max_timeout_ms);
        }
    }
    // What the checks of a create take, where utoipa cannot say it: maps' names and sizes,
    // a tool's name (an ASCII identifier, called from Python), a rule's grammar.
    use crate::registry::request::{MAX_ENV, MAX_ENV_CHARS, MAX_METADATA, MAX_METADATA_CHARS};
    let create = &mut schemas["CreateRequest"]["properties"];
    create["tools"]["propertyNames"] = json!({ "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,63}$" });
    create["tools"]["maxProperties"] = json!(crate::egress::MAX_TOOLS);
    create["env"]["maxProperties"] = json!(MAX_ENV);
    create["env"]["propertyNames"] =
        json!({ "pattern": "^[^=\\u0000]+$", "maxLength": MAX_ENV_CHARS });
    create["env"]["additionalProperties"] =
        json!({ "type": "string", "pattern": "^[^\\u0000]*$", "maxLength": MAX_ENV_CHARS });
    create["metadata"]["maxProperties"] = json!(MAX_METADATA);
    create["metadata"]["propertyNames"] =
        json!({ "minLength": 1, "maxLength": MAX_METADATA_CHARS });
    create["metadata"]["additionalProperties"] =
        json!({ "type": "string", "maxLength": MAX_METADATA_CHARS });
    let label = "[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?";
    // A URL's last label starts with a letter: WHATWG reads `a.0` as an IPv4 address.
    let last = "[A-Za-z]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?";
    let port = "(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?";
    let network = &mut schemas["NetworkRequest"]["properties"];
    network["allow"]["items"] = json!({
        "type": "string",
        "pattern": format!("^(\\*\\.{label}\\.)?{label}(\\.{label})*{port}$"),
    });
    network["allow"]["maxItems"] = json!(crate::egress::policy::MAX_RULES);
    network["max_bytes"]["maximum"] = json!(facts.network_max.0);
    network["max_requests"]["maximum"] = json!(facts.network_max.1);
    schemas["ToolSpec"]["properties"]["url"]["pattern"] = json!(format!(
        "^https?://({label}\\.)*{last}{port}([/?#][!-~]*)?$"
    ));
    if facts.runtimes.is_empty() {
        return;
    }
    let create = &mut schemas["CreateRequest"];
    let mut names: Vec<serde_json::Value> = facts
        .runtimes
        .iter()
        .map(|(name, ..)| json!(name))
        .collect();
    names.push(serde_json::Value::Null);
    create["properties"]["runtime"]["enum"] = serde_json::Value::Array(names);
    create["properties"]["memory_mib"]["maximum"] = json!(facts.max_memory_mib);
    // Each runtime's own languages and memory floor; no runtime named is `python`.
    let rules: Vec<serde_json::Value> = facts
        .runtimes
        .iter()
        .map(|(name, languages, min_mib)| {
            let mut languages: Vec<serde_json::Value> =
                languages.iter().map(|l| json!(l)).collect();
            languages.push(serde_json::Value::Null);
            let mut then = json!({ "properties": { "language": { "enum": languages } } });
            if let Some(min) = min_mib {
                then["properties"]["memory_mib"] = json!({ "minimum": min });
            }
            let named =
                json!({ "required": ["runtime"], "properties": { "runtime": { "const": name } } });
            let condition = if name == "python" {
                json!({ "anyOf": [
                    named,
                    { "not": { "required": ["runtime"] } },
                    { "required": ["runtime"], "properties": { "runtime": { "const": null } } },
                ] })
            } else {
                named
            };
            json!({ "if": condition, "then": then })
        })
        .collect();
    create["allOf"] = serde_json::Value::Array(rules);
}
