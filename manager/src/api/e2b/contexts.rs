//! The code interpreter's contexts: namespaces of a sandbox's interpreter beside its own, each
//! with its own variables and the folder its cells start in (`POST`/`GET /contexts`,
//! `DELETE /contexts/{id}`, `POST /contexts/{id}/restart`). They share the interpreter's
//! imported modules and the sandbox's files, as threads of one process would.
//!
//! Languages: a sandbox is a Python session; its `js` and `ts` code runs in a companion
//! session of the `javascript` or `typescript` runtime, made on first use with the sandbox's
//! limits and ended with it ([`kernel`]). A companion has its own `/workspace`: files the
//! sandbox's file API writes are the Python session's.

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use super::{E2bError, E2bResult, refuse, sandbox};
use crate::registry::{CreateRequest, Registry};
use crate::session::Session;

/// The folder E2B code expects to start in, and what the guest calls it.
const HOME: &str = "/home/user";
const WORKSPACE: &str = "/workspace";

/// The runtime that runs an E2B `language`; `None` for the sandbox's own (Python).
fn runtime_for(language: Option<&str>) -> Result<Option<&'static str>, E2bError> {
    match language {
        None | Some("python" | "python3") => Ok(None),
        Some("js" | "javascript" | "nodejs" | "node") => Ok(Some("javascript")),
        Some("ts" | "typescript") => Ok(Some("typescript")),
        Some(other) => Err(E2bError(
            StatusCode::BAD_REQUEST,
            format!(
                "language `{other}` is not served here: python, js (javascript), ts (typescript)"
            ),
        )),
    }
}

/// E2B's name for the language a runtime runs.
fn language_of(runtime: &str) -> &'static str {
    match runtime {
        "javascript" => "js",
        "typescript" => "ts",
        _ => "python",
    }
}

/// The session that runs `language` for `sandbox`: the sandbox itself for its own language,
/// otherwise its companion of that runtime, made on first use with the sandbox's limits.
pub(super) async fn kernel(
    registry: &Registry,
    sandbox: &Arc<Session>,
    language: Option<&str>,
) -> Result<Arc<Session>, E2bError> {
    let Some(runtime) = runtime_for(language)? else {
        return Ok(sandbox.clone());
    };
    if sandbox.runtime == runtime {
        return Ok(sandbox.clone());
    }
    if let Some(companion) = sandbox.companion(runtime) {
        return Ok(companion);
    }
    let limits = sandbox.limits;
    let request = CreateRequest {
        runtime: Some(runtime.to_owned()),
        timeout_ms: Some(u64::try_from(limits.timeout.as_millis()).unwrap_or(u64::MAX)),
        memory_mib: Some(limits.memory_bytes >> 20),
        idle_ttl_secs: Some(limits.idle_ttl.as_secs().max(1)),
        lifetime_secs: Some(sandbox.time_left().as_secs().max(1)),
        rollback: Some(limits.rollback),
        ..CreateRequest::default()
    };
    let companion = registry.create(request).await?;
    Ok(sandbox.adopt_companion(companion))
}

/// The session holding context `id` among `sandbox` and its companions, and the context.
pub(super) fn find(
    sandbox: &Arc<Session>,
    id: &str,
) -> Option<(Arc<Session>, arl_runtimes::Context)> {
    std::iter::once(sandbox.clone())
        .chain(sandbox.companions())
        .find_map(|s| s.context(id).map(|c| (s, c)))
}

/// What `create_code_context` sends.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct NewContext {
    /// `python` (or absent), `js` or `ts`.
    pub language: Option<String>,
    /// Where its cells start: `/home/user` (the sandbox's files) unless given.
    pub cwd: Option<String>,
}

/// A context as the SDK reads it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ContextView {
    pub id: String,
    pub language: &'static str,
    /// As E2B names it: `/home/user/...` for the sandbox's files.
    pub cwd: String,
}

/// The guest's name for an E2B folder: `/home/user` is `/workspace`.
fn guest_path(cwd: &str) -> String {
    match cwd.strip_prefix(HOME) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => format!("{WORKSPACE}{rest}"),
        _ => cwd.to_owned(),
    }
}

/// E2B's name for a guest folder.
fn e2b_path(cwd: &str) -> String {
    match cwd.strip_prefix(WORKSPACE) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => format!("{HOME}{rest}"),
        _ => cwd.to_owned(),
    }
}

fn view(context: arl_runtimes::Context, runtime: &str) -> ContextView {
    ContextView {
        id: context.id,
        language: language_of(runtime),
        cwd: e2b_path(&context.cwd),
    }
}

