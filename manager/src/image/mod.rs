//! A session's state at rest, taken out of its instance and put into another one: what fork,
//! snapshot, export, import and rollback are made of.
//!
//! Between turns a guest's whole state is its linear memory (the C stack pointer, its only
//! mutable global, is back at its initial value whenever an export returns; the funcref table
//! never changes). Almost all of that memory is still the module's copy-on-write image, and
//! Linux tells which host pages are not: those the guest wrote are anonymous in
//! `/proc/self/pagemap`. Capturing a session is copying those pages; putting it back is
//! writing them into a fresh instance of the same module, grown to the same size.
//!
//! Outside the memory live the guest's WASI context (rebuilt with the same preopens in the
//! same order, so that the descriptor numbers saved in memory stay true), its monotonic clock
//! ([`GuestClock`], carried over so that it never runs backwards) and its files (copied).
//!
//! [`pages`] finds and copies the written pages, [`files`] moves a session's own folders, and
//! [`format`] writes an image as the bytes of a snapshot file or an export; the store of
//! snapshot files is [`crate::snapshots`].

pub mod files;
pub mod format;
pub mod pages;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::session::types::Limits;

pub use files::{OWN_DIRS, copy_dirs, own_dirs_empty, read_dirs, write_dirs};
pub use format::{Header, LimitsRecord};
pub use pages::{Pages, page_size, written_pages};

/// The guest's monotonic clock: nanoseconds since its session first started, carried across
/// forks, restores and rollbacks so that it never runs backwards.
#[derive(Debug, Clone, Copy)]
pub struct GuestClock {
    origin: Instant,
    offset_ns: u64,
}

impl GuestClock {
    /// A clock that starts at zero now.
    pub fn new() -> Self {
        Self::continuing(0)
    }

    /// A clock that reads `ns` now and runs on from there.
    pub fn continuing(ns: u64) -> Self {
        Self {
            origin: Instant::now(),
            offset_ns: ns,
        }
    }
}

impl Default for GuestClock {
    fn default() -> Self {
        Self::new()
    }
}

impl wasmtime_wasi::HostMonotonicClock for GuestClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        let elapsed = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.offset_ns.saturating_add(elapsed)
    }
}

/// A file or folder of a session's own tree (`workspace/...` or `tmp/...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Relative to the session's folder, `/`-separated.
    pub path: String,
    /// Bytes that follow in the payload; 0 for a folder.
    pub len: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dir: bool,
}

/// A session at rest, out of its instance: everything needed to make another one like it.
#[derive(Debug, Clone)]
pub struct Image {
    pub runtime: String,
    /// The sha256 of the module it ran; it fits no other.
    pub module: String,
    pub memory_bytes: u64,
    /// Shared with the session's rollback checkpoint, when it keeps one: a capture copies
    /// nothing.
    pub pages: Arc<Pages>,
    /// The guest's monotonic clock when it was captured.
    pub clock_ns: u64,
    /// Turns run so far (the next cell's number follows on).
    pub executions: u64,
    /// The WASI environment the session was created with.
    pub env: Vec<(String, String)>,
    pub limits: Limits,
    /// Its trajectory so far, as JSON Lines entries.
    pub history: Vec<Arc<str>>,
    /// Its files, when the image travels as bytes; a fork copies folders instead.
    pub files: Vec<(FileRecord, Vec<u8>)>,
    pub source: String,
    pub captured_at: SystemTime,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn the_guest_clock_runs_on_from_where_it_was() {
        use wasmtime_wasi::HostMonotonicClock;
        let clock = GuestClock::continuing(5_000_000_000);
        assert!(clock.now() >= 5_000_000_000);
        assert!(GuestClock::new().now() < 5_000_000_000);
    }
}
