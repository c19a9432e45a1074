//! envd, the agent in each E2B sandbox, as ARL answers it: files whole (`GET`/`POST /files`),
//! the filesystem service's Connect calls (`/filesystem.Filesystem/{Stat,ListDir,MakeDir,
//! Remove,Move}`, JSON codec), `/health`, and the process service refused (no processes in a
//! WebAssembly sandbox). Paths are E2B's: `/home/user/...` (or relative to it) is the session's
//! `/workspace`.

use std::time::SystemTime;

use axum::Json;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{E2bError, E2bResult, refuse, sandbox};
use crate::files::{self, Entry, Kind};
use crate::registry::Registry;
use crate::{Error, rfc3339};

/// E2B's home, which is the session's `/workspace`.
const HOME: &str = "/home/user";

/// Where envd's file routes point.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct FileQuery {
    /// `/home/user/...` (or `/workspace/...`, or relative to either).
    pub path: Option<String>,
}

/// The path within the session's workspace that an E2B path names: `""` for the home itself.
fn home_relative(path: &str) -> Result<String, E2bError> {
    let trimmed = path.trim_end_matches('/');
    if ["", ".", "~", HOME, "/workspace"].contains(&trimmed) {
        return Ok(String::new());
    }
    let rel = [HOME, "/workspace", "~"]
        .iter()
        .find_map(|home| trimmed.strip_prefix(home)?.strip_prefix('/'))
        .unwrap_or(trimmed);
    if rel.starts_with('/') {
        return Err(E2bError(
            StatusCode::BAD_REQUEST,
            format!("{path:?} is outside the sandbox's files ({HOME}, which is /workspace)"),
        ));
    }
    files::check(rel).map_err(|e| E2bError(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(rel.to_owned())
}

/// A file's path within the session's workspace (the home itself is not a file).
fn in_home(path: &str) -> Result<String, E2bError> {
    match home_relative(path)? {
        rel if rel.is_empty() => Err(E2bError(
            StatusCode::BAD_REQUEST,
            format!("{path:?} is the home folder, not a file in it"),
        )),
        rel => Ok(rel),
    }
}

fn e2b_path(rel: &str) -> String {
    if rel.is_empty() {
        HOME.to_owned()
    } else {
        format!("{HOME}/{rel}")
    }
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
) -> E2bResult {
    let session = sandbox(&registry, &headers).await?;
    let rel = in_home(named(&query)?)?;
    let bytes = files::on_workspace(session.workspace.clone(), move |w| w.read(&rel)).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// The path `?path=` names.
fn named(query: &FileQuery) -> Result<&str, E2bError> {
    match query.path.as_deref() {
        Some(path) => Ok(path),
        None => refuse(StatusCode::BAD_REQUEST, "name the file with ?path="),
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

impl WrittenFile {
    fn at(rel: &str) -> Self {
        WrittenFile {
            name: rel.rsplit('/').next().unwrap_or(rel).to_owned(),
            kind: "file",
            path: e2b_path(rel),
        }
    }
}

/// Writes files into the sandbox (envd's `POST /files?path=`), within the session's disk
/// quota: `multipart/form-data` with one `file` part per file, each named by `?path=` or by
/// its filename, or the file's bytes as the body (`application/octet-stream`, `?path=` naming
/// it).
#[utoipa::path(post, path = "/files", operation_id = "e2b_write_files", tag = "e2b",
    params(FileQuery, ("E2b-Sandbox-Id" = String, Header, description = "The sandbox's id")),
    request_body(content = String, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "What was written", body = Vec<WrittenFile>),
        (status = 400, description = "A path outside /home/user, a compressed body, or no path", body = Object),
        (status = 413, description = "Past the session's disk quota", body = Object),
    ))]
pub async fn write_files(
    State(registry): State<Registry>,
    Query(query): Query<FileQuery>,
    request: Request,
) -> E2bResult {
    let session = sandbox(&registry, request.headers()).await?;
    if request.headers().contains_key(header::CONTENT_ENCODING) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "compressed uploads are not served: send the file's bytes as they are",
        );
    }
    let multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("multipart/"));
    let workspace = session.workspace.clone();
    if !multipart {
        let rel = in_home(named(&query)?)?;
        let data = request.into_body().into_data_stream().map(|chunk| {
            chunk.map_err(|e| Error::InvalidRequest(format!("reading the upload: {e}")))
        });
        files::upload(workspace, rel.clone(), data).await?;
        return Ok(Json(vec![WrittenFile::at(&rel)]).into_response());
    }
    let malformed = |e: axum::extract::multipart::MultipartError| {
        E2bError(StatusCode::BAD_REQUEST, e.body_text())
    };
    let mut multipart = Multipart::from_request(request, &())
        .await
        .map_err(|e| E2bError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let mut written = Vec::new();
    while let Some(field) = multipart.next_field().await.map_err(malformed)? {
        let Some(path) = query
            .path
            .clone()
            .or_else(|| field.file_name().map(str::to_owned))
        else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "name the file with ?path= or a filename",
            );
        };
        let rel = in_home(&path)?;
        let data = field.bytes().await.map_err(malformed)?;
        let once = futures_util::stream::once(async move { Ok(data) });
        files::upload(workspace.clone(), rel.clone(), once).await?;
        written.push(WrittenFile::at(&rel));
    }
    Ok(Json(written).into_response())
}

