//! The values a session is described by: its limits, where it is in its life, why a turn was
//! rolled back or the session ended, what a turn produced, and the texts clients read for
//! each. Plain data: nothing here reaches up into the rest of the crate.

use std::fmt;
use std::time::{Duration, SystemTime};

use arl_runtimes::GuestError;

/// A time as the APIs show it: RFC 3339, milliseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The bounds of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock time for one execution, blocking calls included.
    pub timeout: Duration,
    /// Linear memory the guest may grow to.
    pub memory_bytes: u64,
    /// Bytes kept per stream per execution.
    pub output_bytes: usize,
    /// A session unused this long is ended.
    pub idle_ttl: Duration,
    /// A session this old is ended, even mid-turn.
    pub lifetime: Duration,
    /// Bytes that uploads may fill the workspace with.
    pub workspace_bytes: u64,
    /// Roll a failed turn back (`true`) or end the session (`false`).
    pub rollback: bool,
}

/// Why a turn was rolled back. Its `Display` is the reason clients see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rollback {
    /// It ran past its deadline.
    Deadline,
    /// The guest trapped; wasmtime's words.
    Trap(String),
    /// It raised `MemoryError` after being refused memory at the session's limit.
    Memory,
    /// Its caller went away mid-turn.
    Cancelled,
    /// The session's files passed their quota (bytes) while it ran.
    Disk(u64),
}

impl Rollback {
    /// The stable one-word code.
    pub fn code(&self) -> &'static str {
        match self {
            Rollback::Deadline => "deadline",
            Rollback::Trap(_) => "trap",
            Rollback::Memory => "memory",
            Rollback::Cancelled => "cancelled",
            Rollback::Disk(_) => "disk_quota",
        }
    }
}

impl fmt::Display for Rollback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rollback::Trap(what) => write!(f, "trap: {what}"),
            other => f.write_str(other.code()),
        }
    }
}

/// Why a session ended. Its `Display` is the reason clients see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// A turn ran past its deadline.
    Deadline,
    /// The guest called `exit()` (or `sys.exit`, `os._exit`).
    Exit(i64),
    /// The guest trapped; wasmtime's words.
    Trap(String),
    /// Unused for longer than its idle TTL.
    Idle,
    /// Older than its lifetime.
    Lifetime,
    /// Deleted by a client.
    Deleted,
    /// Ended, idle, to relieve memory pressure on the node.
    Evicted,
    /// The manager is shutting down.
    Shutdown,
    /// The caller went away mid-turn, so the turn was stopped.
    Cancelled,
    /// A turn's files passed the session's quota (bytes), with rollback off.
    Disk(u64),
    /// Its instance was freed after its state went to the store: the session lives on there
    /// (never shown to clients, who see it suspended).
    Suspended,
    /// Held by a manager that stopped without saving it (a crash), or kept in a store that
    /// cannot give it back: it cannot be restored.
    Lost,
}

impl EndReason {
    /// The stable one-word code for the reason (`"trap"` for every trap).
    pub fn code(&self) -> &'static str {
        match self {
            EndReason::Deadline => "deadline",
            EndReason::Exit(_) => "exit",
            EndReason::Trap(_) => "trap",
            EndReason::Idle => "idle",
            EndReason::Lifetime => "lifetime",
            EndReason::Deleted => "deleted",
            EndReason::Evicted => "evicted",
            EndReason::Shutdown => "shutdown",
            EndReason::Cancelled => "cancelled",
            EndReason::Disk(_) => "disk_quota",
            EndReason::Suspended => "suspended",
            EndReason::Lost => "lost",
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::Trap(what) => write!(f, "trap: {what}"),
            other => f.write_str(other.code()),
        }
    }
}

/// Where a session is in its life: one value, moved forward by the session's task and by a
/// claim, never back out of `Ended`.
///
/// ```text
/// Warm ──claim──> Idle <──> Running
/// Starting ─────> Idle <──> Running
///      any ─────> Ended(reason)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifecycle {
    /// Started ahead of demand for no client yet (bootstrapping, warming up or waiting in the
    /// warm pool); a claim makes it a client's idle session.
    Warm,
    /// Instantiated for a client; the runtime's bootstrap turn has not finished.
    Starting,
    /// A client's, at rest between turns.
    Idle,
    /// A client's, running a turn.
    Running,
    /// A client's, suspended to the store: no instance, resumed by its next request.
    Suspended,
    /// Ended; no turn will run again.
    Ended(EndReason),
}

impl Lifecycle {
    /// The name the APIs show as the session's `state`.
    pub fn name(&self) -> &'static str {
        match self {
            Lifecycle::Warm => "warm",
            Lifecycle::Starting => "starting",
            Lifecycle::Idle => "idle",
            Lifecycle::Running => "running",
            Lifecycle::Suspended => "suspended",
            Lifecycle::Ended(_) => "ended",
        }
    }

    /// Moves to `next` as the session's task sees its turns go: a warm session stays warm
    /// (its turns are no client's), an ended one stays ended.
    pub fn advance(&mut self, next: Lifecycle) {
        match (&*self, &next) {
            (Lifecycle::Ended(_), _) => {}
            (Lifecycle::Warm, Lifecycle::Ended(_)) => *self = next,
            (Lifecycle::Warm, _) => {}
            _ => *self = next,
        }
    }
}

