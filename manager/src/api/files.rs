//! `/v1/sessions/{id}/files`: upload, download, list and delete files in a session's
//! workspace, which the guest sees as `/workspace`.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{ApiResult, ErrorBody};
use crate::Error;
use crate::files::{self, Entry, on_workspace};
use crate::registry::Registry;
use crate::rfc3339;

/// A file or folder of the workspace.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FileView {
    /// Relative to the workspace, `/`-separated.
    pub path: String,
    /// `file`, `dir` or `symlink`.
    pub kind: &'static str,
    pub size: u64,
    /// RFC 3339.
    pub modified_at: Option<String>,
}

impl From<Entry> for FileView {
    fn from(e: Entry) -> Self {
        Self {
            path: e.path,
            kind: e.kind.name(),
            size: e.size,
            modified_at: e.modified.map(rfc3339),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FileList {
    /// The folder listed; empty for the workspace itself.
    pub path: String,
    pub entries: Vec<FileView>,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// A folder relative to the workspace; the workspace itself when absent.
    pub path: Option<String>,
}

/// Writes the request body to `path` in the workspace, making missing folders. The file
/// appears whole or not at all; past the workspace quota the answer is 413.
#[utoipa::path(put, path = "/v1/sessions/{id}/files/{path}", operation_id = "write_file", tag = "files",
    params(
        ("id" = String, Path, description = "The session's id"),
        ("path" = String, Path, description = "Relative to the workspace; may contain `/`"),
    ),
    request_body(content = Option<Vec<u8>>, content_type = "application/octet-stream",
        description = "The file's bytes; none makes an empty file"),
    responses(
        (status = 201, description = "Created", body = FileView),
        (status = 200, description = "Replaced a file", body = FileView),
        (status = 400, description = "`invalid_path`: absolute, `..`, or out through a symlink", body = ErrorBody),
        (status = 404, description = "`session_not_found`", body = ErrorBody),
        (status = 410, description = "`session_ended`", body = ErrorBody),
        (status = 413, description = "`quota_exceeded`", body = ErrorBody),
    ))]
pub async fn upload(
    State(registry): State<Registry>,
    Path((id, path)): Path<(String, String)>,
    body: Body,
) -> ApiResult<(StatusCode, Json<FileView>)> {
    let session = registry.get(&id).await?;
    let data = body.into_data_stream().map(|chunk| {
        chunk.map_err(|e| Error::InvalidRequest(format!("reading the request body: {e}")))
    });
    let (entry, replaced) = files::upload(session.workspace.clone(), path, data).await?;
    let status = if replaced {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(entry.into())))
}

/// The file's bytes.
#[utoipa::path(get, path = "/v1/sessions/{id}/files/{path}", operation_id = "read_file", tag = "files",
    params(
        ("id" = String, Path, description = "The session's id"),
        ("path" = String, Path, description = "Relative to the workspace; may contain `/`"),
    ),
    responses(
        (status = 200, description = "The file", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, description = "`invalid_path`, or a folder", body = ErrorBody),
        (status = 404, description = "`file_not_found` or `session_not_found`", body = ErrorBody),
        (status = 410, description = "`session_ended`", body = ErrorBody),
    ))]
pub async fn download(
    State(registry): State<Registry>,
    Path((id, path)): Path<(String, String)>,
) -> ApiResult<Response> {
    let session = registry.get(&id).await?;
    let (file, len) = on_workspace(session.workspace.clone(), move |w| w.open_file(&path)).await?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        tokio::fs::File::from_std(file),
        files::READ_CHUNK,
    ));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response())
}

/// Removes a file, or a folder with everything in it.
#[utoipa::path(delete, path = "/v1/sessions/{id}/files/{path}", operation_id = "delete_file", tag = "files",
    params(
        ("id" = String, Path, description = "The session's id"),
        ("path" = String, Path, description = "Relative to the workspace; may contain `/`"),
    ),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 404, description = "`file_not_found` or `session_not_found`", body = ErrorBody),
        (status = 410, description = "`session_ended`", body = ErrorBody),
    ))]
pub async fn remove(
    State(registry): State<Registry>,
    Path((id, path)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let session = registry.get(&id).await?;
    on_workspace(session.workspace.clone(), move |w| w.delete(&path)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The entries of a folder of the workspace, with size and modification time.
#[utoipa::path(get, path = "/v1/sessions/{id}/files", operation_id = "list_files", tag = "files",
    params(("id" = String, Path, description = "The session's id"), ListQuery),
    responses(
        (status = 200, description = "The folder's entries, by name", body = FileList),
        (status = 400, description = "`invalid_path`, or a file", body = ErrorBody),
        (status = 404, description = "`file_not_found` or `session_not_found`", body = ErrorBody),
        (status = 410, description = "`session_ended`", body = ErrorBody),
    ))]
pub async fn list(
    State(registry): State<Registry>,
    Path(id): Path<String>,
    Query(query): Query<ListQuery>,
) -> ApiResult<Json<FileList>> {
    let session = registry.get(&id).await?;
    let path = query.path.unwrap_or_default();
    let dir = path.clone();
    let entries = on_workspace(session.workspace.clone(), move |w| w.list(&dir)).await?;
    Ok(Json(FileList {
        path,
        entries: entries.into_iter().map(Into::into).collect(),
    }))
}
