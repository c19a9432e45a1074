//! The agent's operations over HTTP, as the seeds' sidecar names them: `POST /files`,
//! `POST /execute`, `POST /signal`, `POST /reset`, `GET /health`. Bodies are JSON; an execute
//! answers its whole result, or with `Accept: text/event-stream` a stream of events as the
//! manager's execute does (`started`, `stdout`, `stderr`, then `result` or `error`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use arl_proto::sidecar::{ExecLog, ExecRequest, FileRequest, ResetRequest, SignalRequest};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::agent::{ExecStream, Executor};
use crate::error::{ExecError, Kind, Result};

/// The routes over `executor`. The handlers are public so that the manager in front of an
/// agent serves the same ones under its session routes.
pub fn router<E: Executor>(executor: Arc<E>) -> Router {
    Router::new()
        .route("/health", get(health::<E>))
        .route("/files", post(files::<E>))
        .route("/execute", post(execute::<E>))
        .route("/signal", post(signal::<E>))
        .route("/reset", post(reset::<E>))
        .layer(DefaultBodyLimit::max(crate::MAX_MESSAGE))
        .with_state(executor)
}

/// A command line: argv, or one string run by `/bin/sh -c`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CommandLine {
    Argv(Vec<String>),
    Shell(String),
}

impl Default for CommandLine {
    fn default() -> Self {
        CommandLine::Argv(Vec::new())
    }
}

/// What `/execute` takes (and the manager's `/v1/sessions/{id}/commands`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    pub command: CommandLine,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Relative to the workspace; `cwd` is taken too.
    #[serde(default, alias = "cwd")]
    pub working_dir: String,
    #[serde(default)]
    pub background: bool,
    #[serde(default)]
    pub timeout_seconds: i32,
    #[serde(default)]
    pub timeout_ms: u64,
}

impl ExecBody {
    pub fn into_request(self) -> ExecRequest {
        let command = match self.command {
            CommandLine::Argv(argv) => argv,
            CommandLine::Shell(line) => vec!["/bin/sh".into(), "-c".into(), line],
        };
        ExecRequest {
            command,
            env: self.env.into_iter().collect(),
            working_dir: self.working_dir,
            background: self.background,
            timeout_seconds: self.timeout_seconds,
            timeout_ms: self.timeout_ms,
        }
    }
}

/// What an execute answers (and a stream's `result` event).
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExecResult {
    pub pid: i32,
    /// `None` while it runs: a service started in the background.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Output passed the cap; the rest was dropped.
    pub truncated: bool,
    /// The deadline passed and the process group was killed.
    pub timed_out: bool,
    pub duration_ms: u64,
}