/// What one execution produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    /// The repr of the final expression, when there is one and it is not `None`.
    pub result: Option<String>,
    /// The exception the code raised and did not catch; the session lives on.
    pub error: Option<GuestError>,
    pub duration: Duration,
    /// Some output (or the result) passed the cap and was cut.
    pub truncated: bool,
    /// The turn ended the session, and why.
    pub ended: Option<EndReason>,
    /// The turn's effects on the interpreter were undone, and why; the session goes on.
    pub rolled_back: Option<Rollback>,
    /// What it displayed, as MIME bundles, the final expression's last.
    pub results: Vec<arl_runtimes::Bundle>,
    /// Its calls out of the sandbox (HTTP, tools, pip), as the history keeps them.
    pub requests: Vec<crate::egress::Record>,
}

/// A snapshot of a session's bookkeeping.
#[derive(Debug, Clone)]
pub struct Info {
    pub id: String,
    pub runtime: String,
    pub state: Lifecycle,
    pub created_at: SystemTime,
    pub last_used_at: SystemTime,
    pub executions: u64,
    pub memory_bytes: u64,
    pub limits: Limits,
    pub metadata: std::sync::Arc<super::handle::Metadata>,
    /// What its guest may reach outside the sandbox, and has spent.
    pub network: crate::egress::Summary,
    /// Bytes the store holds of it while it is suspended (0 while it is live).
    pub stored_bytes: u64,
}

impl EndReason {
    /// The rollback that undoes a turn ended this way, where one can.
    pub(super) fn rollback(&self) -> Option<Rollback> {
        match self {
            EndReason::Deadline => Some(Rollback::Deadline),
            EndReason::Trap(what) => Some(Rollback::Trap(what.clone())),
            EndReason::Cancelled => Some(Rollback::Cancelled),
            EndReason::Disk(quota) => Some(Rollback::Disk(*quota)),
            _ => None,
        }
    }
}

pub(super) fn ended_error(reason: &EndReason, deadline: Duration) -> GuestError {
    let message = match reason {
        EndReason::Deadline => format!(
            "the execution ran past its deadline of {} ms; the session has ended",
            deadline.as_millis()
        ),
        EndReason::Exit(code) => {
            format!("the code exited with status {code}; the session has ended")
        }
        EndReason::Evicted => {
            "the node ran short of memory and this session, idle the longest, was ended".into()
        }
        EndReason::Cancelled => {
            "the caller went away mid-turn, so the turn was stopped; the session has ended".into()
        }
        EndReason::Disk(quota) => {
            format!("the session's files passed its quota of {quota} bytes; the session has ended")
        }
        other => format!("the session has ended: {other}"),
    };
    GuestError {
        kind: "SessionEnded".into(),
        message,
        traceback: String::new(),
    }
}

pub(super) fn rolled_back_error(
    rollback: &Rollback,
    deadline: Duration,
    guest: Option<GuestError>,
) -> GuestError {
    const BACK: &str = "the session is back in its state before this execution";
    let (kind, message) = match rollback {
        Rollback::Deadline => (
            "Timeout",
            format!(
                "the execution ran past its deadline of {} ms and was stopped; {BACK}",
                deadline.as_millis()
            ),
        ),
        Rollback::Trap(what) => ("Trap", format!("the guest trapped ({what}); {BACK}")),
        Rollback::Cancelled => (
            "Cancelled",
            format!("the caller went away mid-turn, so the turn was stopped; {BACK}"),
        ),
        Rollback::Disk(quota) => (
            "DiskQuotaExceeded",
            format!(
                "the session's files (/workspace and /tmp) passed its quota of {quota} bytes, \
                 so the execution was stopped and /tmp emptied; {BACK}. What it wrote to \
                 /workspace stays: while that is past the quota, delete files through the files \
                 API before running more code"
            ),
        ),
        Rollback::Memory => {
            let guest = guest.unwrap_or_else(|| GuestError {
                kind: "MemoryError".into(),
                message: String::new(),
                traceback: String::new(),
            });
            return GuestError {
                message: format!("the session's memory limit was reached; {BACK}"),
                ..guest
            };
        }
    };
    GuestError {
        kind: kind.into(),
        message,
        traceback: guest.map(|g| g.traceback).unwrap_or_default(),
    }
}

pub(crate) fn floor_char_boundary(s: &str, mut at: usize) -> usize {
    while at > 0 && !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_reasons_read_as_clients_see_them() {
        assert_eq!(EndReason::Deadline.to_string(), "deadline");
        assert_eq!(EndReason::Exit(3).to_string(), "exit");
        assert_eq!(
            EndReason::Trap("unreachable".into()).to_string(),
            "trap: unreachable"
        );
        assert_eq!(EndReason::Trap("x".into()).code(), "trap");
    }

    #[test]
    fn cutting_a_result_keeps_whole_characters() {
        let s = "aé";
        assert_eq!(floor_char_boundary(s, 2), 1);
        assert_eq!(floor_char_boundary(s, 3), 3);
    }

    #[test]
    fn a_warm_session_stays_warm_until_claimed_and_nothing_leaves_ended() {
        let mut state = Lifecycle::Warm;
        for next in [Lifecycle::Idle, Lifecycle::Running, Lifecycle::Idle] {
            state.advance(next);
            assert_eq!(state, Lifecycle::Warm);
        }
        let mut state = Lifecycle::Starting;
        state.advance(Lifecycle::Idle);
        state.advance(Lifecycle::Running);
        assert_eq!(state, Lifecycle::Running);
        state.advance(Lifecycle::Ended(EndReason::Deleted));
        state.advance(Lifecycle::Idle);
        assert_eq!(state, Lifecycle::Ended(EndReason::Deleted));
        let mut warm = Lifecycle::Warm;
        warm.advance(Lifecycle::Ended(EndReason::Shutdown));
        assert_eq!(warm.name(), "ended");
    }
}
