//! The HTTP adapter: ARL's `/v1` session API and the RLM sidecar routes, over [`Registry`].
//!
//! Every error is JSON `{"error": {"code", "message"}}` with a 4xx for anything a client did
//! wrong; see the README for the table.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tower_http::trace::TraceLayer;

use crate::registry::{CreateRequest, Registry};
use crate::session::{Info, Limits, Outcome, Session};
use crate::{EndReason, Error};

/// Request bodies larger than this answer 413 unless the router is given another limit.
pub const DEFAULT_BODY_LIMIT: usize = 8 << 20;

/// The manager's routes over `registry`, refusing bodies over `body_limit` bytes.
pub fn router(registry: Registry, body_limit: usize) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/sessions", post(create).get(list))
        .route("/v1/sessions/{id}", get(show).delete(delete))
        .route("/v1/sessions/{id}/execute", post(execute))
        // The RLM sidecar contract (rlm-wasm-sidecar-guide.md), unchanged.
        .route("/session", post(rlm_create))
        .route("/session/{session_id}", axum::routing::delete(rlm_delete))
        .route("/session/{session_id}/execute", post(rlm_execute))
        .route("/sessions", get(rlm_list).delete(rlm_delete_all))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        // Server errors are logged where they arise (`ApiError`); a 503 before the runtime is
        // ready is not one.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_failure(()),
        )
        .with_state(registry)
}

/// One span per request, named by the route it matched (not the raw path with its ids).
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str());
    tracing::info_span!("http", method = %request.method(), route)
}

/// An error as the client sees it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    reason: Option<EndReason>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            reason: None,
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        let (status, code) = match &e {
            Error::UnknownRuntime(..) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_runtime"),
            Error::InvalidRequest(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            Error::Full(_) => (StatusCode::TOO_MANY_REQUESTS, "capacity_exhausted"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "session_not_found"),
            Error::Ended(_) => (StatusCode::GONE, "session_ended"),
            Error::Busy(_) => (StatusCode::CONFLICT, "session_busy"),
            Error::NotReady => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            Error::Io(..) | Error::Instantiate(_) | Error::Engine(_) | Error::Runtime(_) => {
                tracing::error!(error = %e, "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        let reason = match e {
            Error::Ended(reason) => Some(reason),
            _ => None,
        };
        Self {
            status,
            code,
            message,
            reason,
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        let status = r.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "invalid_body"
        };
        ApiError::new(status, code, r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(reason) = &self.reason {
            error["reason"] = json!(reason.to_string());
        }
        let mut response = (self.status, Json(json!({ "error": error }))).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS
            || self.status == StatusCode::SERVICE_UNAVAILABLE
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Parses a JSON body: malformed JSON is 400, a well-formed body of the wrong shape 422. An
/// empty body is `T::default()` when `empty_ok`.
fn parse<T: DeserializeOwned + Default>(
    body: Result<Bytes, BytesRejection>,
    empty_ok: bool,
) -> ApiResult<T> {
    let body = body?;
    if empty_ok && body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                e.to_string(),
            ),
            Category::Syntax | Category::Eof | Category::Io => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body is not valid JSON: {e}"),
            ),
        }
    })
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        "no route matches this path",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(registry): State<Registry>) -> ApiResult<Json<serde_json::Value>> {
    if registry.ready() {
        Ok(Json(json!({ "status": "ready" })))
    } else {
        Err(Error::NotReady.into())
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// A session as `/v1` shows it.
#[derive(Debug, Serialize)]
pub struct SessionView {
    pub id: String,
    pub runtime: String,
    pub state: &'static str,
    pub created_at: String,
    pub last_used_at: String,
    pub executions: u64,
    pub memory_bytes: u64,
    pub limits: LimitsView,
}

/// Limits as `/v1` shows them.
#[derive(Debug, Serialize)]
pub struct LimitsView {
    pub timeout_ms: u64,
    pub memory_mib: u64,
    pub output_bytes: usize,
    pub idle_ttl_s: u64,
    pub lifetime_s: u64,
}

impl From<Limits> for LimitsView {
    fn from(l: Limits) -> Self {
        Self {
            timeout_ms: l.timeout.as_millis() as u64,
            memory_mib: l.memory_bytes >> 20,
            output_bytes: l.output_bytes,
            idle_ttl_s: l.idle_ttl.as_secs(),
            lifetime_s: l.lifetime.as_secs(),
        }
    }
}

impl From<Info> for SessionView {
    fn from(i: Info) -> Self {
        Self {
            id: i.id,
            runtime: i.runtime,
            state: i.phase.name(),
            created_at: rfc3339(i.created_at),
            last_used_at: rfc3339(i.last_used_at),
            executions: i.executions,
            memory_bytes: i.memory_bytes,
            limits: i.limits.into(),
        }
    }
}

async fn create(
    State(registry): State<Registry>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let request: CreateRequest = parse(body, true)?;
    let session = registry.create(request).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": session.id,
            "runtime": session.runtime,
            "created_at": rfc3339(session.created_at),
            "limits": LimitsView::from(session.limits),
        })),
    ))
}

