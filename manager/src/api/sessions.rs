//! `/v1/sessions`: create, show, list, delete, and execute (JSON, or streamed as Server-Sent
//! Events when the client accepts `text/event-stream`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiResult, ErrorBody, parse};
use crate::Result;
use crate::output::Stream;
use crate::registry::{CreateRequest, Registry, Target};
use crate::rfc3339;
use crate::session::{Info, Limits, Outcome, Session, TurnEvent, TurnStream};

/// How often a silent stream sends a comment, so that a client that went away is noticed
/// (and its turn stopped) within about two of these.
const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// A session as `/v1` shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SessionView {
    pub id: String,
    pub runtime: String,
    /// `starting`, `idle`, `running`, `suspended` (in the store; its next request resumes
    /// it) or `ended`.
    pub state: &'static str,
    /// RFC 3339.
    pub created_at: String,
    pub last_used_at: String,
    pub executions: u64,
    /// The guest's linear memory now.
    pub memory_bytes: u64,
    pub limits: LimitsView,
    /// The labels given at create.
    pub metadata: BTreeMap<String, String>,
    /// What its guest may reach over brokered HTTP (the allow-list and budgets), what it
    /// has spent, and its host tools.
    pub network: crate::egress::Summary,
    /// Bytes the store holds of it while it is suspended (its compressed image; 0 while it
    /// is live).
    pub stored_bytes: u64,
}

/// Limits as `/v1` shows them.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LimitsView {
    pub timeout_ms: u64,
    pub memory_mib: u64,
    pub output_bytes: usize,
    pub idle_ttl_s: u64,
    pub lifetime_s: u64,
    pub workspace_bytes: u64,
    /// Failed turns are rolled back (`true`) or end the session.
    pub rollback: bool,
}

impl From<Limits> for LimitsView {
    fn from(l: Limits) -> Self {
        Self {
            timeout_ms: l.timeout.as_millis() as u64,
            memory_mib: l.memory_bytes >> 20,
            output_bytes: l.output_bytes,
            idle_ttl_s: l.idle_ttl.as_secs(),
            lifetime_s: l.lifetime.as_secs(),
            workspace_bytes: l.workspace_bytes,
            rollback: l.rollback,
        }
    }
}

impl From<Info> for SessionView {
    fn from(i: Info) -> Self {
        Self {
            id: i.id,
            runtime: i.runtime,
            state: i.state.name(),
            created_at: rfc3339(i.created_at),
            last_used_at: rfc3339(i.last_used_at),
            executions: i.executions,
            memory_bytes: i.memory_bytes,
            limits: i.limits.into(),
            metadata: (*i.metadata).clone(),
            network: i.network,
            stored_bytes: i.stored_bytes,
        }
    }
}

/// What a create answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Created {
    pub id: String,
    pub runtime: String,
    pub created_at: String,
    pub limits: LimitsView,
}

impl Created {
    pub(super) fn of(session: &Session) -> Self {
        Self {
            id: session.id.clone(),
            runtime: session.runtime.clone(),
            created_at: rfc3339(session.created_at()),
            limits: session.limits.into(),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionView>,
}

/// Creates a session. The body is optional; every field has a default.
#[utoipa::path(post, path = "/v1/sessions", operation_id = "create_session", tag = "sessions",
    request_body(content = Option<CreateRequest>, content_type = "application/json"),
    responses(
        (status = 201, description = "Created", body = Created),
        (status = 400, description = "Malformed JSON (`invalid_json`)", body = ErrorBody),
        (status = 404, description = "`snapshot_not_found`: `from_snapshot` names none", body = ErrorBody),
        (status = 422, description = "`invalid_request`, `unknown_runtime`, `unknown_language` or \
            `invalid_snapshot`", body = ErrorBody),
        (status = 429, description = "At capacity (`capacity_exhausted`); see Retry-After", body = ErrorBody),
        (status = 503, description = "`not_ready`, `draining` or `shutting_down`", body = ErrorBody),
    ))]
