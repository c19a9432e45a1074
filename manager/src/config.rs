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
    /// Where snapshots and suspended sessions are stored: a folder, or `s3://bucket/prefix`.
    /// Managers given the same store restore each other's (and need distinct `id_prefix`es).
    /// `None`: snapshots in `session-snapshots` in the cache folder, sessions in `store` in
    /// the data folder (so that they survive a restart only with `data_dir` given).
    pub store: Option<String>,
    /// A client's session unused this long is suspended to the store (its instance freed)
    /// and resumed on its next request; zero: never.
    pub suspend_after: Duration,
    /// A suspended session unused this long is ended (reason `idle`).
    pub suspended_ttl: Duration,
    /// Live sessions that ran a turn since their last checkpoint are checkpointed to the
    /// store this often, so that a restart on the same store brings them back; zero: never.
    pub checkpoint_every: Duration,
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
            store: None,
            suspend_after: Duration::from_secs(60),
            suspended_ttl: Duration::from_secs(7 * 24 * 3600),
            checkpoint_every: Duration::from_secs(30),
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

    /// Where snapshots and suspended sessions are stored.
    pub fn store(&self) -> String {
        self.store.clone().unwrap_or_else(|| {
            self.cache_dir
                .join("session-snapshots")
                .display()
                .to_string()
        })
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
        if self.suspended_ttl.is_zero() {
            return bad("--suspended-ttl-secs must be at least 1".into());
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
