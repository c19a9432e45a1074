//! SandboxFusion's wire contract (`POST /run_code`, `GET /v1/ping`), as the PyPI
//! `sandbox-fusion` client, verl and tinker-cookbook send it: each program runs in a fresh
//! session, as a script, and the session is deleted after.
//!
//! Status follows SandboxFusion's server: `Success` when the program exits 0, `Failed` when
//! it exits otherwise, runs out of time or cannot be run as asked (an unknown language, a file
//! that does not decode or would land outside the workspace), and `SandboxError` only for
//! ARL's own trouble (no room, an internal failure), which clients retry.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{ApiResult, ErrorBody, parse};
use crate::files::{self, Workspace};
use crate::registry::{CreateRequest, Registry};
use crate::session::{Rollback, Session};
use crate::{EndReason, Error, Outcome};

/// The languages served, as SandboxFusion names them, and the runtime each runs on.
const LANGUAGES: [(&str, &str); 4] = [
    ("python", "python"),
    ("python3", "python"),
    ("nodejs", "javascript"),
    ("typescript", "typescript"),
];

/// The deadline when a request names none, as SandboxFusion's.
const DEFAULT_RUN_TIMEOUT_S: f64 = 10.0;

/// What SandboxFusion's `RunCodeRequest` carries; unknown fields (`compile_timeout`: nothing
/// is compiled) are ignored.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct RunCodeRequest {
    /// The program.
    pub code: String,
    /// `python` (or `python3`), `nodejs` or `typescript`; any other answers `Failed`, naming
    /// these.
    #[serde(default = "python")]
    pub language: String,
    /// What the program reads from `sys.stdin` (`input()`).
    #[serde(default)]
    pub stdin: Option<String>,
    /// Files written into the working folder first: relative path to base64 content.
    #[serde(default)]
    pub files: BTreeMap<String, Option<String>>,
    /// Files read back after the run, base64, when they exist.
    #[serde(default)]
    pub fetch_files: Vec<String>,
    /// The program's deadline, seconds.
    #[serde(default)]
    pub run_timeout: Option<f64>,
    /// The program's memory limit; `-1` or absent: the manager's default.
    #[serde(default, rename = "memory_limit_MB")]
    pub memory_limit_mb: Option<i64>,
    /// `sys.argv[1:]`.
    #[serde(default)]
    pub args: Vec<String>,
}

fn python() -> String {
    "python".into()
}

/// How one command ran, as SandboxFusion reports it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CommandRunResult {
    /// `Finished`, `TimeLimitExceeded` or `Error`.
    pub status: &'static str,
    /// Seconds.
    pub execution_time: Option<f64>,
    /// The exit status; `null` when the deadline cut the program.
    pub return_code: Option<i64>,
    pub stdout: String,
    pub stderr: String,
}

/// SandboxFusion's `RunCodeResponse`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RunCodeResponse {
    /// `Success`, `Failed` or `SandboxError`.
    pub status: &'static str,
    pub message: String,
    /// Always `null`: nothing is compiled.
    pub compile_result: Option<CommandRunResult>,
    pub run_result: Option<CommandRunResult>,
    /// Always `null`.
    pub executor_pod_name: Option<String>,
    /// The `fetch_files` that exist, base64.
    pub files: BTreeMap<String, String>,
}

impl RunCodeResponse {
    fn refused(status: &'static str, message: String) -> Self {
        Self {
            status,
            message,
            compile_result: None,
            run_result: None,
            executor_pod_name: None,
            files: BTreeMap::new(),
        }
    }

    /// The program could not be run as asked: the client's request is at fault.
    fn failed(message: String) -> Self {
        Self::refused("Failed", message)
    }

    /// ARL could not run it: worth a retry.
    fn sandbox_error(e: &Error) -> Self {
        Self::refused("SandboxError", e.public_message())
    }
}

/// Answers `"pong"`: SandboxFusion's liveness route.
#[utoipa::path(get, path = "/v1/ping", operation_id = "fusion_ping", tag = "sandbox-fusion", security(()),
    responses((status = 200, description = "`\"pong\"`", body = String, content_type = "application/json")))]
pub async fn ping() -> Json<&'static str> {
    Json("pong")
}