pub async fn create(
    State(registry): State<Registry>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Created>)> {
    let request: CreateRequest = parse(body, true)?;
    let session = registry.create(request).await?;
    Ok((StatusCode::CREATED, Json(Created::of(&session))))
}

/// Live sessions, oldest first.
#[utoipa::path(get, path = "/v1/sessions", operation_id = "list_sessions", tag = "sessions",
    responses((status = 200, description = "Live sessions", body = SessionList)))]
pub async fn list(State(registry): State<Registry>) -> Json<SessionList> {
    let sessions = registry.list().into_iter().map(Into::into).collect();
    Json(SessionList { sessions })
}

/// One session, live or suspended (looking does not resume it).
#[utoipa::path(get, path = "/v1/sessions/{id}", operation_id = "get_session", tag = "sessions",
    params(("id" = String, Path, description = "The session's id")),
    responses(
        (status = 200, description = "The session", body = SessionView),
        (status = 404, description = "`session_not_found`", body = ErrorBody),
        (status = 410, description = "`session_ended`, with the reason (`lost`: held by a \
            manager that stopped without saving it)", body = ErrorBody),
        (status = 421, description = "`session_moved`: another manager holds it (`reason` \
            names it)", body = ErrorBody),
    ))]
pub async fn show(
    State(registry): State<Registry>,
    Path(id): Path<String>,
) -> ApiResult<Json<SessionView>> {
    Ok(Json(registry.info(&id).await?.into()))
}

/// Suspends the session now, after the turns already queued: its state goes to the store and
/// its memory is freed. Its next request resumes it under the same id.
#[utoipa::path(post, path = "/v1/sessions/{id}/suspend", operation_id = "suspend_session", tag = "sessions",
    params(("id" = String, Path, description = "The session's id")),
    responses(
        (status = 200, description = "The session, `suspended`", body = SessionView),
        (status = 404, description = "`session_not_found`", body = ErrorBody),
        (status = 409, description = "`snapshot_refused`: its state cannot be taken now", body = ErrorBody),
        (status = 410, description = "`session_ended`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`: the store refused it; the session \
            stays live", body = ErrorBody),
    ))]
pub async fn suspend(
    State(registry): State<Registry>,
    Path(id): Path<String>,
) -> ApiResult<Json<SessionView>> {
    Ok(Json(registry.suspend(&id).await?.into()))
}

/// Resumes a suspended session now (any request to it would); a live one is left as it is.
#[utoipa::path(post, path = "/v1/sessions/{id}/resume", operation_id = "resume_session", tag = "sessions",
    params(("id" = String, Path, description = "The session's id")),
    responses(
        (status = 200, description = "The session, live", body = SessionView),
        (status = 404, description = "`session_not_found`", body = ErrorBody),
        (status = 410, description = "`session_ended` (`lost`: the store cannot give it back)", body = ErrorBody),
        (status = 429, description = "`capacity_exhausted`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    ))]
pub async fn resume(
    State(registry): State<Registry>,
    Path(id): Path<String>,
) -> ApiResult<Json<SessionView>> {
    Ok(Json(registry.resume_now(&id).await?.into()))
}

/// Ends the session now (a running execution is stopped) and removes its workspace.
#[utoipa::path(delete, path = "/v1/sessions/{id}", operation_id = "delete_session", tag = "sessions",
    params(("id" = String, Path, description = "The session's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "`session_not_found`", body = ErrorBody),
        (status = 410, description = "`session_ended`", body = ErrorBody),
    ))]
pub async fn delete(
    State(registry): State<Registry>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    registry.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecuteRequest {
    /// Source code, run as the session's next turn.
    #[schema(example = "x = 41\nx + 1")]
    pub code: String,
    /// Overrides the session's deadline for this turn.
    #[serde(default, deserialize_with = "crate::registry::request::whole_number")]
    #[schema(minimum = 1, maximum = 3_600_000)]
    pub timeout_ms: Option<u64>,
}

/// What an execution returns on `/v1` (and, on a stream, the final `result` event).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ExecuteResponse {
    pub stdout: String,
    pub stderr: String,
    /// The repr of the final expression, when there is one and it is not `None`.
    pub result: Option<String>,
    /// The exception the code raised and did not catch; the session lives on.
    pub error: Option<arl_runtimes::GuestError>,
    pub duration_ms: f64,
    /// Some output (or the result) passed the cap and was cut.
    pub truncated: bool,
    pub session_ended: bool,
    /// Why the session ended, when this execution ended it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
    /// The execution's effects were undone (it timed out, trapped, was cancelled or blew the
    /// memory limit): the session carries on from its state before it.
    pub rolled_back: bool,
    /// Why: `deadline`, `trap: ...`, `cancelled`, `memory` or `disk_quota`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollback_reason: Option<String>,
    /// What the turn displayed, as Jupyter's MIME bundles (`text/plain`, `text/html`,
    /// `image/png` in base64, `application/json`...), in order; the final expression's last,
    /// with `"is_main_result": true`. `display(obj)` and open matplotlib figures add to it.
    #[schema(value_type = Vec<Object>)]
    pub results: Vec<arl_runtimes::Bundle>,
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
            rolled_back: o.rolled_back.is_some(),
            rollback_reason: o.rolled_back.map(|r| r.to_string()),
            results: o.results,
        }
    }
}

