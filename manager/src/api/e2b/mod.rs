//! E2B's wire contract, as the unmodified `e2b-code-interpreter` SDK sends it with `E2B_API_URL`
//! and `E2B_SANDBOX_URL` both pointing here: the control plane (create, connect, list, info,
//! timeout, kill), the code interpreter (`POST /execute`, contexts) and envd ([`envd`]). A
//! sandbox is a session; its id is the session's, and its home `/home/user` is the session's
//! `/workspace`.
//!
//! Errors answer in E2B's shape, `{"code": <status>, "message"}`.

mod contexts;
mod envd;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use contexts::{
    __path_create_context, __path_list_contexts, __path_remove_context, __path_restart_context,
    create_context, list_contexts, remove_context, restart_context,
};
pub use envd::{
    __path_filesystem, __path_health, __path_process, __path_read_file, __path_write_files,
    filesystem, health, process, read_file, write_files,
};

use super::sessions::{Piece, pieces};
use crate::output::Stream;
use crate::registry::{CreateRequest, MAX_TTL_SECS, Registry};
use crate::session::{Info, Live, Session, TurnStream};
use crate::{Error, Outcome, rfc3339};

/// The headers E2B's SDK authenticates with: the API key on the control plane, the sandbox's
/// access token on envd's calls and `/execute`, its traffic token on the code interpreter's
/// (contexts). Each may carry the manager's token.
pub const API_KEY: &str = "x-api-key";
pub const KEYS: [&str; 3] = [API_KEY, "x-access-token", "e2b-traffic-access-token"];

/// The header that names the sandbox a code-interpreter or envd call is for.
pub const SANDBOX_HEADER: &str = "e2b-sandbox-id";

/// The envd version ARL reports: past 0.4.0, the SDK sends no `username` and no Basic auth.
const ENVD_VERSION: &str = "0.4.0";

/// E2B templates that mean ARL's Python runtime; the first is the one sandboxes list with.
const PYTHON_TEMPLATES: [&str; 3] = ["code-interpreter-v1", "code-interpreter", "base"];

/// What the SDK sends to create a sandbox; other fields (`autoPause`, `secure`,
/// `allow_internet_access`, ...) are accepted and unused.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    /// `code-interpreter-v1` (the SDK's default), `base` or `python`: Python; another runtime
    /// this manager serves by its name.
    #[serde(rename = "templateID")]
    pub template_id: Option<String>,
    /// Seconds the sandbox lives (the session's lifetime); E2B's default is 300.
    pub timeout: Option<u64>,
    /// The guest's environment.
    pub env_vars: Option<BTreeMap<String, String>>,
    /// Labels, listed with the sandbox and filtered on by `GET /v2/sandboxes?metadata=`.
    pub metadata: Option<BTreeMap<String, String>>,
    /// `network={"allow_out": [...]}`: the hosts the sandbox's code may reach.
    pub network: Option<NetworkOut>,
}

/// E2B's egress rules as ARL keeps them: `allowOut` is the session's allow-list (a host, a
/// `*.` domain, an address, with an optional port; an address may carry `/32` or `/128`).
/// Everything not allowed is denied, so `denyOut` adds nothing; without `allowOut` the
/// sandbox has no network (ARL's default, where E2B's is the open internet).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkOut {
    pub allow_out: Option<Vec<String>>,
}

impl NetworkOut {
    fn policy(self) -> Option<crate::egress::NetworkRequest> {
        let allow = self.allow_out?;
        let allow = allow
            .into_iter()
            .map(|rule| {
                let bare = rule
                    .strip_suffix("/32")
                    .or_else(|| rule.strip_suffix("/128"));
                bare.map_or(rule.clone(), str::to_owned)
            })
            .collect();
        Some(crate::egress::NetworkRequest {
            allow,
            ..Default::default()
        })
    }
}

/// What the SDK reads back from a create or a connect.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxCreated {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: &'static str,
    pub envd_version: &'static str,
    /// The token the SDK sends back on `/execute` (`X-Access-Token`): the manager's own, which
    /// the caller presented to create the sandbox; `null` without one.
    pub envd_access_token: Option<String>,
    /// The same token, which the SDK sends on its context calls (`E2B-Traffic-Access-Token`).
    pub traffic_access_token: Option<String>,
}

