//! The RLM sidecar contract (rlm-wasm-sidecar-guide.md), unchanged: any content type, unknown
//! fields ignored, the guide's field names.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{ApiResult, ErrorBody, parse};
use crate::registry::{CreateRequest, Registry, Target};
use crate::rfc3339;

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct RlmCreate {
    pub runtime: Option<String>,
    pub timeout_ms: Option<u64>,
    pub memory_mib: Option<u64>,
    pub env: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RlmCreated {
    pub session_id: String,
    /// Always `created`.
    pub status: &'static str,
    pub runtime: String,
    pub created_at: String,
}

/// Creates a session (RLM sidecar route).
#[utoipa::path(post, path = "/session", operation_id = "rlm_create_session", tag = "rlm",
    request_body(content = Option<RlmCreate>, content_type = "application/json"),
    responses(
        (status = 201, description = "Created", body = RlmCreated),
        (status = 422, description = "`invalid_request` or `unknown_runtime`", body = ErrorBody),
        (status = 429, description = "`capacity_exhausted`", body = ErrorBody),
        (status = 503, description = "`not_ready`, `draining` or `shutting_down`", body = ErrorBody),
    ))]
pub async fn create(
    State(registry): State<Registry>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<RlmCreated>)> {
    let r: RlmCreate = parse(body, true)?;
    let request = CreateRequest {
        runtime: r.runtime,
        timeout_ms: r.timeout_ms,
        memory_mib: r.memory_mib,
        env: r.env,
        ..CreateRequest::default()
    };
    let session = registry.create(request).await?;
    Ok((
        StatusCode::CREATED,
        Json(RlmCreated {
            session_id: session.id.clone(),
            status: "created",
            runtime: session.runtime.clone(),
            created_at: rfc3339(session.created_at()),
        }),
    ))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct RlmExecute {
    pub code: String,
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RlmExecuted {
    pub session_id: String,
    /// No exception, no end of the session.
    pub success: bool,
    /// stdout, then the result's repr on its own line.
    pub output: String,
    pub result: Option<String>,
    pub stdout: String,
    pub stderr: String,
    /// The traceback (or `Type: message`) of an uncaught exception.
    pub error: Option<String>,
    pub execution_time_ms: f64,
    pub truncated: bool,
    pub session_ended: bool,
}

/// Runs code in a session (RLM sidecar route).
#[utoipa::path(post, path = "/session/{session_id}/execute", operation_id = "rlm_execute", tag = "rlm",
    params(("session_id" = String, Path, description = "The session's id")),
    request_body(content = RlmExecute, content_type = "application/json"),
    responses(
        (status = 200, description = "The outcome", body = RlmExecuted),
        (status = 404, description = "`session_not_found`", body = ErrorBody),
        (status = 409, description = "`session_busy`", body = ErrorBody),
        (status = 410, description = "`session_ended`", body = ErrorBody),
    ))]
pub async fn execute(
    State(registry): State<Registry>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<RlmExecuted>> {
    let request: RlmExecute = parse(body, false)?;
    let Target { session, timeout } = registry.target(&id, request.timeout_ms).await?;
    let o = session.execute(request.code, timeout, None).await?;
    let mut output = o.stdout.clone();
    if let Some(result) = &o.result {
        output.push_str(result);
        output.push('\n');
    }
    let error = o.error.as_ref().map(|e| {
        if e.traceback.is_empty() {
            format!("{}: {}", e.kind, e.message)
        } else {
            e.traceback.clone()
        }
    });
    Ok(Json(RlmExecuted {
        session_id: id,
        success: o.error.is_none(),
        output,
        result: o.result,
        stdout: o.stdout,
        stderr: o.stderr,
        error,
        execution_time_ms: o.duration.as_secs_f64() * 1e3,
        truncated: o.truncated,
        session_ended: o.ended.is_some(),
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RlmDeleted {
    pub session_id: String,
    /// Always `deleted`.
    pub status: &'static str,
}

/// Ends a session (RLM sidecar route).
#[utoipa::path(delete, path = "/session/{session_id}", operation_id = "rlm_delete_session", tag = "rlm",
    params(("session_id" = String, Path, description = "The session's id")),
    responses(
        (status = 200, description = "Deleted", body = RlmDeleted),
        (status = 404, description = "`session_not_found`", body = ErrorBody),
    ))]
pub async fn delete(
    State(registry): State<Registry>,
    Path(id): Path<String>,
) -> ApiResult<Json<RlmDeleted>> {
    registry.delete(&id).await?;
    Ok(Json(RlmDeleted {
        session_id: id,
        status: "deleted",
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RlmSession {
    pub session_id: String,
    pub runtime: String,
    pub state: &'static str,
    pub created_at: String,
    pub executions: u64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RlmSessions {
    pub count: usize,
    pub sessions: Vec<RlmSession>,
}

/// Live sessions (RLM sidecar route).
#[utoipa::path(get, path = "/sessions", operation_id = "rlm_list_sessions", tag = "rlm",
    responses((status = 200, description = "Live sessions", body = RlmSessions)))]
pub async fn list(State(registry): State<Registry>) -> Json<RlmSessions> {
    let sessions: Vec<_> = registry
        .list()
        .into_iter()
        .map(|i| RlmSession {
            session_id: i.id,
            runtime: i.runtime,
            state: i.state.name(),
            created_at: rfc3339(i.created_at),
            executions: i.executions,
        })
        .collect();
    Json(RlmSessions {
        count: sessions.len(),
        sessions,
    })
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RlmDeletedAll {
    pub deleted: usize,
    /// Always `deleted`.
    pub status: &'static str,
}

/// Ends every session (RLM sidecar route).
#[utoipa::path(delete, path = "/sessions", operation_id = "rlm_delete_all_sessions", tag = "rlm",
    responses((status = 200, description = "How many were deleted", body = RlmDeletedAll)))]
pub async fn delete_all(State(registry): State<Registry>) -> Json<RlmDeletedAll> {
    Json(RlmDeletedAll {
        deleted: registry.delete_all(),
        status: "deleted",
    })
}
