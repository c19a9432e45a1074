//! The HTTP adapter over [`Registry`]: ARL's `/v1` API (sessions, streaming execute, files,
//! load, drain), the RLM sidecar routes, the E2B and SandboxFusion routes, MCP at `/mcp`,
//! `/metrics` and `/openapi.json`.
//!
//! Routes are registered through `utoipa-axum`, so the OpenAPI document is made from the same
//! declarations that route requests. Every error is JSON `{"error": {"code", "message"}}`
//! with a 4xx for anything a client did wrong; the README has the table.

mod e2b;
mod files;
mod fusion;
mod mcp;
pub(crate) mod ops;
mod rlm;
mod sessions;
mod snapshots;

use std::sync::Arc;

use arl_serve::Bearer;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::Error;
use crate::registry::Registry;

/// Request bodies larger than this answer 413 unless the router is given another limit.
/// File uploads are bounded by the workspace quota instead.
pub const DEFAULT_BODY_LIMIT: usize = 8 << 20;

/// Routes that answer without a token: probes cannot send one.
const OPEN_ROUTES: [&str; 3] = ["/healthz", "/readyz", "/v1/ping"];

/// How the router is set up.
#[derive(Debug, Clone)]
pub struct RouterOptions {
    /// Largest JSON request body, in bytes.
    pub body_limit: usize,
    /// The token every route but the probes needs.
    pub auth: Bearer,
}

impl Default for RouterOptions {
    fn default() -> Self {
        Self {
            body_limit: DEFAULT_BODY_LIMIT,
            auth: Bearer::default(),
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "arl-manager",
        description = "Stateful Python sandboxes in WebAssembly, one session per sandbox. \
                       When the manager runs with --auth-token, every route but /healthz and \
                       /readyz needs `Authorization: Bearer <token>`."
    ),
    // The file routes take a path with slashes (`{*path}` in axum), so they are routed by
    // hand in `router` and only described here.
    paths(files::upload, files::download, files::remove),
    modifiers(&BearerToken),
    tags(
        (name = "sessions", description = "Sessions and their executions"),
        (name = "files", description = "Files in a session's /workspace"),
        (name = "state", description = "Fork, snapshot, restore, export, import and history"),
        (name = "operations", description = "Probes, load, drain, metrics"),
        (name = "rlm", description = "The RLM sidecar contract, unchanged"),
        (name = "e2b", description = "E2B's control plane and code interpreter, for its SDK"),
        (name = "sandbox-fusion", description = "SandboxFusion's run_code contract, for verl and tinker-cookbook"),
    )
)]
struct ApiDoc;

struct BearerToken;

impl utoipa::Modify for BearerToken {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        doc.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
    }
}

/// Every documented route. An import carries a whole session, so its body is bounded by
/// `import_limit` (what the manager would hold), not by the JSON body limit.
fn documented(import_limit: usize) -> OpenApiRouter<Registry> {
    let import = OpenApiRouter::new()
        .routes(routes!(snapshots::import))
        .layer(DefaultBodyLimit::max(import_limit));
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(import)
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::load))
        .routes(routes!(ops::drain, ops::undrain))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::openapi_json))
        .routes(routes!(sessions::create, sessions::list))
        .routes(routes!(sessions::show, sessions::delete))
        .routes(routes!(sessions::suspend))
        .routes(routes!(sessions::resume))
        .routes(routes!(sessions::execute))
        .routes(routes!(snapshots::fork))
        .routes(routes!(snapshots::snapshot))
        .routes(routes!(snapshots::export))
        .routes(routes!(snapshots::history))
        .routes(routes!(snapshots::list))
        .routes(routes!(snapshots::show, snapshots::delete))
        .routes(routes!(files::list))
        .routes(routes!(rlm::create))
        .routes(routes!(rlm::delete))
        .routes(routes!(rlm::execute))
        .routes(routes!(rlm::list, rlm::delete_all))
        .routes(routes!(fusion::run_code))
        .routes(routes!(fusion::ping))
        .routes(routes!(fusion::run_code_with_token))
        .routes(routes!(fusion::run_jupyter))
        .routes(routes!(fusion::run_jupyter_with_token))
        .routes(routes!(fusion::ping_with_token))
        .routes(routes!(e2b::create, e2b::list))
        .routes(routes!(e2b::create_v1))
        .routes(routes!(e2b::connect))
        .routes(routes!(e2b::connect_v1))
        .routes(routes!(e2b::set_timeout))
        .routes(routes!(e2b::pause))
        .routes(routes!(e2b::fork))
        .routes(routes!(e2b::info, e2b::kill))
        .routes(routes!(e2b::execute))
        .routes(routes!(e2b::create_context, e2b::list_contexts))
        .routes(routes!(e2b::remove_context))
        .routes(routes!(e2b::restart_context))
        .routes(routes!(e2b::read_file, e2b::write_files))
        .routes(routes!(e2b::filesystem))
        .routes(routes!(e2b::health))
        .routes(routes!(e2b::process))
}

/// The OpenAPI document of every route, as `/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    documented(usize::MAX).split_for_parts().1
}