/// A sandbox as `GET /sandboxes/{id}` and `GET /v2/sandboxes` show it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxDetail {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: &'static str,
    /// RFC 3339.
    pub started_at: String,
    /// When the sandbox ends (RFC 3339): its start and lifetime, moved by `set_timeout`.
    pub end_at: String,
    /// One: a session's turns run one at a time.
    pub cpu_count: u32,
    /// The session's memory limit.
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    /// The session's disk quota.
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    /// Always `running`: ARL does not pause sandboxes.
    pub state: &'static str,
    pub envd_version: &'static str,
    pub metadata: BTreeMap<String, String>,
    /// On `GET /sandboxes/{id}` only, as on a create.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
}

/// An error in E2B's shape, `{"code": <status>, "message"}`.
pub struct E2bError(StatusCode, String);

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let body = json!({ "code": self.0.as_u16(), "message": self.1 });
        (self.0, Json(body)).into_response()
    }
}

/// [`Error`] as E2B's clients expect it: the HTTP status ARL's own API would give.
impl From<Error> for E2bError {
    fn from(e: Error) -> Self {
        let api = super::ApiError::from(e);
        E2bError(api.status, api.message)
    }
}

/// What an E2B handler answers: its response, or an error in E2B's shape.
pub type E2bResult = Result<Response, E2bError>;

/// Refuses a request with `status` and why.
fn refuse<T>(status: StatusCode, message: impl Into<String>) -> Result<T, E2bError> {
    Err(E2bError(status, message.into()))
}

/// A request's JSON body, or E2B's 400.
fn body<T: serde::de::DeserializeOwned + Default>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, E2bError> {
    super::parse(body, true).map_err(|e| E2bError(StatusCode::BAD_REQUEST, e.message))
}

/// The key the caller authenticated with (the manager's token, when it has one): it comes back
/// as the sandbox's access token, which the SDK then sends on `/execute`.
fn access_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get(API_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The session named by `E2b-Sandbox-Id`.
async fn sandbox(registry: &Registry, headers: &HeaderMap) -> Result<Live, E2bError> {
    let id = headers
        .get(SANDBOX_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            E2bError(
                StatusCode::BAD_REQUEST,
                "name the sandbox in E2b-Sandbox-Id".into(),
            )
        })?;
    Ok(registry.get(id).await?)
}

/// The runtime an E2B template means.
fn runtime_of(template: &str) -> &str {
    if PYTHON_TEMPLATES.contains(&template) {
        "python"
    } else {
        template
    }
}

/// The template a session lists with: E2B's name for Python, otherwise its runtime's.
fn template_of(runtime: &str) -> String {
    match runtime {
        "python" => PYTHON_TEMPLATES[0].to_owned(),
        other => other.to_owned(),
    }
}

/// The sandbox's lifetime from now (`timeout` in seconds), as a create's would be checked.
fn lifetime(timeout: u64) -> Result<Duration, E2bError> {
    if timeout == 0 || timeout > MAX_TTL_SECS {
        return Err(E2bError(
            StatusCode::BAD_REQUEST,
            format!("timeout must be between 1 and {MAX_TTL_SECS} seconds"),
        ));
    }
    Ok(Duration::from_secs(timeout))
}

fn created(session: &Session, headers: &HeaderMap) -> SandboxCreated {
    SandboxCreated {
        template_id: template_of(&session.runtime),
        sandbox_id: session.id.clone(),
        client_id: "arl",
        envd_version: ENVD_VERSION,
        envd_access_token: access_token(headers),
        traffic_access_token: access_token(headers),
    }
}

fn detail(info: Info, token: Option<String>) -> SandboxDetail {
    let end = info.created_at + info.limits.lifetime;
    SandboxDetail {
        template_id: template_of(&info.runtime),
        sandbox_id: info.id,
        client_id: "arl",
        started_at: rfc3339(info.created_at),
        end_at: rfc3339(end),
        cpu_count: 1,
        memory_mb: info.limits.memory_bytes >> 20,
        disk_size_mb: info.limits.workspace_bytes >> 20,
        state: "running",
        envd_version: ENVD_VERSION,
        metadata: (*info.metadata).clone(),
        envd_access_token: token,
    }
}

