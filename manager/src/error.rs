//! Everything the session core can refuse or fail at, in one enum; each door (HTTP, gRPC,
//! and the compatibility adapters) translates it at its edge.

use crate::session::EndReason;

/// Everything the session core can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no runtime named {0:?} is loaded (this manager has: {1})")]
    UnknownRuntime(String, String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the manager is full: {0} sessions are open; retry after one ends")]
    Full(u32),
    #[error("no session has the id {0:?}")]
    NotFound(String),
    #[error("the session has ended: {0}")]
    Ended(EndReason),
    #[error("{0} executions are already waiting on this session")]
    Busy(usize),
    #[error("the runtime is not loaded yet")]
    NotReady,
    #[error("the manager is draining: it takes no new sessions (existing ones continue)")]
    Draining,
    #[error("the manager is shutting down")]
    ShuttingDown,
    #[error("the path {0:?} {1}")]
    BadPath(String, &'static str),
    #[error("nothing at {0:?} in the workspace")]
    FileNotFound(String),
    #[error("the workspace quota of {0} bytes would be exceeded")]
    QuotaExceeded(u64),
    #[error("no snapshot has the id {0:?}")]
    SnapshotNotFound(String),
    #[error("the snapshot cannot be used: {0}")]
    BadSnapshot(String),
    #[error(
        "the snapshot was taken of the module {0}, and this manager runs {1}: it fits only the module it was taken of"
    )]
    ModuleMismatch(String, String),
    #[error("the session's state cannot be taken now: {0}")]
    Refused(String),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("instantiating the session: {0}")]
    Instantiate(#[source] wasmtime::Error),
    #[error("configuring wasmtime: {0}")]
    Engine(#[source] wasmtime::Error),
    #[error(transparent)]
    Runtime(#[from] arl_runtimes::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