/// Runs a program in a fresh session (SandboxFusion's `/run_code`).
#[utoipa::path(post, path = "/run_code", operation_id = "fusion_run_code", tag = "sandbox-fusion",
    request_body(content = RunCodeRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "How it ran (`status` says whether it succeeded)", body = RunCodeResponse),
        (status = 400, description = "`invalid_json`", body = ErrorBody),
        (status = 422, description = "`invalid_request`: not a RunCodeRequest", body = ErrorBody),
    ))]
pub async fn run_code(
    State(registry): State<Registry>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<RunCodeResponse>> {
    let request: RunCodeRequest = parse(body, false)?;
    Ok(Json(run(&registry, request).await))
}

/// `/run_code` for a client that cannot send a token: the token is the path's second
/// segment (`SANDBOX_FUSION_ENDPOINT=http://host:8080/fusion/<token>`), checked before routing.
#[utoipa::path(post, path = "/fusion/{token}/run_code", operation_id = "fusion_run_code_with_token", tag = "sandbox-fusion",
    params(("token" = String, Path, description = "The manager's token")),
    request_body(content = RunCodeRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "How it ran", body = RunCodeResponse),
        (status = 401, description = "`unauthorized`: not the token", body = ErrorBody),
    ))]
pub async fn run_code_with_token(
    State(registry): State<Registry>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<RunCodeResponse>> {
    run_code(State(registry), body).await
}

/// `/run_jupyter` under a path token, for a client whose base URL carries one.
#[utoipa::path(post, path = "/fusion/{token}/run_jupyter", operation_id = "fusion_run_jupyter_with_token", tag = "sandbox-fusion",
    params(("token" = String, Path, description = "The manager's token")),
    request_body(content = RunJupyterRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Each cell's outcome", body = RunJupyterResponse),
        (status = 401, description = "`unauthorized`: not the token", body = ErrorBody),
    ))]
pub async fn run_jupyter_with_token(
    State(registry): State<Registry>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<RunJupyterResponse>> {
    run_jupyter(State(registry), body).await
}

/// `/v1/ping` under a path token, for a client whose base URL carries one.
#[utoipa::path(get, path = "/fusion/{token}/v1/ping", operation_id = "fusion_ping_with_token", tag = "sandbox-fusion",
    params(("token" = String, Path, description = "The manager's token")),
    responses((status = 200, description = "`\"pong\"`", body = String)))]
pub async fn ping_with_token() -> Json<&'static str> {
    ping().await
}

async fn run(registry: &Registry, r: RunCodeRequest) -> RunCodeResponse {
    let Some(&(_, runtime)) = LANGUAGES.iter().find(|(l, _)| *l == r.language) else {
        let names: Vec<&str> = LANGUAGES.iter().map(|(l, _)| *l).collect();
        return RunCodeResponse::failed(format!(
            "language `{}` is not served here: ARL runs {} in WebAssembly",
            r.language,
            names.join(", ")
        ));
    };
    let seconds = r.run_timeout.unwrap_or(DEFAULT_RUN_TIMEOUT_S);
    let max = registry.config().max_timeout;
    if !(seconds > 0.0 && seconds.is_finite()) || seconds > max.as_secs_f64() {
        return RunCodeResponse::failed(format!(
            "run_timeout must be more than 0 and at most {} seconds",
            max.as_secs()
        ));
    }
    let deadline = Duration::from_secs_f64(seconds);
    let files = match decode_files(&r.files) {
        Ok(files) => files,
        Err(message) => return RunCodeResponse::failed(message),
    };
    for path in &r.fetch_files {
        if let Err(e) = relative(path) {
            return RunCodeResponse::failed(format!("fetch_files: {e}"));
        }
    }
    // A plain create takes a warm session; a memory limit other than the default needs its own.
    let memory_mib = r
        .memory_limit_mb
        .filter(|&mb| mb > 0)
        .map(|mb| mb.unsigned_abs())
        .filter(|&mib| mib << 20 != registry.config().defaults.memory_bytes);
    let request = CreateRequest {
        runtime: Some(runtime.to_owned()),
        memory_mib,
        ..CreateRequest::default()
    };
    let session = match registry.create(request).await {
        Ok(session) => session,
        Err(e @ Error::InvalidRequest(_)) => return RunCodeResponse::failed(e.to_string()),
        Err(e) => return RunCodeResponse::sandbox_error(&e),
    };
    let _delete = Deleted(registry, session.id.clone());
    // One program, then the session is gone: a failed run has nothing to be rolled back for.
    session.forgo_rollback();
    if let Err(e) = write_files(&session.workspace, files).await {
        return match e {
            Error::BadPath(..) | Error::QuotaExceeded(_) => RunCodeResponse::failed(e.to_string()),
            e => RunCodeResponse::sandbox_error(&e),
        };
    }
    let stdin = r.stdin.as_deref().unwrap_or_default();
    let cell = match runtime {
        "python" => {
            let argv: Vec<String> = std::iter::once("main.py".to_owned())
                .chain(r.args.iter().cloned())
                .collect();
            arl_runtimes::python::script_cell(&r.code, stdin, &argv)
        }
        _ => {
            let script = if runtime == "typescript" {
                "main.ts"
            } else {
                "main.js"
            };
            arl_runtimes::javascript::script_cell(&r.code, stdin, script, &r.args)
        }
    };
    let started = Instant::now();
    let outcome = match session.execute(cell, Some(deadline), None).await {
        Ok(outcome) => outcome,
        Err(e) => return RunCodeResponse::sandbox_error(&e),
    };
    let elapsed = started.elapsed().as_secs_f64();
    let run_result = command_result(outcome, elapsed);
    let fetched = fetch(&session, &r.fetch_files).await;
    let status = match (run_result.status, run_result.return_code) {
        ("Finished", Some(0)) => "Success",
        _ => "Failed",
    };
    RunCodeResponse {
        status,
        message: String::new(),
        compile_result: None,
        run_result: Some(run_result),
        executor_pod_name: None,
        files: fetched,
    }
}