/// Whether the sandbox named by `E2b-Sandbox-Id` runs (`is_running`): 204, or 502 as E2B's
/// proxy answers for a sandbox that is gone.
#[utoipa::path(get, path = "/health", operation_id = "e2b_health", tag = "e2b",
    params(("E2b-Sandbox-Id" = Option<String>, Header, description = "The sandbox's id")),
    responses(
        (status = 204, description = "Running"),
        (status = 502, description = "Not running", body = Object),
    ))]
pub async fn health(State(registry): State<Registry>, headers: HeaderMap) -> E2bResult {
    if headers.contains_key(super::SANDBOX_HEADER) {
        sandbox(&registry, &headers)
            .await
            .map_err(|E2bError(_, why)| E2bError(StatusCode::BAD_GATEWAY, why))?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A Connect error (`{"code": "not_found", "message"}`) with the HTTP status Connect gives it.
fn connect_error(status: StatusCode, message: impl Into<String>) -> Response {
    let code = match status {
        StatusCode::NOT_FOUND | StatusCode::GONE => "not_found",
        StatusCode::CONFLICT => "already_exists",
        StatusCode::FORBIDDEN => "permission_denied",
        StatusCode::UNAUTHORIZED => "unauthenticated",
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::TOO_MANY_REQUESTS => "resource_exhausted",
        StatusCode::NOT_IMPLEMENTED => "unimplemented",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_client_error() => "invalid_argument",
        _ => "internal",
    };
    let status = match code {
        "not_found" => StatusCode::NOT_FOUND,
        "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
        "invalid_argument" => StatusCode::BAD_REQUEST,
        _ => status,
    };
    (
        status,
        Json(json!({ "code": code, "message": message.into() })),
    )
        .into_response()
}

impl E2bError {
    fn connect(self) -> Response {
        connect_error(self.0, self.1)
    }
}

/// What the filesystem service's calls send (each uses some of the fields).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct FilesystemRequest {
    /// Stat, ListDir, MakeDir, Remove.
    pub path: Option<String>,
    /// ListDir: levels below the folder to list (1: its own entries; 0 counts as 1).
    pub depth: Option<u32>,
    /// Move.
    pub source: Option<String>,
    pub destination: Option<String>,
}

/// The deepest ListDir walks, and the most entries it answers.
const MAX_DEPTH: u32 = 32;
const MAX_LISTED: usize = 100_000;

/// envd's filesystem service, Connect's unary calls with the JSON codec: `Stat`, `ListDir`,
/// `MakeDir`, `Remove` and `Move` on the sandbox's files; its watchers are not served.
#[utoipa::path(post, path = "/filesystem.Filesystem/{method}", operation_id = "e2b_filesystem", tag = "e2b",
    params(("method" = String, Path, description = "Stat, ListDir, MakeDir, Remove or Move"),
        ("E2b-Sandbox-Id" = String, Header, description = "The sandbox's id")),
    request_body(content = FilesystemRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "`{\"entry\"}`, `{\"entries\"}` or `{}`", body = Object),
        (status = 400, description = "`invalid_argument`: a path outside /home/user", body = Object),
        (status = 404, description = "`not_found`: no such file or sandbox", body = Object),
        (status = 409, description = "`already_exists`: MakeDir of a folder there", body = Object),
        (status = 501, description = "`unimplemented`: watchers", body = Object),
    ))]
pub async fn filesystem(
    State(registry): State<Registry>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: FilesystemRequest = if body.is_empty() {
        FilesystemRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(e) => return connect_error(StatusCode::BAD_REQUEST, format!("the body: {e}")),
        }
    };
    let session = match sandbox(&registry, &headers).await {
        Ok(session) => session,
        Err(refusal) => return refusal.connect(),
    };
    let named = |path: &Option<String>, what: &str| {
        let path = path
            .as_deref()
            .ok_or_else(|| E2bError(StatusCode::BAD_REQUEST, format!("name the {what}")))?;
        home_relative(path)
    };
    let call = match method.as_str() {
        "Stat" => named(&request.path, "path").map(Call::Stat),
        "ListDir" => named(&request.path, "path")
            .map(|rel| Call::List(rel, request.depth.unwrap_or(1).clamp(1, MAX_DEPTH))),
        "MakeDir" => named(&request.path, "path").map(Call::MakeDir),
        "Remove" => named(&request.path, "path").map(Call::Remove),
        "Move" => named(&request.source, "source").and_then(|from| {
            Ok(Call::Move(
                from,
                named(&request.destination, "destination")?,
            ))
        }),
        other => {
            return connect_error(
                StatusCode::NOT_IMPLEMENTED,
                format!(
                    "filesystem.Filesystem/{other} is not served: ARL answers Stat, ListDir, MakeDir, Remove and Move"
                ),
            );
        }
    };
    let call = match call {
        Ok(call) => call,
        Err(refusal) => return refusal.connect(),
    };
    let path = call.path();
    match files::on_workspace(session.workspace.clone(), move |w| call.run(w)).await {
        Ok(Some(answer)) => Json(answer).into_response(),
        Ok(None) => connect_error(StatusCode::CONFLICT, format!("{path} already exists")),
        Err(e) => E2bError::from(e).connect(),
    }
}

