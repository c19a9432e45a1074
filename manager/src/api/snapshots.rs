//! What is made of a session's state: `fork`, `snapshot` and `/v1/snapshots`, `export` and
//! `import` (how a draining pod hands its sessions over), and the `history` of its turns.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use serde::Serialize;

use super::sessions::Created;
use super::{ApiResult, ErrorBody};
use crate::registry::Registry;
use crate::snapshots::SnapshotInfo;

/// The media type of an export: ARL's snapshot format.
pub const SNAPSHOT_TYPE: &str = "application/vnd.arl.snapshot";

/// A stored snapshot.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SnapshotView {
    #[schema(example = "snap-5f0c1b2e9d8a4c7b8e6f1a2b3c4d5e6f")]
    pub id: String,
    pub runtime: String,
    /// The sha256 of the module it was taken of: it restores only into that module.
    pub module: String,
    /// The session it was taken of.
    pub source_session: String,
    /// RFC 3339.
    pub created_at: String,
    /// The session's linear memory.
    pub memory_bytes: u64,
    /// How much of it differed from the module's image, and so was kept.
    pub state_bytes: u64,
    /// Files and folders of `/workspace` and `/tmp` carried.
    pub files: usize,
    /// The snapshot's size on disk, compressed.
    pub size_bytes: u64,
    pub executions: u64,
}

impl From<SnapshotInfo> for SnapshotView {
    fn from(info: SnapshotInfo) -> Self {
        let h = info.header;
        Self {
            id: info.id,
            runtime: h.runtime,
            module: h.module,
            source_session: h.source,
            created_at: h.captured_at,
            memory_bytes: h.memory_bytes,
            state_bytes: h.pages * h.page_size,
            files: h.files.len(),
            size_bytes: info.size_bytes,
            executions: h.executions,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotView>,
}

fn created(session: &crate::session::Session) -> (StatusCode, Json<Created>) {
    (StatusCode::CREATED, Json(Created::of(session)))
}

/// A new session with this one's interpreter state and files, which then evolves on its own
/// (its `random` and `numpy.random` states are drawn anew on its first turn).
#[utoipa::path(post, path = "/v1/sessions/{id}/fork", operation_id = "fork_session", tag = "state",
    params(("id" = String, Path, description = "The session to fork")),
    responses(
        (status = 201, description = "The fork", body = Created),
        (status = 404, description = "`session_not_found`", body = ErrorBody),
        (status = 409, description = "`snapshot_refused`: the guest holds files open; or `session_busy`", body = ErrorBody),
        (status = 410, description = "`session_ended`", body = ErrorBody),
        (status = 429, description = "`capacity_exhausted`", body = ErrorBody),
    ))]
pub async fn fork(
    State(registry): State<Registry>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Created>)> {
    let session = registry.fork(&id).await?;
    Ok(created(&session))
}

/// Stores the session's state and files as a snapshot, compressed, in the snapshot folder;
/// `POST /v1/sessions {"from_snapshot": id}` restores it, here or on any manager that shares
/// the folder. The session goes on.
#[utoipa::path(post, path = "/v1/sessions/{id}/snapshot", operation_id = "snapshot_session", tag = "state",
    params(("id" = String, Path, description = "The session to snapshot")),
    responses(
        (status = 201, description = "Stored", body = SnapshotView),
        (status = 404, description = "`session_not_found`", body = ErrorBody),
        (status = 409, description = "`snapshot_refused`: the guest holds files open", body = ErrorBody),
        (status = 410, description = "`session_ended`", body = ErrorBody),
    ))]
pub async fn snapshot(
    State(registry): State<Registry>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<SnapshotView>)> {
    let info = registry.snapshot(&id).await?;
    Ok((StatusCode::CREATED, Json(info.into())))
}

/// The session's state and files as bytes (`application/vnd.arl.snapshot`), for
/// `POST /v1/sessions/import` on another manager. The session goes on here: delete it once
/// the import has succeeded.
#[utoipa::path(post, path = "/v1/sessions/{id}/export", operation_id = "export_session", tag = "state",
    params(("id" = String, Path, description = "The session to export")),
    responses(
        (status = 200, description = "The export", content_type = "application/vnd.arl.snapshot", body = Vec<u8>),
        (status = 404, description = "`session_not_found`", body = ErrorBody),
        (status = 409, description = "`snapshot_refused`: the guest holds files open", body = ErrorBody),
        (status = 410, description = "`session_ended`", body = ErrorBody),
    ))]
