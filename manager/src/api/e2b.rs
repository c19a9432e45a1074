//! E2B's wire contract, its first part: a sandbox's life (`POST /v2/sandboxes`, e2b 2.7's
//! `POST /sandboxes`, `DELETE /sandboxes/{id}`), the code interpreter's `POST /execute` and
//! envd's `GET`/`POST /files`, as the unmodified `e2b-code-interpreter` SDK sends them with
//! `E2B_API_URL` and `E2B_SANDBOX_URL` both pointing here. A sandbox is a session; its id is
//! the session's, and its home `/home/user` is the session's `/workspace`.
//!
//! Errors answer in E2B's shape, `{"code": <status>, "message"}`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::sessions::{Piece, pieces};
use crate::files;
use crate::output::Stream;
use crate::registry::{CreateRequest, Registry};
use crate::session::TurnStream;
use crate::{Error, Outcome};

/// The headers E2B's SDK authenticates with: the API key on the control plane, the sandbox's
/// access token on its own calls. Either may carry the manager's token.
pub const API_KEY: &str = "x-api-key";
pub const ACCESS_TOKEN: &str = "x-access-token";

/// The header that names the sandbox a code-interpreter or envd call is for.
pub const SANDBOX_HEADER: &str = "e2b-sandbox-id";

/// The envd version ARL reports: past 0.4.0, the SDK sends no `username` and no Basic auth.
const ENVD_VERSION: &str = "0.4.0";

/// E2B templates that mean ARL's Python runtime.
const PYTHON_TEMPLATES: [&str; 3] = ["code-interpreter-v1", "code-interpreter", "base"];

/// What the SDK sends to create a sandbox; other fields (`autoPause`, `secure`, `network`,
/// ...) are accepted and unused.
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
}

/// What the SDK reads back.
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
}

/// An error in E2B's shape, `{"code": <status>, "message"}`.
struct E2bError(StatusCode, String);

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

fn e2b_error(status: StatusCode, message: impl Into<String>) -> Response {
    E2bError(status, message.into()).into_response()
}

fn refused(e: Error) -> Response {
    E2bError::from(e).into_response()
}

/// Creates a sandbox (`POST /v2/sandboxes`; e2b 2.7 sends `POST /sandboxes`).
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
) -> Response {
    let new: NewSandbox = match super::parse(body, true) {
        Ok(new) => new,
        Err(e) => return e2b_error(StatusCode::BAD_REQUEST, e.message),
    };
    let template = new
        .template_id
        .unwrap_or_else(|| PYTHON_TEMPLATES[0].to_owned());
    let runtime = if PYTHON_TEMPLATES.contains(&template.as_str()) {
        "python".to_owned()
    } else if registry.has_runtime(&template) {
        template.clone()
    } else {
        return e2b_error(
            StatusCode::BAD_REQUEST,
            format!(
                "template `{template}` is not served here: use code-interpreter-v1 (Python) \
                 or one of this manager's runtimes"
            ),
        );
    };
    let request = CreateRequest {
        runtime: Some(runtime),
        lifetime_secs: new.timeout,
        env: new.env_vars,
        ..CreateRequest::default()
    };
    let session = match registry.create(request).await {
        Ok(session) => session,
        Err(e) => return refused(e),
    };
    // The key the caller authenticated with (the manager's token, when it has one) comes
    // back as the sandbox's access token, which the SDK then sends on `/execute`.
    let token = headers
        .get(API_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let created = SandboxCreated {
        template_id: template,
        sandbox_id: session.id.clone(),
        client_id: "arl",
        envd_version: ENVD_VERSION,
        envd_access_token: token,
    };
    (StatusCode::CREATED, Json(created)).into_response()
}

/// Creates a sandbox as e2b 2.7's SDK asks for one (`POST /sandboxes`).
#[utoipa::path(post, path = "/sandboxes", operation_id = "e2b_create_sandbox_v1", tag = "e2b",
    request_body(content = NewSandbox, content_type = "application/json"),
    responses((status = 201, description = "Created", body = SandboxCreated)))]