/// Runs code as the session's next turn.
///
/// With `Accept: text/event-stream` the answer is a stream of Server-Sent Events: `stdout` and
/// `stderr` events (`{"text": ...}`) as the guest writes, then one `result` event with the
/// whole [`ExecuteResponse`] (or an `error` event). A client that disconnects stops the turn.
#[utoipa::path(post, path = "/v1/sessions/{id}/execute", operation_id = "execute", tag = "sessions",
    params(("id" = String, Path, description = "The session's id")),
    request_body = ExecuteRequest,
    responses(
        (status = 200, description = "The outcome, or a stream of events ending with it", content(
            (ExecuteResponse = "application/json"),
            (String = "text/event-stream"),
        )),
        (status = 400, description = "Malformed JSON (`invalid_json`)", body = ErrorBody),
        (status = 404, description = "`session_not_found`", body = ErrorBody),
        (status = 409, description = "Too many executions queued (`session_busy`)", body = ErrorBody),
        (status = 410, description = "`session_ended`, with the reason", body = ErrorBody),
        (status = 422, description = "`invalid_request`", body = ErrorBody),
    ))]
pub async fn execute(
    State(registry): State<Registry>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let request: ExecuteRequest = parse(body, false)?;
    let Target { session, timeout } = registry.target(&id, request.timeout_ms).await?;
    if wants_events(&headers) {
        let turn = session.execute_streaming(request.code, timeout);
        return Ok(Sse::new(sse_events(turn))
            .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
            .into_response());
    }
    let outcome = session.execute(request.code, timeout, None).await?;
    Ok(Json(ExecuteResponse::from(outcome)).into_response())
}

fn wants_events(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().starts_with("text/event-stream"))
        })
}

/// A turn's events with its output as text: a UTF-8 sequence that a chunk boundary cut is
/// joined, and what is left of each stream comes before the outcome.
pub(super) enum Piece {
    Text(Stream, String),
    Done(Box<Result<Outcome>>),
}

