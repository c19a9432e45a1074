//! Upkeep: ending sessions past their idle TTL or lifetime, and the longest-idle ones when
//! the node runs short of memory; the task that does it also tops the warm pool up.

use std::sync::{Arc, Weak};
use std::time::Instant;

use super::{ManagerState, Registry, read};
use crate::session::EndReason;

impl Registry {
    /// Ends every session whose idle TTL or lifetime has passed at `now`; how many.
    pub fn reap(&self, now: Instant) -> usize {
        self.inner.reap(now)
    }

    /// Starts the reaper task, which also suspends idle sessions and keeps the warm sessions
    /// topped up, and the checkpoint task; they stop when the registry is dropped.
    pub fn spawn_reaper(&self) {
        self.spawn_checkpoints();
        let weak: Weak<ManagerState> = Arc::downgrade(&self.inner);
        let every = self.inner.config.reap_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                inner.reap(Instant::now());
                let registry = Registry { inner };
                registry.suspend_idle(Instant::now()).await;
                registry.top_up().await;
            }
        });
    }
}

impl ManagerState {
    fn reap(&self, now: Instant) -> usize {
        let due: Vec<_> = read(&self.sessions)
            .values()
            .filter_map(|s| s.expired(now).map(|r| (s.clone(), r)))
            .collect();
        for (session, reason) in &due {
            session.end(reason.clone());
        }
        due.len() + self.relieve_pressure()
    }

    /// When the memory left to the manager is under `--min-free-mib`, ends warm sessions and
    /// then the idle sessions unused the longest (reason `evicted`), a few per tick, until it
    /// is not. Sessions mid-turn are never evicted.
    fn relieve_pressure(&self) -> usize {
        let floor = self.config.min_free_bytes;
        if floor == 0 || available_memory().is_none_or(|free| free >= floor) {
            return 0;
        }
        let warm = self.warm.drain();
        for session in &warm {
            session.end(EndReason::Deleted);
        }
        let mut idle: Vec<_> = read(&self.sessions)
            .values()
            .filter_map(|s| s.idle_since().map(|t| (t, s.clone())))
            .collect();
        idle.sort_by_key(|(since, _)| *since);
        let batch = (idle.len() / 100).max(1);
        for (_, session) in idle.iter().take(batch) {
            session.end(EndReason::Evicted);
        }
        let evicted = batch.min(idle.len());
        tracing::warn!(
            evicted,
            warm = warm.len(),
            floor_mib = floor >> 20,
            "memory pressure: ending the longest-idle sessions"
        );
        evicted
    }
}

/// Bytes the manager may still use: the smaller of the machine's `MemAvailable` and what its
/// cgroup (the pod's limit) leaves. `None` where neither can be read.
pub fn available_memory() -> Option<u64> {
    let machine = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<u64>().ok())
            .map(|kib| kib << 10)
    });
    let number = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
    };
    let cgroup = number("/sys/fs/cgroup/memory.max")
        .zip(number("/sys/fs/cgroup/memory.current"))
        .map(|(max, current)| max.saturating_sub(current));
    match (machine, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