/// SandboxFusion's `RunJupyterRequest`: cells run one after another in one interpreter.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct RunJupyterRequest {
    pub cells: Vec<String>,
    /// Seconds each cell may run; `0`: up to what is left of `total_timeout`.
    #[serde(default)]
    pub cell_timeout: f64,
    /// Seconds all the cells may run together (default 45).
    #[serde(default = "total_timeout")]
    pub total_timeout: f64,
    /// `python3`, the only kernel.
    #[serde(default = "python3")]
    pub kernel: String,
    #[serde(default)]
    pub files: BTreeMap<String, Option<String>>,
    #[serde(default)]
    pub fetch_files: Vec<String>,
}

fn total_timeout() -> f64 {
    45.0
}

fn python3() -> String {
    "python3".into()
}

/// One cell's outcome, as SandboxFusion reports it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CellRunResult {
    pub stdout: String,
    pub stderr: String,
    /// What the cell displayed, its value last: MIME type to content.
    #[schema(value_type = Vec<Object>)]
    pub display: Vec<arl_runtimes::Bundle>,
    /// `{"ename", "evalue", "traceback": [lines]}` for an uncaught exception.
    #[schema(value_type = Vec<Object>)]
    pub error: Vec<serde_json::Value>,
}

/// SandboxFusion's `RunJupyterResponse`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RunJupyterResponse {
    /// `Success` when every cell ran without an uncaught exception in time, `Failed`
    /// otherwise, `SandboxError` for ARL's own trouble.
    pub status: &'static str,
    pub message: String,
    /// How the run went as a whole (`TimeLimitExceeded` past a deadline).
    pub driver: Option<CommandRunResult>,
    pub cells: Vec<CellRunResult>,
    pub executor_pod_name: Option<String>,
    pub files: BTreeMap<String, String>,
}

impl RunJupyterResponse {
    fn refused(status: &'static str, message: String) -> Self {
        Self {
            status,
            message,
            driver: None,
            cells: vec![],
            executor_pod_name: None,
            files: BTreeMap::new(),
        }
    }
}

/// Runs notebook cells in one fresh session (SandboxFusion's `/run_jupyter`).
#[utoipa::path(post, path = "/run_jupyter", operation_id = "fusion_run_jupyter", tag = "sandbox-fusion",
    request_body(content = RunJupyterRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Each cell's outcome", body = RunJupyterResponse),
        (status = 400, description = "`invalid_json`", body = ErrorBody),
        (status = 422, description = "`invalid_request`: not a RunJupyterRequest", body = ErrorBody),
    ))]
