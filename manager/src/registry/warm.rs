//! The warm pool: sessions started ahead of demand, per runtime, through their bootstrap and
//! one empty turn, so that a create is a hand-over. Topped up a moment after each create and
//! by the reaper; given up for a client's session when the manager is otherwise full.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Registry, lock, read};
use crate::session::{EndReason, Session};
use crate::{Error, Result};

/// How long after a create the warm pool is refilled.
const REFILL_DELAY: Duration = Duration::from_millis(25);
/// How long a create waits for the slot of a warm session it evicted.
const EVICT_WAIT: Duration = Duration::from_secs(2);

/// Sessions started ahead of demand, per runtime, oldest first.
#[derive(Default)]
pub(super) struct WarmPool {
    queues: Mutex<HashMap<String, VecDeque<Arc<Session>>>>,
    /// A top-up is running.
    filling: AtomicBool,
}

impl WarmPool {
    /// A warm session of `runtime` that is still alive, if one waits.
    fn take(&self, runtime: &str) -> Option<Arc<Session>> {
        let mut queues = lock(&self.queues);
        let queue = queues.get_mut(runtime)?;
        std::iter::from_fn(|| queue.pop_front()).find(|s| s.ended().is_none())
    }

    /// The oldest warm session of any runtime.
    fn take_any(&self) -> Option<Arc<Session>> {
        lock(&self.queues)
            .values_mut()
            .find_map(VecDeque::pop_front)
    }

    fn len(&self, runtime: &str) -> usize {
        lock(&self.queues).get(runtime).map_or(0, VecDeque::len)
    }

    fn push(&self, runtime: &str, session: Arc<Session>) {
        lock(&self.queues)
            .entry(runtime.to_owned())
            .or_default()
            .push_back(session);
    }

    /// Takes every warm session out of the pool.
    pub(super) fn drain(&self) -> Vec<Arc<Session>> {
        lock(&self.queues)
            .values_mut()
            .flat_map(std::mem::take)
            .collect()
    }
}

impl Registry {
    /// A free pooled slot, taken from a warm session when there is no other.
    pub(super) async fn acquire_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        match self.inner.slots.clone().try_acquire_owned() {
            Ok(permit) => Ok(permit),
            Err(_) => self.evict_warm().await,
        }
    }

    /// A warm session of `runtime`, made a client's: its clocks and counters start now.
    pub(super) fn claim_warm(&self, runtime: &str) -> Option<Arc<Session>> {
        let session = self.inner.warm.take(runtime)?;
        session.claim();
        Some(session)
    }

    /// Frees a slot held by a warm session for a client's session (the manager is otherwise
    /// full); `Full` when there is none to give up.
    async fn evict_warm(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        let full = || Error::Full(self.inner.config.max_sessions);
        let waited = Instant::now();
        let victim = loop {
            if let Some(victim) = self.inner.warm.take_any() {
                break victim;
            }
            // A warm session still starting holds a slot too: it gives it up once queued.
            if !self.inner.warm.filling.load(Ordering::SeqCst) || waited.elapsed() > EVICT_WAIT {
                return Err(full());
            }
            if let Ok(permit) = self.inner.slots.clone().try_acquire_owned() {
                return Ok(permit);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        victim.end(EndReason::Deleted);
        // The slot comes back once the victim's store is dropped, in a moment.
        match tokio::time::timeout(EVICT_WAIT, self.inner.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(full()),
        }
    }

    /// The ids of the warm sessions waiting, per runtime, oldest first.
    pub fn warm(&self) -> Vec<String> {
        lock(&self.inner.warm.queues)
            .values()
            .flatten()
            .map(|s| s.id.clone())
            .collect()
    }

    /// Ends every warm session (draining or stopping: they would only hold slots).
    pub(super) fn drop_warm(&self) {
        for session in self.inner.warm.drain() {
            session.end(EndReason::Deleted);
        }
    }

    /// Tops up a moment after a create: the client's first turns, which usually follow at
    /// once, go first on the cores.
    pub(super) fn top_up_soon(&self) {
        if self.inner.config.warm_sessions > 0 {
            let registry = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(REFILL_DELAY).await;
                registry.top_up().await;
            });
        }
    }

    /// Starts warm sessions until every runtime with a bootstrap has `--warm-sessions` of
    /// them ready: instantiated, bootstrapped, and through one empty turn, so that a client's
    /// first execution costs what later ones do. Only one top-up runs at a time.
    pub async fn top_up(self) {
        let target = self.inner.config.warm_sessions as usize;
        if target == 0 || self.inner.warm.filling.swap(true, Ordering::SeqCst) {
            return;
        }
        let runtimes: Vec<_> = read(&self.inner.runtimes)
            .values()
            .filter(|r| r.protocol.has_bootstrap())
            .cloned()
            .collect();
        for runtime in runtimes {
            loop {
                let have = self.inner.warm.len(&runtime.name);
                if have >= target || self.draining() || self.inner.stopping.load(Ordering::SeqCst) {
                    break;
                }
                // One slot always stays free, so that a client's create never waits on a
                // warm session still starting.
                if self.inner.slots.available_permits() <= 1 {
                    break;
                }
                let Ok(permit) = self.inner.slots.clone().try_acquire_owned() else {
                    break;
                };
                let defaults = self.inner.config.defaults;
                let session = match self
                    .start(None, runtime.clone(), defaults, vec![], permit, true, None)
                    .await
                {
                    Ok(session) => session,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not start a warm session");
                        break;
                    }
                };
                match session.execute(String::new(), None, None).await {
                    Ok(outcome) if outcome.ended.is_none() && outcome.error.is_none() => {
                        self.inner.warm.push(&runtime.name, session);
                    }
                    other => {
                        tracing::warn!(?other, "a warm session failed its first turn");
                        session.end(EndReason::Deleted);
                        break;
                    }
                }
            }
        }
        self.inner.warm.filling.store(false, Ordering::SeqCst);
    }
}