async fn list(State(registry): State<Registry>) -> Json<serde_json::Value> {
    let sessions: Vec<SessionView> = registry.list().into_iter().map(Into::into).collect();
    Json(json!({ "sessions": sessions }))
}

async fn show(
    State(registry): State<Registry>,
    Path(id): Path<String>,
) -> ApiResult<Json<SessionView>> {
    Ok(Json(registry.get(&id)?.info().into()))
}

async fn delete(State(registry): State<Registry>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    registry.delete(&id)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecuteRequest {
    code: String,
    timeout_ms: Option<u64>,
}

/// What an execution returns on `/v1`.
#[derive(Debug, Serialize)]
pub struct ExecuteResponse {
    pub stdout: String,
    pub stderr: String,
    pub result: Option<String>,
    pub error: Option<arl_runtimes::GuestError>,
    pub duration_ms: f64,
    pub truncated: bool,
    pub session_ended: bool,
    /// Why the session ended, when this execution ended it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
}

impl From<Outcome> for ExecuteResponse {
    fn from(o: Outcome) -> Self {
        Self {
            stdout: o.stdout,
            stderr: o.stderr,
            result: o.result,
            error: o.error,
            duration_ms: o.duration.as_secs_f64() * 1e3,
            truncated: o.truncated,
            session_ended: o.ended.is_some(),
            end_reason: o.ended.map(|r| r.to_string()),
        }
    }
}

async fn run(
    registry: &Registry,
    id: &str,
    code: String,
    timeout_ms: Option<u64>,
) -> ApiResult<Outcome> {
    let session: Arc<Session> = registry.get(id)?;
    let max = registry.config().max_timeout;
    let timeout = match timeout_ms {
        Some(0) => {
            return Err(Error::InvalidRequest("timeout_ms must be at least 1".into()).into());
        }
        Some(ms) if Duration::from_millis(ms) > max => {
            return Err(Error::InvalidRequest(format!(
                "timeout_ms must be at most {}",
                max.as_millis()
            ))
            .into());
        }
        other => other.map(Duration::from_millis),
    };
    Ok(session.execute(code, timeout).await?)
}

async fn execute(
    State(registry): State<Registry>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<ExecuteResponse>> {
    let request: ExecuteRequest = parse(body, false)?;
    let outcome = run(&registry, &id, request.code, request.timeout_ms).await?;
    Ok(Json(outcome.into()))
}

// ---- The RLM sidecar routes: any content type, unknown fields ignored. ----

#[derive(Debug, Default, Deserialize)]
struct RlmCreate {
    runtime: Option<String>,
    timeout_ms: Option<u64>,
    memory_mib: Option<u64>,
    env: Option<std::collections::BTreeMap<String, String>>,
}

async fn rlm_create(
    State(registry): State<Registry>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let r: RlmCreate = parse(body, true)?;
    let request = CreateRequest {
        runtime: r.runtime,
        timeout_ms: r.timeout_ms,
        memory_mib: r.memory_mib,
        env: r.env,
    };
    let session = registry.create(request).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "session_id": session.id,
            "status": "created",
            "runtime": session.runtime,
            "created_at": rfc3339(session.created_at),
        })),
    ))
}

#[derive(Debug, Default, Deserialize)]
struct RlmExecute {
    code: String,
    timeout_ms: Option<u64>,
}

async fn rlm_execute(
    State(registry): State<Registry>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let request: RlmExecute = parse(body, false)?;
    let o = run(&registry, &id, request.code, request.timeout_ms).await?;
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
    Ok(Json(json!({
        "session_id": id,
        "success": o.error.is_none(),
        "output": output,
        "result": o.result,
        "stdout": o.stdout,
        "stderr": o.stderr,
        "error": error,
        "execution_time_ms": o.duration.as_secs_f64() * 1e3,
        "truncated": o.truncated,
        "session_ended": o.ended.is_some(),
    })))
}

async fn rlm_delete(
    State(registry): State<Registry>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    registry.delete(&id)?;
    Ok(Json(json!({ "session_id": id, "status": "deleted" })))
}

async fn rlm_list(State(registry): State<Registry>) -> Json<serde_json::Value> {
    let sessions: Vec<_> = registry
        .list()
        .into_iter()
        .map(|i| {
            json!({
                "session_id": i.id,
                "runtime": i.runtime,
                "state": i.phase.name(),
                "created_at": rfc3339(i.created_at),
                "executions": i.executions,
            })
        })
        .collect();
    Json(json!({ "count": sessions.len(), "sessions": sessions }))
}

async fn rlm_delete_all(State(registry): State<Registry>) -> Json<serde_json::Value> {
    Json(json!({ "deleted": registry.delete_all(), "status": "deleted" }))
}

/// Serves `router` on `listener` with TCP_NODELAY on every connection (small JSON answers
/// must not wait for delayed ACKs), until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