pub async fn run_jupyter(
    State(registry): State<Registry>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<RunJupyterResponse>> {
    let request: RunJupyterRequest = parse(body, false)?;
    Ok(Json(notebook(&registry, request).await))
}

async fn notebook(registry: &Registry, r: RunJupyterRequest) -> RunJupyterResponse {
    let failed = |message: String| RunJupyterResponse::refused("Failed", message);
    if r.kernel != "python3" {
        return failed(format!(
            "kernel `{}` is not served here: only python3",
            r.kernel
        ));
    }
    let max = registry.config().max_timeout.as_secs_f64();
    let in_range = |t: f64| t.is_finite() && (0.0..=max).contains(&t);
    if !in_range(r.cell_timeout) || !in_range(r.total_timeout) || r.total_timeout == 0.0 {
        return failed(format!(
            "cell_timeout must be 0 to {max} seconds and total_timeout more than 0 and at most {max}"
        ));
    }
    let files = match decode_files(&r.files) {
        Ok(files) => files,
        Err(message) => return failed(message),
    };
    if let Some(e) = r.fetch_files.iter().find_map(|p| relative(p).err()) {
        return failed(format!("fetch_files: {e}"));
    }
    let session = match registry.create(CreateRequest::default()).await {
        Ok(session) => session,
        Err(e) => return RunJupyterResponse::refused("SandboxError", e.public_message()),
    };
    let _delete = Deleted(registry, session.id.clone());
    if let Err(e) = write_files(&session.workspace, files).await {
        return match e {
            Error::BadPath(..) | Error::QuotaExceeded(_) => failed(e.to_string()),
            e => RunJupyterResponse::refused("SandboxError", e.public_message()),
        };
    }
    let started = Instant::now();
    let total = Duration::from_secs_f64(r.total_timeout);
    let (mut cells, mut timed_out, mut errored) = (Vec::new(), false, false);
    for code in r.cells {
        let left = total.saturating_sub(started.elapsed());
        let deadline = match r.cell_timeout {
            0.0 => left,
            t => Duration::from_secs_f64(t).min(left),
        };
        if deadline.is_zero() {
            timed_out = true;
            break;
        }
        let o = match session.execute(code, Some(deadline), None).await {
            Ok(outcome) => outcome,
            Err(e) => return RunJupyterResponse::refused("SandboxError", e.public_message()),
        };
        timed_out = matches!(o.rolled_back, Some(Rollback::Deadline))
            || matches!(o.ended, Some(EndReason::Deadline | EndReason::Lifetime));
        let error = o.error.as_ref().filter(|_| !timed_out).map(|e| {
            serde_json::json!({
                "ename": e.kind,
                "evalue": e.message,
                "traceback": e.traceback.lines().collect::<Vec<_>>(),
            })
        });
        errored |= error.is_some();
        let display = o
            .results
            .into_iter()
            .map(|mut bundle| {
                bundle.remove("is_main_result");
                bundle
            })
            .collect();
        cells.push(CellRunResult {
            stdout: o.stdout,
            stderr: o.stderr,
            display,
            error: error.into_iter().collect(),
        });
        if timed_out || o.ended.is_some() {
            break;
        }
    }
    let files = fetch(&session, &r.fetch_files).await;
    RunJupyterResponse {
        status: if timed_out || errored {
            "Failed"
        } else {
            "Success"
        },
        message: String::new(),
        driver: Some(CommandRunResult {
            status: if timed_out {
                "TimeLimitExceeded"
            } else {
                "Finished"
            },
            execution_time: Some(started.elapsed().as_secs_f64()),
            return_code: (!timed_out).then_some(0),
            stdout: String::new(),
            stderr: String::new(),
        }),
        cells,
        executor_pod_name: None,
        files,
    }
}

/// Deletes the program's session however the run ends (the caller gone included).
struct Deleted<'a>(&'a Registry, String);

impl Drop for Deleted<'_> {
    fn drop(&mut self) {
        self.0.discard(&self.1);
    }
}