/// Creates a sandbox (`POST /v2/sandboxes`; e2b 2.7 sends `POST /sandboxes`). A warm session
/// serves it unless it sets `envVars`.
#[utoipa::path(post, path = "/v2/sandboxes", operation_id = "e2b_create_sandbox", tag = "e2b",
    request_body(content = NewSandbox, content_type = "application/json"),
    responses(
        (status = 201, description = "Created", body = SandboxCreated),
        (status = 400, description = "An unknown template or a malformed body", body = Object),
        (status = 429, description = "No room", body = Object),
    ))]
pub async fn create(
    State(registry): State<Registry>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult {
    let new: NewSandbox = self::body(body)?;
    let template = new
        .template_id
        .unwrap_or_else(|| PYTHON_TEMPLATES[0].to_owned());
    let runtime = runtime_of(&template).to_owned();
    if !registry.has_runtime(&runtime) {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "template `{template}` is not served here: use code-interpreter-v1 (Python) \
                 or one of this manager's runtimes"
            ),
        );
    }
    let request = CreateRequest {
        runtime: Some(runtime),
        lifetime_secs: new.timeout,
        env: new.env_vars,
        metadata: new.metadata,
        network: new.network.and_then(NetworkOut::policy),
        ..CreateRequest::default()
    };
    let session = registry.create(request).await?;
    Ok((StatusCode::CREATED, Json(created(&session, &headers))).into_response())
}

/// Creates a sandbox as e2b 2.7's SDK asks for one (`POST /sandboxes`).
#[utoipa::path(post, path = "/sandboxes", operation_id = "e2b_create_sandbox_v1", tag = "e2b",
    request_body(content = NewSandbox, content_type = "application/json"),
    responses((status = 201, description = "Created", body = SandboxCreated)))]
pub async fn create_v1(
    state: State<Registry>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult {
    create(state, headers, body).await
}

/// What `Sandbox.connect` and `set_timeout` send.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct Timeout {
    /// Seconds from now until the sandbox ends; unchanged when absent (connect only).
    pub timeout: Option<u64>,
}

/// Connects to a running sandbox (`Sandbox.connect`), moving its end to `timeout` seconds from
/// now when given.
#[utoipa::path(post, path = "/v2/sandboxes/{id}/connect", operation_id = "e2b_connect", tag = "e2b",
    params(("id" = String, Path, description = "The sandbox's id")),
    request_body(content = Timeout, content_type = "application/json"),
    responses(
        (status = 200, description = "The sandbox", body = SandboxCreated),
        (status = 404, description = "No such sandbox", body = Object),
    ))]
pub async fn connect(
    State(registry): State<Registry>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult {
    let asked: Timeout = self::body(body)?;
    let session = registry.get(&id).await?;
    if let Some(timeout) = asked.timeout {
        session.end_in(lifetime(timeout)?);
    }
    Ok(Json(created(&session, &headers)).into_response())
}

/// Pauses a sandbox (`Sandbox.beta_pause`): it is suspended to the store, and a connect (or
/// any request) resumes it.
#[utoipa::path(post, path = "/sandboxes/{id}/pause", operation_id = "e2b_pause", tag = "e2b",
    params(("id" = String, Path, description = "The sandbox's id")),
    responses(
        (status = 204, description = "Paused"),
        (status = 404, description = "No such sandbox", body = Object),
    ))]
pub async fn pause(State(registry): State<Registry>, Path(id): Path<String>) -> E2bResult {
    registry.suspend(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Connects as e2b 2.7's SDK does (`POST /sandboxes/{id}/connect`).
#[utoipa::path(post, path = "/sandboxes/{id}/connect", operation_id = "e2b_connect_v1", tag = "e2b",
    params(("id" = String, Path, description = "The sandbox's id")),
    request_body(content = Timeout, content_type = "application/json"),
    responses((status = 200, description = "The sandbox", body = SandboxCreated)))]
