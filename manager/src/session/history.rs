//! A session's trajectory: one JSON line per client turn, bounded in bytes, carried along by
//! fork, snapshot and export.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use arl_runtimes::GuestError;

use super::types::{Outcome, floor_char_boundary, rfc3339};

/// Bytes of history a session keeps; the oldest turns go first.
pub const HISTORY_BYTES: usize = 1 << 20;
/// Bytes of each of a turn's code, stdout, stderr and result that its history entry keeps.
const HISTORY_FIELD_BYTES: usize = 16 << 10;

/// A session's trajectory: one JSON line per client turn, within [`HISTORY_BYTES`].
#[derive(Debug, Default, Clone)]
pub(super) struct History {
    pub(super) lines: VecDeque<Arc<str>>,
    bytes: usize,
    /// Turns forgotten to stay within the bound.
    pub(super) dropped: u64,
}

impl History {
    pub(super) fn push(&mut self, line: Arc<str>) {
        self.bytes += line.len() + 1;
        self.lines.push_back(line);
        while self.bytes > HISTORY_BYTES
            && let Some(old) = self.lines.pop_front()
        {
            self.bytes -= old.len() + 1;
            self.dropped += 1;
        }
    }

    /// Starts from the lines an image carried.
    pub(super) fn from_lines(lines: &[Arc<str>]) -> Self {
        let mut history = Self::default();
        for line in lines {
            history.push(line.clone());
        }
        history
    }
}

/// One turn as the history keeps it: a line of `GET /v1/sessions/{id}/history`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct HistoryEntry {
    /// The turn's number in the session (a fork's continue its parent's).
    pub n: u64,
    /// RFC 3339.
    pub started_at: String,
    pub code: String,
    pub stdout: String,
    pub stderr: String,
    pub result: Option<String>,
    pub error: Option<GuestError>,
    pub duration_ms: f64,
    pub rolled_back: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
    /// A field was longer than the history keeps (16 KiB) and was cut.
    pub clipped: bool,
    /// The turn's calls out of the sandbox: brokered HTTP, host tools, `pip install`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<crate::egress::Record>,
}

fn clip(s: &str, clipped: &mut bool) -> String {
    if s.len() <= HISTORY_FIELD_BYTES {
        return s.to_owned();
    }
    *clipped = true;
    s[..floor_char_boundary(s, HISTORY_FIELD_BYTES)].to_owned()
}

impl HistoryEntry {
    /// Turn `n`, started at `started_at`, that ran `code` to `outcome`; fields past 16 KiB are
    /// cut.
    pub fn of(n: u64, started_at: SystemTime, code: &str, outcome: &Outcome) -> Self {
        let mut clipped = false;
        HistoryEntry {
            n,
            started_at: rfc3339(started_at),
            code: clip(code, &mut clipped),
            stdout: clip(&outcome.stdout, &mut clipped),
            stderr: clip(&outcome.stderr, &mut clipped),
            result: outcome.result.as_deref().map(|r| clip(r, &mut clipped)),
            error: outcome.error.as_ref().map(|e| GuestError {
                kind: clip(&e.kind, &mut clipped),
                message: clip(&e.message, &mut clipped),
                traceback: clip(&e.traceback, &mut clipped),
            }),
            duration_ms: outcome.duration.as_secs_f64() * 1e3,
            rolled_back: outcome.rolled_back.is_some(),
            rollback_reason: outcome.rolled_back.as_ref().map(ToString::to_string),
            end_reason: outcome.ended.as_ref().map(ToString::to_string),
            clipped,
            requests: outcome.requests.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_forgets_the_oldest_past_its_bound() {
        let mut h = History::default();
        let line: Arc<str> = Arc::from("x".repeat(1000));
        for _ in 0..2000 {
            h.push(line.clone());
        }
        assert!(h.bytes <= HISTORY_BYTES);
        assert_eq!(h.lines.len() as u64 + h.dropped, 2000);
        assert_eq!(h.bytes, h.lines.len() * 1001);
    }

    #[test]
    fn clipped_fields_keep_whole_characters() {
        let mut clipped = false;
        let long = "é".repeat(HISTORY_FIELD_BYTES);
        let kept = clip(&long, &mut clipped);
        assert!(clipped && kept.len() <= HISTORY_FIELD_BYTES && kept.chars().all(|c| c == 'é'));
        let mut clipped = false;
        assert_eq!(clip("short", &mut clipped), "short");
        assert!(!clipped);
    }
}