/// The manager's routes over `registry`.
pub fn router(registry: Registry, options: RouterOptions) -> Router {
    let (routes, mut doc) = documented(registry.import_limit()).split_for_parts();
    let auth = options.auth;
    if !auth.required() {
        // The document says what this server does: without a token, no route needs one.
        doc.security = None;
        if let Some(components) = doc.components.as_mut() {
            components.security_schemes.clear();
        }
    }
    // MCP's streamable HTTP transport; behind a token it takes any `Host`, as the manager's
    // other routes do.
    let mcp = mcp::service(registry.clone(), auth.required());
    routes
        .route(
            "/v1/sessions/{id}/files/{*path}",
            axum::routing::put(files::upload)
                .get(files::download)
                .delete(files::remove),
        )
        .nest_service("/mcp", mcp)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(Extension(ops::OpenApiJson {
            doc: Arc::new(serde_json::to_value(&doc).unwrap_or_default()), // it serializes
            auth: auth.required(),
        }))
        .layer(DefaultBodyLimit::max(options.body_limit))
        .layer(middleware::from_fn(move |r: Request, next: Next| {
            let path = r.uri().path();
            let headers = r.headers();
            // E2B's SDK sends the token as its API key, or as the sandbox's access or traffic
            // token.
            let e2b_key = e2b::KEYS
                .into_iter()
                .filter_map(|h| headers.get(h))
                .any(|key| auth.allows_key(key.as_bytes()));
            let allowed = OPEN_ROUTES.contains(&path)
                || e2b_key
                || auth.allows_request(
                    path,
                    headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
                );
            async move {
                if allowed {
                    next.run(r).await
                } else {
                    unauthorized()
                }
            }
        }))
        .layer(middleware::from_fn_with_state(registry.clone(), count))
        // Server errors are logged where they arise (`ApiError`); a 503 before the runtime is
        // ready is not one.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_failure(()),
        )
        .with_state(registry)
}

fn unauthorized() -> Response {
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "this manager needs `Authorization: Bearer <token>` (its --auth-token)",
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Counts every answered request by method, matched route and status.
async fn count(State(registry): State<Registry>, request: Request, next: Next) -> Response {
    let method = method_label(request.method());
    let route = route_of(&request).to_owned();
    let response = next.run(request).await;
    registry
        .metrics()
        .http_request(method, &route, response.status().as_u16());
    response
}

/// A method as a metrics label: the standard ones by name, any other as `other`, so that
/// made-up methods (sent by anyone, token or not) cannot add series without bound.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

fn route_of<B>(request: &axum::http::Request<B>) -> &str {
    request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
}

/// One span per request, named by the route it matched (not the raw path with its ids).
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    tracing::info_span!("http", method = %request.method(), route = route_of(request))
}

/// The body of every error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `session_not_found`, `session_ended`, `invalid_path`, ...
    pub code: &'static str,
    /// For people.
    pub message: String,
    /// Why the session ended, on `session_ended` (`idle`, `lost`, ...); the manager (its id
    /// prefix) that holds the session now, on `session_moved`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An error as the client sees it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    reason: Option<String>,
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

    fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message.clone(),
                reason: self.reason.clone(),
            },
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let message = e.public_message();
        let (status, code) = match &e {
            e if e.exhausted().is_some() => {
                tracing::error!(error = %e, "out of resources");
                (StatusCode::SERVICE_UNAVAILABLE, "resources_exhausted")
            }
            Error::UnknownRuntime(..) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_runtime"),
            Error::UnknownLanguage(..) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_language"),
            Error::InvalidRequest(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            Error::Full(_) => (StatusCode::TOO_MANY_REQUESTS, "capacity_exhausted"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "session_not_found"),
            Error::SnapshotNotFound(_) => (StatusCode::NOT_FOUND, "snapshot_not_found"),
            Error::BadSnapshot(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_snapshot"),
            Error::ModuleMismatch(..) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "snapshot_module_mismatch")
            }
            Error::Refused(_) => (StatusCode::CONFLICT, "snapshot_refused"),
            Error::Moved(_) => (StatusCode::MISDIRECTED_REQUEST, "session_moved"),
            Error::StoreUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            Error::Ended(_) => (StatusCode::GONE, "session_ended"),
            Error::Busy(_) => (StatusCode::CONFLICT, "session_busy"),
            Error::NotReady => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            Error::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
            Error::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            Error::BadPath(..) => (StatusCode::BAD_REQUEST, "invalid_path"),
            Error::FileNotFound(_) => (StatusCode::NOT_FOUND, "file_not_found"),
            Error::QuotaExceeded(_) | Error::DiskFull(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "quota_exceeded")
            }
            Error::Io(..) | Error::Instantiate(_) | Error::Engine(_) | Error::Runtime(_) => {
                tracing::error!(error = %e, "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        let reason = match e {
            Error::Ended(reason) => Some(reason.to_string()),
            Error::Moved(owner) => Some(owner),
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
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS
            || matches!(
                self.code,
                "not_ready" | "resources_exhausted" | "store_unavailable"
            )
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
/// empty body (or `null`) is `T::default()` when `empty_ok`.
fn parse<T: DeserializeOwned + Default>(
    body: Result<Bytes, BytesRejection>,
    empty_ok: bool,
) -> ApiResult<T> {
    let body = body?;
    if empty_ok && (body.iter().all(u8::is_ascii_whitespace) || body.trim_ascii() == b"null") {
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