pub async fn export(
    State(registry): State<Registry>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let bytes = registry.export(&id).await?;
    Ok(([(header::CONTENT_TYPE, SNAPSHOT_TYPE)], bytes).into_response())
}

/// A new session from an export's bytes (made here or by another manager of the same
/// module), with the exported session's limits, files and history.
#[utoipa::path(post, path = "/v1/sessions/import", operation_id = "import_session", tag = "state",
    request_body(content = Vec<u8>, content_type = "application/vnd.arl.snapshot"),
    responses(
        (status = 201, description = "Imported", body = Created),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 422, description = "`invalid_snapshot` or `snapshot_module_mismatch`", body = ErrorBody),
        (status = 429, description = "`capacity_exhausted`", body = ErrorBody),
        (status = 503, description = "`not_ready`, `draining` or `shutting_down`", body = ErrorBody),
    ))]
pub async fn import(
    State(registry): State<Registry>,
    body: axum::body::Body,
) -> ApiResult<(StatusCode, Json<Created>)> {
    let body = body
        .into_data_stream()
        .map(|r| r.map_err(std::io::Error::other));
    let session = registry.import(body).await?;
    Ok(created(&session))
}

/// The session's turns, oldest first, as JSON Lines (one [`crate::session::HistoryEntry`] a
/// line). At most 1 MiB is kept: older turns are forgotten first, and
/// `X-ARL-History-Dropped` says how many were.
#[utoipa::path(get, path = "/v1/sessions/{id}/history", operation_id = "session_history", tag = "state",
    params(("id" = String, Path, description = "The session")),
    responses(
        (status = 200, description = "One JSON object a line", content_type = "application/jsonl", body = crate::session::HistoryEntry),
        (status = 404, description = "`session_not_found`", body = ErrorBody),
        (status = 410, description = "`session_ended`", body = ErrorBody),
    ))]
pub async fn history(
    State(registry): State<Registry>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (lines, dropped) = registry.get(&id).await?.history();
    let mut body = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for line in &lines {
        body.push_str(line);
        body.push('\n');
    }
    Ok((
        [
            (header::CONTENT_TYPE, "application/jsonl".to_owned()),
            (
                header::HeaderName::from_static("x-arl-history-dropped"),
                dropped.to_string(),
            ),
        ],
        body,
    )
        .into_response())
}

/// Stored snapshots, newest first.
#[utoipa::path(get, path = "/v1/snapshots", operation_id = "list_snapshots", tag = "state",
    responses((status = 200, description = "Stored snapshots", body = SnapshotList)))]
pub async fn list(State(registry): State<Registry>) -> ApiResult<Json<SnapshotList>> {
    let all = registry.snapshots().list().await?;
    Ok(Json(SnapshotList {
        snapshots: all.into_iter().map(Into::into).collect(),
    }))
}

/// One snapshot.
#[utoipa::path(get, path = "/v1/snapshots/{id}", operation_id = "get_snapshot", tag = "state",
    params(("id" = String, Path, description = "The snapshot's id")),
    responses(
        (status = 200, description = "The snapshot", body = SnapshotView),
        (status = 404, description = "`snapshot_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_snapshot`: the file is damaged", body = ErrorBody),
    ))]
pub async fn show(
    State(registry): State<Registry>,
    Path(id): Path<String>,
) -> ApiResult<Json<SnapshotView>> {
    Ok(Json(registry.snapshots().info(&id).await?.into()))
}

/// Removes a snapshot; sessions restored from it are not touched.
#[utoipa::path(delete, path = "/v1/snapshots/{id}", operation_id = "delete_snapshot", tag = "state",
    params(("id" = String, Path, description = "The snapshot's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "`snapshot_not_found`", body = ErrorBody),
    ))]
pub async fn delete(
    State(registry): State<Registry>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    registry.snapshots().delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