pub async fn connect_v1(
    state: State<Registry>,
    id: Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult {
    connect(state, id, headers, body).await
}

/// Moves the sandbox's end to `timeout` seconds from now (`set_timeout`), sooner or later.
#[utoipa::path(post, path = "/sandboxes/{id}/timeout", operation_id = "e2b_set_timeout", tag = "e2b",
    params(("id" = String, Path, description = "The sandbox's id")),
    request_body(content = Timeout, content_type = "application/json"),
    responses(
        (status = 204, description = "Moved"),
        (status = 400, description = "No timeout, or one out of bounds", body = Object),
        (status = 404, description = "No such sandbox", body = Object),
    ))]
pub async fn set_timeout(
    State(registry): State<Registry>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult {
    let asked: Timeout = self::body(body)?;
    let Some(timeout) = asked.timeout else {
        return refuse(StatusCode::BAD_REQUEST, "name the timeout in seconds");
    };
    let from_now = lifetime(timeout)?;
    registry.get(&id).await?.end_in(from_now);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// One sandbox (`Sandbox.get_info`).
#[utoipa::path(get, path = "/sandboxes/{id}", operation_id = "e2b_sandbox_info", tag = "e2b",
    params(("id" = String, Path, description = "The sandbox's id")),
    responses(
        (status = 200, description = "The sandbox", body = SandboxDetail),
        (status = 404, description = "No such sandbox", body = Object),
    ))]
pub async fn info(
    State(registry): State<Registry>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> E2bResult {
    let session = registry.get(&id).await?;
    Ok(Json(detail(session.info(), access_token(&headers))).into_response())
}

/// What `Sandbox.list` filters and pages by.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    /// Labels every sandbox listed has, URL-encoded as the SDK sends them (`k=v&k2=v2`).
    pub metadata: Option<String>,
    /// States to list, comma-separated: `running` (ARL's only one) or `paused`.
    pub state: Option<String>,
    /// The template sandboxes were made from.
    pub template: Option<String>,
    /// Sandboxes per page (100 unless given, at most 1,000).
    pub limit: Option<usize>,
    /// Where the page starts: the `X-Next-Token` of the page before.
    pub next_token: Option<String>,
}

/// Sandboxes, oldest first, a page at a time (`Sandbox.list`); `X-Next-Token` names the next page.
#[utoipa::path(get, path = "/v2/sandboxes", operation_id = "e2b_list_sandboxes", tag = "e2b",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of sandboxes", body = Vec<SandboxDetail>),
        (status = 400, description = "Metadata that does not decode", body = Object),
    ))]
pub async fn list(State(registry): State<Registry>, Query(query): Query<ListQuery>) -> E2bResult {
    let mut sessions: Vec<Info> = registry.list();
    sessions.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    let details = sessions
        .into_iter()
        .map(|info| detail(info, None))
        .collect();
    page(details, &query)
}

/// The page of `sandboxes` (oldest first) that `query` asks for, with `X-Next-Token` when more
/// follow.
fn page(sandboxes: Vec<SandboxDetail>, query: &ListQuery) -> E2bResult {
    let wanted = match &query.metadata {
        Some(encoded) => metadata_filter(encoded)?,
        None => BTreeMap::new(),
    };
    let states: Vec<&str> = query
        .state
        .as_deref()
        .map_or(vec!["running"], |s| s.split(',').map(str::trim).collect());
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let mut kept = sandboxes.into_iter().filter(|s| {
        states.contains(&s.state)
            && query
                .template
                .as_deref()
                .is_none_or(|t| template_of(runtime_of(t)) == s.template_id)
            && wanted.iter().all(|(k, v)| s.metadata.get(k) == Some(v))
    });
    if let Some(after) = &query.next_token {
        kept.by_ref().find(|s| &s.sandbox_id == after);
    }
    let page: Vec<SandboxDetail> = kept.by_ref().take(limit).collect();
    let more = kept.next().is_some();
    let mut response = Json(&page).into_response();
    if more
        && let Some(last) = page.last()
        && let Ok(token) = HeaderValue::from_str(&last.sandbox_id)
    {
        response.headers_mut().insert("x-next-token", token);
    }
    Ok(response)
}