pub async fn create_v1(
    state: State<Registry>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    create(state, headers, body).await
}

/// Ends a sandbox: 204, or 404 when there is no such sandbox (the SDK's `kill()` is then
/// `False`).
#[utoipa::path(delete, path = "/sandboxes/{id}", operation_id = "e2b_kill_sandbox", tag = "e2b",
    params(("id" = String, Path, description = "The sandbox's id")),
    responses(
        (status = 204, description = "Ended"),
        (status = 404, description = "No such sandbox", body = Object),
    ))]
pub async fn kill(State(registry): State<Registry>, Path(id): Path<String>) -> Response {
    match registry.delete(&id) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => refused(e),
    }
}

/// What the SDK's `run_code` sends.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct ExecuteCode {
    pub code: String,
    /// A context other than the sandbox's own is not served yet.
    pub context_id: Option<String>,
    /// `python` (or absent).
    pub language: Option<String>,
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
        (status = 400, description = "No sandbox named, or a language not served", body = Object),
        (status = 404, description = "No such sandbox, or a context not served", body = Object),
    ))]
pub async fn execute(
    State(registry): State<Registry>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(id) = headers.get(SANDBOX_HEADER).and_then(|v| v.to_str().ok()) else {
        return e2b_error(
            StatusCode::BAD_REQUEST,
            "name the sandbox in E2b-Sandbox-Id",
        );
    };
    let request: ExecuteCode = match super::parse(body, false) {
        Ok(request) => request,
        Err(e) => return e2b_error(StatusCode::BAD_REQUEST, e.message),
    };
    if request.context_id.is_some() {
        return e2b_error(
            StatusCode::NOT_FOUND,
            "contexts other than the sandbox's own are not served yet",
        );
    }
    if let Some(language) = request.language.filter(|l| l != "python") {
        return e2b_error(
            StatusCode::BAD_REQUEST,
            format!("language `{language}` is not served here: python only"),
        );
    }
    let target = match registry.target(id, None) {
        Ok(target) => target,
        Err(e) => return refused(e),
    };
    let session = target.session.clone();
    let turn = target.session.execute_streaming(request.code, None);
    let lines = ndjson(turn, move || session.info().executions);
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
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

/// Where envd's file routes point.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct FileQuery {
    /// `/home/user/...` (or `/workspace/...`, or relative to either).
    pub path: Option<String>,
}

/// E2B's home (and ARL's `/workspace`) seen as the session's workspace: the path relative to it.
fn in_home(path: &str) -> Result<String, E2bError> {
    let rel = ["/home/user/", "/workspace/", "~/"]
        .iter()
        .find_map(|home| path.strip_prefix(home))
        .unwrap_or(path);
    if rel.starts_with('/') {
        return Err(E2bError(
            StatusCode::BAD_REQUEST,
            format!("{path:?} is outside the sandbox's files (/home/user, which is /workspace)"),
        ));
    }
    files::check(rel).map_err(|e| E2bError(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(rel.to_owned())
}

/// The session named by `E2b-Sandbox-Id`.
fn sandbox(
    registry: &Registry,
    headers: &HeaderMap,
) -> Result<std::sync::Arc<crate::session::Session>, E2bError> {
    let id = headers
        .get(SANDBOX_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            E2bError(
                StatusCode::BAD_REQUEST,
                "name the sandbox in E2b-Sandbox-Id".into(),
            )
        })?;
    Ok(registry.get(id)?)
}

/// A file of the sandbox, whole (envd's `GET /files?path=`).
#[utoipa::path(get, path = "/files", operation_id = "e2b_read_file", tag = "e2b",
    params(FileQuery, ("E2b-Sandbox-Id" = String, Header, description = "The sandbox's id")),
    responses(
        (status = 200, description = "The file's bytes", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, description = "A path outside /home/user", body = Object),
        (status = 404, description = "No such file or sandbox", body = Object),
    ))]
