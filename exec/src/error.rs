//! What the agent refuses and why, as an HTTP status with a JSON body and as a gRPC status.
//! The two map onto each other, so a refusal reaches a client of the manager in front of the
//! agent with the same status and code the agent gave.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tonic::metadata::MetadataValue;

/// The gRPC metadata key that carries an error's code (`invalid_path`, ...) across.
const CODE_KEY: &str = "arl-error";

/// What kind of refusal: it sets the HTTP status and the gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 400, `InvalidArgument`: the request itself is wrong.
    Invalid,
    /// 404, `NotFound`: it names something that is not there (a pid, a file).
    NotFound,
    /// 422, `FailedPrecondition`: well formed, but the workspace does not allow it (a patch
    /// that does not apply).
    Unprocessable,
    /// 409, `Aborted`: something else holds what it needs.
    Conflict,
    /// 503, `Unavailable`: the agent cannot be reached or is stopping.
    Unavailable,
    /// 500, `Internal`: the agent's own failure.
    Internal,
}

/// A refusal: its kind, a stable code and a message for people.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ExecError {
    pub kind: Kind,
    pub code: &'static str,
    pub message: String,
}

/// `Result` with [`ExecError`].
pub type Result<T, E = ExecError> = std::result::Result<T, E>;

impl ExecError {
    pub fn new(kind: Kind, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Kind::Invalid, code, message)
    }

    /// The agent's own failure at `what`; the details go to its log.
    pub fn internal(what: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "{what}");
        Self::new(
            Kind::Internal,
            "internal",
            format!("the agent failed at {what}; see its log"),
        )
    }

    fn status(&self) -> StatusCode {
        match self.kind {
            Kind::Invalid => StatusCode::BAD_REQUEST,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
            Kind::Conflict => StatusCode::CONFLICT,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body every error answers with, shaped as the manager's are.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl IntoResponse for ExecError {
    fn into_response(self) -> Response {
        (self.status(), Json(self.body())).into_response()
    }
}

impl From<ExecError> for tonic::Status {
    fn from(e: ExecError) -> Self {
        let code = match e.kind {
            Kind::Invalid => tonic::Code::InvalidArgument,
            Kind::NotFound => tonic::Code::NotFound,
            Kind::Unprocessable => tonic::Code::FailedPrecondition,
            Kind::Conflict => tonic::Code::Aborted,
            Kind::Unavailable => tonic::Code::Unavailable,
            Kind::Internal => tonic::Code::Internal,
        };
        let mut status = tonic::Status::new(code, e.message);
        status
            .metadata_mut()
            .insert(CODE_KEY, MetadataValue::from_static(e.code));
        status
    }
}

impl From<tonic::Status> for ExecError {
    fn from(status: tonic::Status) -> Self {
        let kind = match status.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => Kind::Invalid,
            tonic::Code::NotFound => Kind::NotFound,
            tonic::Code::FailedPrecondition => Kind::Unprocessable,
            tonic::Code::Aborted | tonic::Code::AlreadyExists => Kind::Conflict,
            tonic::Code::Unavailable | tonic::Code::Cancelled => Kind::Unavailable,
            _ => Kind::Internal,
        };
        let code = status
            .metadata()
            .get(CODE_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(known_code)
            .unwrap_or(match kind {
                Kind::Unavailable => "agent_unavailable",
                Kind::Internal => "internal",
                _ => "refused",
            });
        ExecError::new(kind, code, status.message())
    }
}

/// Codes this crate gives, as `'static` strings again after a trip over gRPC.
fn known_code(code: &str) -> Option<&'static str> {
    CODES.iter().copied().find(|c| *c == code)
}

/// Every code the agent answers with.
pub const CODES: &[&str] = &[
    "invalid_request",
    "invalid_json",
    "invalid_command",
    "invalid_env",
    "invalid_timeout",
    "invalid_path",
    "invalid_signal",
    "invalid_patch",
    "patch_failed",
    "file_not_found",
    "process_not_found",
    "agent_unavailable",
    "no_session",
    "internal",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_keeps_its_kind_and_code_across_grpc() {
        for (kind, code) in [
            (Kind::Invalid, "invalid_signal"),
            (Kind::NotFound, "process_not_found"),
            (Kind::Unprocessable, "patch_failed"),
            (Kind::Internal, "internal"),
        ] {
            let status = tonic::Status::from(ExecError::new(kind, code, "why"));
            let back = ExecError::from(status);
            assert_eq!(
                (back.kind, back.code, back.message.as_str()),
                (kind, code, "why")
            );
        }
    }
}