/// The labels a listing asks for: `k=v&...`, each name and value percent-encoded once more.
fn metadata_filter(encoded: &str) -> Result<BTreeMap<String, String>, E2bError> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| {
                E2bError(
                    StatusCode::BAD_REQUEST,
                    format!("metadata {encoded:?} is not UTF-8 once decoded"),
                )
            })
    };
    form_urlencoded::parse(encoded.as_bytes())
        .map(|(k, v)| Ok((decode(&k)?, decode(&v)?)))
        .collect()
}

/// What `Sandbox.fork` sends.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct ForkRequest {
    /// Seconds each fork lives; until the sandbox itself ends when absent.
    pub timeout: Option<u64>,
    /// Forks to make, 1 to 20 (1 when absent).
    pub count: Option<u32>,
}

/// The most forks one call makes, as E2B bounds it.
const MAX_FORKS: u32 = 20;

/// Forks a sandbox `count` times (`Sandbox.fork`): each fork is a new sandbox with this one's
/// interpreter state and files, which go on unchanged. Each fork succeeds or fails on its own:
/// `{"sandbox"}` or `{"error": {"code", "message"}}`, in order.
#[utoipa::path(post, path = "/sandboxes/{id}/fork", operation_id = "e2b_fork", tag = "e2b",
    params(("id" = String, Path, description = "The sandbox's id")),
    request_body(content = ForkRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "One entry per fork", body = Vec<Object>),
        (status = 400, description = "A count out of 1-20, or a timeout out of bounds", body = Object),
        (status = 404, description = "No such sandbox", body = Object),
    ))]
pub async fn fork(
    State(registry): State<Registry>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult {
    let asked: ForkRequest = self::body(body)?;
    let count = asked.count.unwrap_or(1);
    if !(1..=MAX_FORKS).contains(&count) {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("count must be between 1 and {MAX_FORKS}"),
        );
    }
    let lifetime = asked.timeout.map(lifetime).transpose()?;
    let parent = registry.get(&id).await?;
    let mut forks = Vec::with_capacity(count as usize);
    for _ in 0..count {
        forks.push(match registry.fork(&id).await {
            Ok(fork) => {
                fork.set_metadata((*parent.metadata()).clone());
                fork.end_in(lifetime.unwrap_or_else(|| parent.time_left()));
                json!({ "sandbox": created(&fork, &headers) })
            }
            Err(e) => {
                let E2bError(status, message) = E2bError::from(e);
                json!({ "error": { "code": status.as_u16(), "message": message } })
            }
        });
    }
    Ok((StatusCode::CREATED, Json(forks)).into_response())
}

/// Ends a sandbox: 204, or 404 when there is no such sandbox (the SDK's `kill()` is then
/// `False`).
#[utoipa::path(delete, path = "/sandboxes/{id}", operation_id = "e2b_kill_sandbox", tag = "e2b",
    params(("id" = String, Path, description = "The sandbox's id")),
    responses(
        (status = 204, description = "Ended"),
        (status = 404, description = "No such sandbox", body = Object),
    ))]
pub async fn kill(State(registry): State<Registry>, Path(id): Path<String>) -> E2bResult {
    registry.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// What the SDK's `run_code` sends.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct ExecuteCode {
    pub code: String,
    /// A context made by `POST /contexts`; the sandbox's own namespace when absent.
    pub context_id: Option<String>,
    /// `python` (or absent), `js` (`javascript`) or `ts` (`typescript`): the last two run in
    /// the sandbox's JavaScript companion.
    pub language: Option<String>,
    /// Per-run environment: refused unless empty (give `envVars` at create).
    pub env_vars: Option<BTreeMap<String, String>>,
}