/// A filesystem call, its paths within the workspace (`""`: the home).
enum Call {
    Stat(String),
    List(String, u32),
    MakeDir(String),
    Remove(String),
    Move(String, String),
}

impl Call {
    /// The path it acts on, as E2B names it.
    fn path(&self) -> String {
        match self {
            Call::Stat(rel) | Call::List(rel, _) | Call::MakeDir(rel) | Call::Remove(rel) => {
                e2b_path(rel)
            }
            Call::Move(from, _) => e2b_path(from),
        }
    }

    /// The call's answer; `None` for a MakeDir of a folder already there.
    fn run(self, w: &files::Workspace) -> crate::Result<Option<Value>> {
        let home = || Entry {
            path: String::new(),
            kind: Kind::Dir,
            size: 0,
            modified: None,
        };
        Ok(Some(match self {
            Call::Stat(rel) if rel.is_empty() => json!({ "entry": entry_info(&home()) }),
            Call::Stat(rel) => json!({ "entry": entry_info(&w.stat(&rel)?) }),
            Call::List(rel, depth) => {
                let mut entries = Vec::new();
                list(w, &rel, depth, &mut entries)?;
                json!({ "entries": entries })
            }
            Call::MakeDir(rel) => {
                if !w.make_dir(root(&rel)?)? {
                    return Ok(None);
                }
                json!({ "entry": entry_info(&w.stat(&rel)?) })
            }
            Call::Remove(rel) => {
                w.delete(root(&rel)?)?;
                json!({})
            }
            Call::Move(from, to) => {
                json!({ "entry": entry_info(&w.rename(root(&from)?, root(&to)?)?) })
            }
        }))
    }
}

/// `rel`, unless it is the home itself, which cannot be made, removed or moved.
fn root(rel: &str) -> crate::Result<&str> {
    match rel {
        "" => Err(Error::BadPath(HOME.into(), "is the home folder itself")),
        rel => Ok(rel),
    }
}

/// The entries under `rel`, `depth` levels down, folders before what they hold.
fn list(w: &files::Workspace, rel: &str, depth: u32, out: &mut Vec<Value>) -> crate::Result<()> {
    for entry in w.list(rel)? {
        if out.len() >= MAX_LISTED {
            return Ok(());
        }
        out.push(entry_info(&entry));
        if depth > 1 && entry.kind == Kind::Dir {
            list(w, &entry.path, depth - 1, out)?;
        }
    }
    Ok(())
}

/// An entry as envd's `EntryInfo` reads in Connect's JSON (protobuf's JSON mapping).
fn entry_info(e: &Entry) -> Value {
    let (kind, mode, permissions) = match e.kind {
        Kind::File => ("FILE_TYPE_FILE", 0o644, "-rw-r--r--"),
        Kind::Dir => ("FILE_TYPE_DIRECTORY", 0o755 | 0o40000, "drwxr-xr-x"),
        Kind::Symlink => ("FILE_TYPE_SYMLINK", 0o777 | 0o120000, "lrwxrwxrwx"),
    };
    let name = e.path.rsplit('/').next().unwrap_or(&e.path);
    json!({
        "name": if e.path.is_empty() { "user" } else { name },
        "type": kind,
        "path": e2b_path(&e.path),
        "size": e.size.to_string(),
        "mode": mode,
        "permissions": permissions,
        "owner": "user",
        "group": "user",
        "modifiedTime": rfc3339(e.modified.unwrap_or(SystemTime::UNIX_EPOCH)),
    })
}

/// envd's process service (`commands.run`, `pty`): a WebAssembly sandbox has no processes,
/// so every call answers Connect's `unimplemented`, which the SDK raises with this message.
#[utoipa::path(post, path = "/process.Process/{method}", operation_id = "e2b_process", tag = "e2b",
    params(("method" = String, Path, description = "The Connect method, e.g. Start")),
    responses((status = 501, description = "`unimplemented`: no processes here", body = Object)))]
pub async fn process(Path(method): Path<String>, request: Request) -> Response {
    // The call's envelope is read first, so that its connection can carry the client's next
    // call (an answer before the body would close it); a stream held open is not waited for.
    let body = axum::body::to_bytes(request.into_body(), 1 << 20);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), body).await;
    let message = format!(
        "process.Process/{method}: ARL's sandboxes are WebAssembly and run no processes, so \
         commands and terminals are not served; run Python with run_code (a container pool runs \
         commands)"
    );
    let body = json!({ "code": "unimplemented", "message": message });
    (StatusCode::NOT_IMPLEMENTED, Json(body)).into_response()
}
