//! The code interpreter's contexts: namespaces of a sandbox's interpreter beside its own, each
//! with its own variables and the folder its cells start in (`POST`/`GET /contexts`,
//! `DELETE /contexts/{id}`, `POST /contexts/{id}/restart`). They share the interpreter's
//! imported modules and the sandbox's files, as threads of one process would.

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{E2bResult, refuse, sandbox};
use crate::registry::Registry;

/// The folder E2B code expects to start in, and what the guest calls it.
const HOME: &str = "/home/user";
const WORKSPACE: &str = "/workspace";

/// What `create_code_context` sends.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct NewContext {
    /// `python` (or absent).
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

fn view(context: arl_runtimes::Context) -> ContextView {
    ContextView {
        id: context.id,
        language: "python",
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
    let session = sandbox(&registry, &headers)?;
    if let Some(language) = asked.language.filter(|l| l != "python") {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("language `{language}` is not served here: python only"),
        );
    }
    if !registry.has_contexts(&session.runtime) {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("the {} runtime has no contexts", session.runtime),
        );
    }
    let cwd = guest_path(asked.cwd.as_deref().unwrap_or(HOME));
    Ok(Json(view(session.add_context(cwd)?)).into_response())
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
    let session = sandbox(&registry, &headers)?;
    let own = ContextView {
        id: DEFAULT.to_owned(),
        language: "python",
        cwd: HOME.to_owned(),
    };
    let all: Vec<ContextView> = std::iter::once(own)
        .chain(session.contexts().into_iter().map(view))
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
    let session = sandbox(&registry, &headers)?;
    if id == DEFAULT {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the default context lives as long as the sandbox: restart it instead",
        );
    }
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
    let session = sandbox(&registry, &headers)?;
    if !registry.has_contexts(&session.runtime) {
        return no_context(&id);
    }
    let which = if id == DEFAULT {
        None
    } else if session.context(&id).is_some() {
        Some(id.as_str())
    } else {
        return no_context(&id);
    };
    registry.forget_context(&session, which).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn no_context(id: &str) -> E2bResult {
    refuse(StatusCode::NOT_FOUND, format!("no context `{id}` here"))
}