pub async fn read_file(
    State(registry): State<Registry>,
    Query(query): Query<FileQuery>,
    headers: HeaderMap,
) -> Response {
    let session = match sandbox(&registry, &headers) {
        Ok(session) => session,
        Err(refusal) => return refusal.into_response(),
    };
    let rel = match query.path.as_deref().map(in_home) {
        Some(Ok(rel)) => rel,
        Some(Err(refusal)) => return refusal.into_response(),
        None => return e2b_error(StatusCode::BAD_REQUEST, "name the file with ?path="),
    };
    let read = files::on_workspace(session.workspace.clone(), move |w| w.read(&rel)).await;
    match read {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        Err(e) => refused(e),
    }
}

/// What envd answers for each file written.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WrittenFile {
    pub name: String,
    /// Always `file`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub path: String,
}

/// Writes files into the sandbox (envd's `POST /files?path=`, `multipart/form-data` with one
/// `file` part per file, each named by `?path=` or by its filename), within the session's
/// disk quota.
#[utoipa::path(post, path = "/files", operation_id = "e2b_write_files", tag = "e2b",
    params(FileQuery, ("E2b-Sandbox-Id" = String, Header, description = "The sandbox's id")),
    request_body(content = String, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "What was written", body = Vec<WrittenFile>),
        (status = 400, description = "A path outside /home/user, or not multipart", body = Object),
        (status = 413, description = "Past the session's disk quota", body = Object),
    ))]
pub async fn write_files(
    State(registry): State<Registry>,
    Query(query): Query<FileQuery>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    let session = match sandbox(&registry, &headers) {
        Ok(session) => session,
        Err(refusal) => return refusal.into_response(),
    };
    let mut multipart = match multipart {
        Ok(multipart) => multipart,
        Err(e) => return e2b_error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let mut written = Vec::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return e2b_error(StatusCode::BAD_REQUEST, e.body_text()),
        };
        let Some(path) = query
            .path
            .clone()
            .or_else(|| field.file_name().map(str::to_owned))
        else {
            return e2b_error(
                StatusCode::BAD_REQUEST,
                "name the file with ?path= or a filename",
            );
        };
        let rel = match in_home(&path) {
            Ok(rel) => rel,
            Err(refusal) => return refusal.into_response(),
        };
        let data = match field.bytes().await {
            Ok(data) => data,
            Err(e) => return e2b_error(StatusCode::BAD_REQUEST, e.body_text()),
        };
        let once = futures_util::stream::once(async move { Ok(data) });
        if let Err(e) = files::upload(session.workspace.clone(), rel.clone(), once).await {
            return refused(e);
        }
        let name = rel.rsplit('/').next().unwrap_or(&rel).to_owned();
        written.push(WrittenFile {
            name,
            kind: "file",
            path: format!("/home/user/{rel}"),
        });
    }
    Json(written).into_response()
}

/// envd's process service (`commands.run`, `pty`): a WebAssembly sandbox has no processes,
/// so every call answers Connect's `unimplemented`, which the SDK raises with this message.
#[utoipa::path(post, path = "/process.Process/{method}", operation_id = "e2b_process", tag = "e2b",
    params(("method" = String, Path, description = "The Connect method, e.g. Start")),
    responses((status = 501, description = "`unimplemented`: no processes here", body = Object)))]
pub async fn process(Path(method): Path<String>) -> Response {
    let message = format!(
        "process.Process/{method}: ARL's sandboxes are WebAssembly and run no processes, so \
         commands and terminals are not served; run Python with run_code (a container pool runs \
         commands)"
    );
    let body = json!({ "code": "unimplemented", "message": message });
    (StatusCode::NOT_IMPLEMENTED, Json(body)).into_response()
}