/// `turn` as [`Piece`]s. Dropping the stream drops the turn's, which stops the turn.
pub(super) fn pieces(turn: TurnStream) -> impl futures_util::Stream<Item = Piece> {
    let mut text: [Utf8Carry; 2] = Default::default();
    turn.flat_map(move |event| {
        let pieces: Vec<Piece> = match event {
            TurnEvent::Output(chunk) => {
                let t = text[chunk.stream as usize].push(&chunk.data);
                (!t.is_empty())
                    .then(|| Piece::Text(chunk.stream, t))
                    .into_iter()
                    .collect()
            }
            TurnEvent::Done(outcome) => {
                let mut last: Vec<Piece> = [Stream::Stdout, Stream::Stderr]
                    .into_iter()
                    .filter_map(|s| {
                        let rest = text[s as usize].finish();
                        (!rest.is_empty()).then(|| Piece::Text(s, rest))
                    })
                    .collect();
                last.push(Piece::Done(Box::new(outcome)));
                last
            }
        };
        futures_util::stream::iter(pieces)
    })
}

/// A turn's events as Server-Sent Events. Dropping it (the client went away) drops the
/// turn's stream, which stops the turn.
fn sse_events(
    turn: TurnStream,
) -> impl futures_util::Stream<Item = std::result::Result<Event, Infallible>> {
    pieces(turn).flat_map(|piece| {
        let events = match piece {
            Piece::Text(stream, text) => vec![text_event(stream, &text)],
            Piece::Done(outcome) => {
                // What the turn displayed, each as a `display` event, before its result.
                let outcome = *outcome;
                let mut last: Vec<Event> = match &outcome {
                    Ok(outcome) => outcome
                        .results
                        .iter()
                        .filter(|r| !is_main(r))
                        .map(|r| {
                            Event::default()
                                .event("display")
                                .data(serde_json::Value::Object(r.clone()).to_string())
                        })
                        .collect(),
                    Err(_) => vec![],
                };
                last.push(outcome_event(outcome));
                last
            }
        };
        futures_util::stream::iter(events.into_iter().map(Ok))
    })
}

fn is_main(bundle: &arl_runtimes::Bundle) -> bool {
    bundle.get("is_main_result") == Some(&serde_json::Value::Bool(true))
}

fn text_event(stream: Stream, text: &str) -> Event {
    Event::default()
        .event(stream.name())
        .data(serde_json::json!({ "text": text }).to_string())
}

fn outcome_event(outcome: Result<Outcome>) -> Event {
    let (name, data) = match outcome {
        Ok(outcome) => (
            "result",
            serde_json::to_string(&ExecuteResponse::from(outcome)),
        ),
        Err(e) => ("error", serde_json::to_string(&ApiError::from(e).body())),
    };
    Event::default().event(name).data(data.unwrap_or_default()) // these types always serialize
}

/// Turns bytes into text without splitting a UTF-8 sequence that a chunk boundary cut.
#[derive(Debug, Default)]
struct Utf8Carry(Vec<u8>);

impl Utf8Carry {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.0.extend_from_slice(bytes);
        let keep = incomplete_tail(&self.0);
        let tail = self.0.split_off(self.0.len() - keep);
        let text = String::from_utf8_lossy(&self.0).into_owned();
        self.0 = tail;
        text
    }

    /// Whatever is left, complete or not.
    fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.0).into_owned();
        self.0.clear();
        text
    }
}

/// How many bytes at the end of `b` begin a UTF-8 sequence that is not complete yet.
fn incomplete_tail(b: &[u8]) -> usize {
    for back in 1..=b.len().min(3) {
        let byte = b[b.len() - back];
        if byte & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for the lead
        }
        let needs = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if needs > back { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_cut_between_chunks_come_out_whole() {
        let mut carry = Utf8Carry::default();
        let bytes = "é€😀".as_bytes();
        let mut text = String::new();
        for b in bytes {
            text.push_str(&carry.push(std::slice::from_ref(b)));
        }
        assert_eq!(text, "é€😀");
        assert_eq!(carry.push(b"ok\n"), "ok\n");
    }

    #[test]
    fn accept_headers_pick_the_stream() {
        let mut h = HeaderMap::new();
        assert!(!wants_events(&h));
        let both = axum::http::HeaderValue::from_static("application/json, text/event-stream");
        h.insert(header::ACCEPT, both);
        assert!(wants_events(&h));
    }
}