/// Runs code in the sandbox named by `E2b-Sandbox-Id`, answering NDJSON as the code
/// interpreter does: `stdout`/`stderr` lines as the code prints (with a timestamp in
/// nanoseconds), a `result` line per displayed value (the final expression's with
/// `is_main_result`), an `error` line for an uncaught exception, then the execution count.
#[utoipa::path(post, path = "/execute", operation_id = "e2b_execute", tag = "e2b",
    request_body(content = ExecuteCode, content_type = "application/json"),
    params(("E2b-Sandbox-Id" = String, Header, description = "The sandbox's id")),
    responses(
        (status = 200, description = "NDJSON lines", content_type = "application/x-ndjson", body = String),
        (status = 400, description = "No sandbox named, a language not served or per-run env_vars", body = Object),
        (status = 404, description = "No such sandbox or context", body = Object),
    ))]
pub async fn execute(
    State(registry): State<Registry>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult {
    let request: ExecuteCode =
        super::parse(body, false).map_err(|e| E2bError(StatusCode::BAD_REQUEST, e.message))?;
    let sandbox = sandbox(&registry, &headers).await?;
    if request.env_vars.is_some_and(|env| !env.is_empty()) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "env_vars for one run_code are not served: give envs to Sandbox.create",
        );
    }
    let (session, context) = match request.context_id {
        Some(id) if id != contexts::DEFAULT => match contexts::find(&sandbox, &id) {
            Some((session, context)) => (session, Some(context)),
            None => return refuse(StatusCode::NOT_FOUND, format!("no context `{id}` here")),
        },
        _ => {
            let language = request.language.as_deref();
            (contexts::kernel(&registry, &sandbox, language).await?, None)
        }
    };
    let turn = session
        .hold()
        .execute_streaming_in(context, request.code, None);
    // The sandbox stays held (not suspended) while its turn streams.
    let lines = ndjson(turn, move || {
        let _held = &sandbox;
        session.info().executions
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

/// A turn's events as the code interpreter's NDJSON lines. Dropping it stops the turn.
fn ndjson(
    turn: TurnStream,
    executions: impl Fn() -> u64 + Send + 'static,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    pieces(turn).flat_map(move |piece| {
        let lines = match piece {
            Piece::Text(stream, text) => vec![output_line(stream, &text)],
            Piece::Done(outcome) => {
                let mut lines = match *outcome {
                    Ok(outcome) => outcome_lines(outcome),
                    Err(e) => vec![json!({
                        "type": "error", "name": "SandboxError", "value": e.public_message(),
                        "traceback": "",
                    })],
                };
                lines.push(
                    json!({ "type": "number_of_executions", "execution_count": executions() }),
                );
                lines
            }
        };
        futures_util::stream::iter(lines.into_iter().map(|line| {
            let mut bytes = line.to_string().into_bytes();
            bytes.push(b'\n');
            Ok(Bytes::from(bytes))
        }))
    })
}

fn output_line(stream: Stream, text: &str) -> Value {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    json!({ "type": stream.name(), "text": text, "timestamp": nanos as u64 })
}

/// The MIME types of a bundle under the names E2B's `Result` takes.
const E2B_NAMES: [(&str, &str); 8] = [
    ("text/plain", "text"),
    ("text/html", "html"),
    ("text/markdown", "markdown"),
    ("image/svg+xml", "svg"),
    ("image/png", "png"),
    ("image/jpeg", "jpeg"),
    ("text/latex", "latex"),
    ("application/json", "json"),
];

fn outcome_lines(o: Outcome) -> Vec<Value> {
    let mut lines: Vec<Value> = o
        .results
        .into_iter()
        .map(|mut bundle| {
            let mut line = serde_json::Map::new();
            line.insert("type".into(), json!("result"));
            for (mime, name) in E2B_NAMES {
                if let Some(value) = bundle.remove(mime) {
                    line.insert(name.into(), value);
                }
            }
            let main = bundle.remove("is_main_result").unwrap_or(json!(false));
            line.insert("is_main_result".into(), main);
            Value::Object(line)
        })
        .collect();
    if let Some(e) = o.error {
        lines.push(json!({
            "type": "error", "name": e.kind, "value": e.message, "traceback": e.traceback,
        }));
    }
    lines
}
