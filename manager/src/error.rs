//! Everything the session core can refuse or fail at, in one enum; each door (HTTP, gRPC,
//! and the compatibility adapters) translates it at its edge.

use crate::session::types::EndReason;

/// Everything the session core can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no runtime named {0:?} is loaded (this manager has: {1})")]
    UnknownRuntime(String, String),
    #[error("the {0} runtime does not run {1:?}: it runs {2}")]
    UnknownLanguage(String, String, String),
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
    #[error(
        "the session's files (/workspace and /tmp) are past its quota of {0} bytes: delete some \
         through the files API before running more code"
    )]
    DiskFull(u64),
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
    #[error("{}", moved(.0))]
    Moved(String),
    #[error("the session store cannot be reached now ({0}); retry")]
    StoreUnavailable(String),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("instantiating the session: {0}")]
    Instantiate(#[source] wasmtime::Error),
    #[error("configuring wasmtime: {0}")]
    Engine(#[source] wasmtime::Error),
    #[error(transparent)]
    Runtime(#[from] arl_runtimes::Error),
}

/// Where a session went, as [`Error::Moved`] says it.
fn moved(owner: &str) -> String {
    match owner {
        "" => "the session moved out of this draining manager: any manager sharing its store \
               resumes it (a gateway sends the request there)"
            .into(),
        owner => format!(
            "the session is held by the manager {owner:?} now: ask it (a gateway does this)"
        ),
    }
}

impl Error {
    /// What the host ran out of, when this is an I/O failure for want of descriptors, disk or
    /// memory: the manager is at its edge, and the request can be retried elsewhere or later.
    pub fn exhausted(&self) -> Option<&'static str> {
        use rustix::io::Errno;
        let Error::Io(_, e) = self else {
            return None;
        };
        match Errno::from_io_error(e)? {
            Errno::MFILE | Errno::NFILE => Some("open files"),
            Errno::NOSPC | Errno::DQUOT => Some("disk space"),
            Errno::NOMEM => Some("memory"),
            _ => None,
        }
    }

    /// Whether this is the manager's own failure rather than a refusal of the request.
    pub fn is_internal(&self) -> bool {
        matches!(
            self,
            Error::Io(..) | Error::Instantiate(_) | Error::Engine(_) | Error::Runtime(_)
        )
    }

    /// What a client is told: the error itself, except that the manager's own failures say
    /// only what failed, never a host path or the engine's words (those go to the log).
    pub fn public_message(&self) -> String {
        match (self.exhausted(), self) {
            (Some(what), _) => format!(
                "the manager is out of {what} for new work; retry later or on another manager"
            ),
            (None, Error::Io(what, _)) => format!(
                "the manager failed at {}; see its log",
                what.split_whitespace().next().unwrap_or("a file operation")
            ),
            (None, e) if e.is_internal() => "the manager failed internally; see its log".into(),
            (None, e) => e.to_string(),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_own_failures_name_no_host_path() {
        let out_of_files = Error::Io(
            "opening /var/lib/arl/sessions/abc/workspace".into(),
            std::io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error()),
        );
        assert_eq!(out_of_files.exhausted(), Some("open files"));
        assert!(!out_of_files.public_message().contains("/var/lib"));
        let other = Error::Io(
            "opening /var/lib/arl/x".into(),
            std::io::Error::from_raw_os_error(rustix::io::Errno::ACCESS.raw_os_error()),
        );
        assert_eq!(other.exhausted(), None);
        assert!(other.is_internal());
        assert_eq!(
            other.public_message(),
            "the manager failed at opening; see its log"
        );
        let refusal = Error::QuotaExceeded(5);
        assert!(!refusal.is_internal());
        assert_eq!(refusal.public_message(), refusal.to_string());
    }
}
