//! The manager's settings, as the CLI (or a test) gives them; validated before anything starts.

use std::path::PathBuf;
use std::time::Duration;

use crate::session::types::Limits;
use crate::{Error, Result};

/// How a manager runs. Every field has a flag and an `ARL_*` variable in `arl-manager serve`.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// At most this many sessions at once; the pooling allocator is sized from it.
    pub max_sessions: u32,
    /// The limits a session gets when its create request names none.
    pub defaults: Limits,
    /// The most memory a request may ask for (and the pool's slot size).
    pub max_memory_bytes: u64,
    /// The longest per-execution timeout a request may ask for.
    pub max_timeout: Duration,
    /// Where sessions' workspaces live; `None` for a private temporary folder.
    pub data_dir: Option<PathBuf>,
    /// Where the runtime packages and compiled modules are kept.
    pub cache_dir: PathBuf,
    /// Where snapshots are stored; managers given the same folder restore each other's.
    /// `None`: `session-snapshots` in the cache folder.
    pub snapshot_dir: Option<PathBuf>,
    /// How often the reaper looks for idle and expired sessions (and tops up warm ones).
    pub reap_interval: Duration,
    /// Sessions kept started ahead per runtime with a bootstrap, for creates that ask for the
    /// defaults. They hold pool slots until claimed, and give them up when a client needs one.
    pub warm_sessions: u32,
    /// Below this much free memory (the machine's or the cgroup's), idle sessions are evicted,
    /// longest idle first; 0 turns eviction off.
    pub min_free_bytes: u64,
    /// Put before every session id as `<prefix>.<hex>`, so that a gateway in front of many
    /// managers routes by id alone; pods set it to their own name. Empty: bare hex ids.
    pub id_prefix: String,
    /// Every session's network bounds: the default allow-list and ceiling (`--network-allow`)
    /// and the budgets.
    pub network: crate::egress::NetworkLimits,
    /// A folder of wheels `pip install` takes from for every session, whatever its network.
    pub wheelhouse: Option<PathBuf>,
    /// The package index (PEP 691 JSON) `pip install` searches, for sessions whose network
    /// allows its host. `None`: none.
    pub pip_index: Option<url::Url>,
}

/// The index `pip install` searches by default (where a session's network allows
/// `pypi.org` and `files.pythonhosted.org`).
pub const DEFAULT_PIP_INDEX: &str = "https://pypi.org/simple/";

impl ManagerConfig {
    /// Defaults as documented in the README, with the cache in the user's cache folder.
    pub fn new(cache_dir: PathBuf) -> Self {
        Self {
            max_sessions: 1024,
            defaults: Limits {
                timeout: Duration::from_secs(30),
                memory_bytes: 512 << 20,
                output_bytes: 1 << 20,
                idle_ttl: Duration::from_secs(600),
                lifetime: Duration::from_secs(3600),
                workspace_bytes: 100 << 20,
                rollback: true,
            },
            max_memory_bytes: 4 << 30,
            max_timeout: Duration::from_secs(3600),
            data_dir: None,
            snapshot_dir: None,
            cache_dir,
            reap_interval: Duration::from_secs(1),
            warm_sessions: 4,
            min_free_bytes: 256 << 20,
            id_prefix: String::new(),
            network: crate::egress::NetworkLimits::default(),
            wheelhouse: None,
            pip_index: url::Url::parse(DEFAULT_PIP_INDEX).ok(),
        }
    }

    /// The folder snapshots are stored in.
    pub fn snapshot_dir(&self) -> PathBuf {
        self.snapshot_dir
            .clone()
            .unwrap_or_else(|| self.cache_dir.join("session-snapshots"))
    }

    /// Refuses settings that cannot work together, before a port is bound.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        let d = &self.defaults;
        if self.max_sessions == 0 {
            return bad("--max-sessions must be at least 1".into());
        }
        if d.memory_bytes > self.max_memory_bytes {
            return bad(format!(
                "--memory-mib ({} MiB) is above --max-memory-mib ({} MiB)",
                d.memory_bytes >> 20,
                self.max_memory_bytes >> 20
            ));
        }
        if d.timeout.is_zero() || d.timeout > self.max_timeout {
            return bad("--timeout-ms must be between 1 and --max-timeout-ms".into());
        }
        if d.idle_ttl.is_zero() || d.lifetime.is_zero() {
            return bad("--idle-ttl-secs and --lifetime-secs must be at least 1".into());
        }
        if !self
            .id_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return bad("--id-prefix may hold only letters, digits, '-' and '.'".into());
        }
        if d.workspace_bytes == 0 {
            return bad("--workspace-mib must be at least 1".into());
        }
        if d.output_bytes == 0 {
            return bad("--output-bytes must be at least 1".into());
        }
        Ok(())
    }
}