impl ExecResult {
    /// Adds one message of a command's log.
    pub fn add(&mut self, log: ExecLog, background: bool) {
        if log.pid != 0 {
            self.pid = log.pid;
        }
        self.stdout.push_str(&log.stdout);
        self.stderr.push_str(&log.stderr);
        if log.done && !(background && log.pid != 0) {
            self.exit_code = Some(log.exit_code);
        }
        self.truncated |= log.truncated;
        self.timed_out |= log.timed_out;
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilesBody {
    #[serde(default)]
    base_path: String,
    #[serde(default)]
    files: BTreeMap<String, String>,
    #[serde(default)]
    patch: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalBody {
    pid: i32,
    signal: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetBody {
    #[serde(default)]
    pub preserve_files: bool,
}

/// Parses a JSON body: malformed JSON is 400 `invalid_json`, the wrong shape 422
/// `invalid_request`; an empty body is `T::default()` when `empty_ok`.
pub fn parse<T: DeserializeOwned + Default>(body: &Bytes, empty_ok: bool) -> Result<T> {
    if empty_ok && body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => ExecError::new(Kind::Unprocessable, "invalid_request", e.to_string()),
            _ => ExecError::invalid("invalid_json", format!("the body is not valid JSON: {e}")),
        }
    })
}

async fn health<E: Executor>(State(agent): State<Arc<E>>) -> Result<Json<serde_json::Value>> {
    agent.health().await?;
    Ok(Json(serde_json::json!({"status": "ok"})))
}

pub async fn files<E: Executor>(State(agent): State<Arc<E>>, body: Bytes) -> Result<Response> {
    let body: FilesBody = parse(&body, false)?;
    let request = FileRequest {
        base_path: body.base_path,
        files: body.files.into_iter().collect(),
        patch: body.patch,
    };
    let answer = agent.update_files(request).await?;
    Ok(
        Json(serde_json::json!({"success": answer.success, "message": answer.message}))
            .into_response(),
    )
}

pub async fn execute<E: Executor>(
    State(agent): State<Arc<E>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match parse::<ExecBody>(&body, false) {
        Ok(body) => execute_response(&*agent, body.into_request(), &headers).await,
        Err(e) => e.into_response(),
    }
}

pub async fn signal<E: Executor>(State(agent): State<Arc<E>>, body: Bytes) -> Result<Response> {
    let body: SignalBody = parse(&body, false)?;
    let answer = agent
        .signal(SignalRequest {
            pid: body.pid,
            signal: body.signal,
        })
        .await?;
    Ok(
        Json(serde_json::json!({"success": answer.success, "message": answer.message}))
            .into_response(),
    )
}

pub async fn reset<E: Executor>(State(agent): State<Arc<E>>, body: Bytes) -> Result<Response> {
    let body: ResetBody = parse(&body, true)?;
    let answer = agent
        .reset(ResetRequest {
            preserve_files: body.preserve_files,
        })
        .await?;
    Ok(
        Json(serde_json::json!({"success": answer.success, "message": answer.message}))
            .into_response(),
    )
}

/// Runs `request` on `executor` and answers as `/execute` does: the whole [`ExecResult`], or
/// events when `headers` accept `text/event-stream`.
pub async fn execute_response<E: Executor>(
    executor: &E,
    request: ExecRequest,
    headers: &HeaderMap,
) -> Response {
    let background = request.background;
    let started = Instant::now();
    let log = match executor.execute(request).await {
        Ok(log) => log,
        Err(e) => return e.into_response(),
    };
    if wants_events(headers) {
        return Sse::new(events(log, background, started))
            .keep_alive(KeepAlive::default())
            .into_response();
    }
    match collect(log, background, started).await {
        Ok(result) => Json(result).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A whole command's result from its log.
pub async fn collect(
    mut log: ExecStream,
    background: bool,
    started: Instant,
) -> Result<ExecResult> {
    let mut result = ExecResult::default();
    while let Some(message) = log.next().await {
        result.add(message?, background);
    }
    result.duration_ms = started.elapsed().as_millis() as u64;
    Ok(result)
}

fn events(
    log: ExecStream,
    background: bool,
    started: Instant,
) -> impl futures_util::Stream<Item = std::result::Result<Event, Infallible>> {
    let mut result = ExecResult::default();
    let mut finished = false;
    log.map(Some)
        .chain(futures_util::stream::once(async { None }))
        .filter_map(move |message| {
            let events = match message {
                _ if finished => vec![],
                Some(Ok(log)) => {
                    let mut events = Vec::new();
                    if log.pid != 0 && result.pid == 0 {
                        events.push(json_event("started", &serde_json::json!({"pid": log.pid})));
                    }
                    for (name, text) in [("stdout", &log.stdout), ("stderr", &log.stderr)] {
                        if !text.is_empty() {
                            events.push(json_event(name, &serde_json::json!({"text": text})));
                        }
                    }
                    result.add(log, background);
                    events
                }
                Some(Err(e)) => {
                    finished = true;
                    vec![json_event("error", &e.body())]
                }
                None => {
                    result.duration_ms = started.elapsed().as_millis() as u64;
                    vec![json_event("result", &result)]
                }
            };
            futures_util::future::ready(Some(futures_util::stream::iter(
                events.into_iter().map(Ok),
            )))
        })
        .flatten()
}

fn json_event(name: &str, data: &impl Serialize) -> Event {
    Event::default()
        .event(name)
        .data(serde_json::to_string(data).unwrap_or_default())
}

/// Whether the client accepts `text/event-stream`.
pub fn wants_events(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().starts_with("text/event-stream"))
        })
}