/// Opens a context in the sandbox named by `E2b-Sandbox-Id`. A cwd that does not exist fails
/// the context's cells with `FileNotFoundError`, as a kernel started there would.
#[utoipa::path(post, path = "/contexts", operation_id = "e2b_create_context", tag = "e2b",
    request_body(content = NewContext, content_type = "application/json"),
    params(("E2b-Sandbox-Id" = String, Header, description = "The sandbox's id")),
    responses(
        (status = 200, description = "The context", body = ContextView),
        (status = 400, description = "A language not served, or 64 contexts already", body = Object),
        (status = 404, description = "No such sandbox", body = Object),
    ))]
pub async fn create_context(
    State(registry): State<Registry>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> E2bResult {
    let asked: NewContext = super::body(body)?;
    let sandbox = sandbox(&registry, &headers).await?;
    let session = kernel(&registry, &sandbox, asked.language.as_deref()).await?;
    if !registry.has_contexts(&session.runtime) {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("the {} runtime has no contexts", session.runtime),
        );
    }
    let cwd = guest_path(asked.cwd.as_deref().unwrap_or(HOME));
    let context = session.add_context(cwd)?;
    Ok(Json(view(context, &session.runtime)).into_response())
}

/// The sandbox's contexts: its own (`default`, where code without a context runs) and those
/// opened, oldest first.
#[utoipa::path(get, path = "/contexts", operation_id = "e2b_list_contexts", tag = "e2b",
    params(("E2b-Sandbox-Id" = String, Header, description = "The sandbox's id")),
    responses(
        (status = 200, description = "The contexts", body = Vec<ContextView>),
        (status = 404, description = "No such sandbox", body = Object),
    ))]
pub async fn list_contexts(State(registry): State<Registry>, headers: HeaderMap) -> E2bResult {
    let session = sandbox(&registry, &headers).await?;
    let own = ContextView {
        id: DEFAULT.to_owned(),
        language: "python",
        cwd: HOME.to_owned(),
    };
    let all: Vec<ContextView> = std::iter::once(own)
        .chain(
            std::iter::once(session.arc())
                .chain(session.companions())
                .flat_map(|s| {
                    let runtime = s.runtime.clone();
                    s.contexts().into_iter().map(move |c| view(c, &runtime))
                }),
        )
        .collect();
    Ok(Json(all).into_response())
}

/// The id the sandbox's own namespace lists with.
pub(super) const DEFAULT: &str = "default";

/// Closes a context and drops its variables.
#[utoipa::path(delete, path = "/contexts/{id}", operation_id = "e2b_remove_context", tag = "e2b",
    params(("id" = String, Path, description = "The context's id"),
        ("E2b-Sandbox-Id" = String, Header, description = "The sandbox's id")),
    responses(
        (status = 204, description = "Closed"),
        (status = 400, description = "The sandbox's own context, which lives as long as it", body = Object),
        (status = 404, description = "No such sandbox or context", body = Object),
    ))]
pub async fn remove_context(
    State(registry): State<Registry>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> E2bResult {
    let sandbox = sandbox(&registry, &headers).await?;
    if id == DEFAULT {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the default context lives as long as the sandbox: restart it instead",
        );
    }
    let Some((session, _)) = find(&sandbox, &id) else {
        return no_context(&id);
    };
    if !session.remove_context(&id) {
        return no_context(&id);
    }
    registry.forget_context(&session, Some(&id)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Starts a context over: its variables are dropped (imported modules stay loaded).
#[utoipa::path(post, path = "/contexts/{id}/restart", operation_id = "e2b_restart_context", tag = "e2b",
    params(("id" = String, Path, description = "The context's id, or `default`"),
        ("E2b-Sandbox-Id" = String, Header, description = "The sandbox's id")),
    responses(
        (status = 204, description = "Restarted"),
        (status = 404, description = "No such sandbox or context", body = Object),
    ))]
pub async fn restart_context(
    State(registry): State<Registry>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> E2bResult {
    let sandbox = sandbox(&registry, &headers).await?;
    let (session, which) = if id == DEFAULT {
        (sandbox.arc(), None)
    } else if let Some((session, _)) = find(&sandbox, &id) {
        (session, Some(id.as_str()))
    } else {
        return no_context(&id);
    };
    if !registry.has_contexts(&session.runtime) {
        return no_context(&id);
    }
    registry.forget_context(&session, which).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn no_context(id: &str) -> E2bResult {
    refuse(StatusCode::NOT_FOUND, format!("no context `{id}` here"))
}