/// How a script turn ran, in a process's terms.
fn command_result(o: Outcome, seconds: f64) -> CommandRunResult {
    let timed_out = matches!(o.rolled_back, Some(Rollback::Deadline))
        || matches!(o.ended, Some(EndReason::Deadline | EndReason::Lifetime));
    let mut stderr = o.stderr;
    let return_code = match (&o.result, &o.error, &o.ended) {
        _ if timed_out => None,
        (Some(status), None, _) => Some(status.parse::<i64>().map_or(1, |s| s.rem_euclid(256))),
        (_, _, Some(EndReason::Exit(code))) => Some(code.rem_euclid(256)),
        (_, Some(e), _) => {
            // The script runner itself did not finish (out of memory, a trap): what a
            // process killed that way would leave.
            stderr.push_str(if e.traceback.is_empty() {
                &e.message
            } else {
                &e.traceback
            });
            stderr.push('\n');
            Some(1)
        }
        _ => Some(1),
    };
    CommandRunResult {
        status: if timed_out {
            "TimeLimitExceeded"
        } else {
            "Finished"
        },
        execution_time: Some(seconds),
        return_code,
        stdout: o.stdout,
        stderr,
    }
}

/// `files` decoded, each under a path checked to stay in the workspace.
fn decode_files(files: &BTreeMap<String, Option<String>>) -> Result<Vec<(String, Bytes)>, String> {
    let mut decoded = Vec::with_capacity(files.len());
    for (path, content) in files {
        let rel = relative(path).map_err(|e| format!("files: {e}"))?;
        let bytes = BASE64
            .decode(content.as_deref().unwrap_or_default())
            .map_err(|e| format!("files[{path:?}] is not base64: {e}"))?;
        decoded.push((rel.to_owned(), Bytes::from(bytes)));
    }
    Ok(decoded)
}

/// A path the program names, relative to its working folder (`/workspace`, where it runs):
/// relative, or absolute within `/workspace`.
fn relative(path: &str) -> Result<&str, String> {
    let rel = match path.strip_prefix("/workspace/") {
        Some(rel) => rel,
        None if path.starts_with('/') => {
            return Err(format!("{path:?} is outside the working folder /workspace"));
        }
        None => path.strip_prefix("./").unwrap_or(path),
    };
    files::check(rel).map_err(|e| e.to_string())?;
    Ok(rel)
}

async fn write_files(workspace: &Arc<Workspace>, files: Vec<(String, Bytes)>) -> crate::Result<()> {
    for (path, bytes) in files {
        let data = futures_util::stream::once(async move { Ok(bytes) });
        files::upload(workspace.clone(), path, data).await?;
    }
    Ok(())
}

/// The `paths` that exist in the session's workspace, base64; the others are left out.
async fn fetch(session: &Session, paths: &[String]) -> BTreeMap<String, String> {
    let mut fetched = BTreeMap::new();
    for path in paths {
        let Ok(rel) = relative(path) else { continue };
        let rel = rel.to_owned();
        let read = files::on_workspace(session.workspace.clone(), move |w| w.read(&rel)).await;
        if let Ok(bytes) = read {
            fetched.insert(path.clone(), BASE64.encode(bytes));
        }
    }
    fetched
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn paths_stay_in_the_working_folder() {
        assert_eq!(relative("a/b.txt"), Ok("a/b.txt"));
        assert_eq!(relative("./a.txt"), Ok("a.txt"));
        assert_eq!(relative("/workspace/a.txt"), Ok("a.txt"));
        for bad in [
            "/etc/passwd",
            "../x",
            "a/../../x",
            "/workspace/../etc",
            "/tmp/x",
            "",
        ] {
            assert!(relative(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn files_that_do_not_decode_are_named() {
        let files = BTreeMap::from([("in.txt".to_owned(), Some("not base64!".to_owned()))]);
        let e = decode_files(&files).unwrap_err();
        assert!(e.contains("in.txt") && e.contains("base64"), "{e}");
        let ok = BTreeMap::from([
            ("in.txt".to_owned(), Some(BASE64.encode("hi"))),
            ("empty".to_owned(), None),
        ]);
        let decoded = decode_files(&ok).unwrap();
        assert_eq!(decoded[1], ("in.txt".to_owned(), Bytes::from_static(b"hi")));
        assert_eq!(decoded[0].1.len(), 0);
    }
}
