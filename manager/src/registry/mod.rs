//! All sessions of one manager: create within capacity, look up, list, end.
//!
//! | module | what it holds |
//! |---|---|
//! | this one | the [`Registry`]: lifecycle (create, get, list, delete, shutdown), drain, load |
//! | [`request`] | what a create may ask, and the checks of limits, env and deadlines |
//! | [`runtimes`] | loading runtimes, and looking one up by name |
//! | [`warm`] | the warm pool of sessions started ahead of demand |
//! | [`images`] | fork, snapshot, export, import, restore |
//! | [`reaper`] | idle TTL, lifetime and memory-pressure upkeep |
//! | [`suspend`] | sessions at rest in the store: suspend, resume, checkpoints, recovery |
//! | [`private`] | the private data folder, and the ones dead managers left |

pub mod images;
mod private;
pub mod reaper;
pub mod request;
pub mod runtimes;
pub mod suspend;
pub mod warm;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ManagerConfig;
use crate::engine::{EngineSettings, SandboxEngine};
use crate::image;
use crate::metrics::{Load, Metrics};
use crate::runtime::Runtime;
use crate::session::{self, EndReason, Info, Limits, Live, NewSession, Origin, Session};
use crate::snapshots::SnapshotStore;
use crate::{Error, Result};

use images::Provenance;
pub use reaper::available_memory;
pub use request::{CreateRequest, MAX_TTL_SECS};
use request::{check_env, check_metadata};
pub use suspend::Recovered;
use suspend::{Found, Parked};
use warm::WarmPool;

/// Images decoded at once (imports and restores): each may hold up to the manager's image
/// bounds in memory while it is read.
const DECODING: usize = 2;
/// Ended sessions remembered so that later calls answer "ended, because..." (410).
const TOMBSTONES: usize = 100_000;

/// The sessions of one manager and the engine they run on. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<ManagerState>,
}

/// What every clone of a [`Registry`] shares: the sessions, the engine and runtimes, the
/// slots of the pooling allocator, the warm pool and the snapshot store.
struct ManagerState {
    config: ManagerConfig,
    engine: SandboxEngine,
    cache: arl_runtimes::ModuleCache,
    runtimes: RwLock<HashMap<String, Arc<Runtime>>>,
    /// Runtimes being loaded: a create for one of them answers "not ready", not "unknown".
    loading: RwLock<Vec<String>>,
    sessions: RwLock<HashMap<String, Arc<Session>>>,
    /// Clients' sessions suspended to the store. Locked after `sessions` when both are.
    parked: RwLock<HashMap<String, Arc<Parked>>>,
    tombstones: Mutex<Tombstones>,
    slots: Arc<Semaphore>,
    /// Turns to decode an image (see [`DECODING`]).
    decoding: Semaphore,
    warm: WarmPool,
    metrics: Arc<Metrics>,
    draining: AtomicBool,
    /// The drain moves sessions out through the store (see [`Registry::move_out`]).
    moving: AtomicBool,
    stopping: AtomicBool,
    /// Clients' snapshots.
    snapshots: SnapshotStore,
    /// Suspended and checkpointed sessions (the snapshot store when one is given).
    store: SnapshotStore,
    egress: crate::egress::Egress,
    data_dir: PathBuf,
    _private_dir: Option<private::PrivateDir>,
}

#[derive(Default)]
struct Tombstones {
    reasons: HashMap<String, EndReason>,
    order: VecDeque<String>,
}

impl Tombstones {
    fn insert(&mut self, id: String, reason: EndReason) {
        if self.order.len() >= TOMBSTONES
            && let Some(old) = self.order.pop_front()
        {
            self.reasons.remove(&old);
        }
        self.order.push_back(id.clone());
        self.reasons.insert(id, reason);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Where a turn goes: the live session a client named, and the deadline it asked for
/// (`None`: the session's own). Every door (HTTP, RLM, gRPC) resolves its turns here.
pub struct Target {
    pub session: Live,
    pub timeout: Option<Duration>,
}

impl Registry {
    /// Makes the engine and the data folder; no runtime is loaded yet.
    pub fn new(config: ManagerConfig) -> Result<Self> {
        config.validate()?;
        let engine = SandboxEngine::new(EngineSettings {
            max_sessions: config.max_sessions,
            max_memory_bytes: config.max_memory_bytes,
        })?;
        let (data_dir, private) = match &config.data_dir {
            Some(dir) => (dir.clone(), None),
            None => {
                let private = private::PrivateDir::new()?;
                (private.path().to_owned(), Some(private))
            }
        };
        // Sessions outlive a restart only in a store the next manager is given too: one named
        // by `--store`, or the data folder's.
        let store = match &config.store {
            Some(location) => SnapshotStore::open(location)?,
            None => SnapshotStore::open(&data_dir.join("store").display().to_string())?,
        };
        let sessions_dir = data_dir.join("sessions");
        std::fs::create_dir_all(&sessions_dir)
            .map_err(|e| Error::Io(format!("creating {}", sessions_dir.display()), e))?;
        let wheels = crate::egress::wheels::Installer::new(
            config.wheelhouse.clone(),
            config.pip_index.clone(),
            config.cache_dir.join("wheels"),
        );
        let egress = crate::egress::Egress::new(config.network.clone(), wheels)?;
        Ok(Self {
            inner: Arc::new(ManagerState {
                egress,
                cache: arl_runtimes::ModuleCache::new(config.cache_dir.join("modules")),
                slots: Arc::new(Semaphore::new(config.max_sessions as usize)),
                snapshots: SnapshotStore::open(&config.store())?,
                store,
                config,
                engine,
                runtimes: RwLock::default(),
                loading: RwLock::default(),
                sessions: RwLock::default(),
                parked: RwLock::default(),
                tombstones: Mutex::default(),
                decoding: Semaphore::new(DECODING),
                warm: WarmPool::default(),
                metrics: Arc::new(Metrics::new()),
                draining: AtomicBool::new(false),
                moving: AtomicBool::new(false),
                stopping: AtomicBool::new(false),
                data_dir,
                _private_dir: private,
            }),
        })
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.inner.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Sessions, capacity, memory and whether new sessions are refused.
    pub fn load(&self) -> Load {
        let sessions = read(&self.inner.sessions);
        Load {
            sessions: sessions.len() as u64,
            capacity: u64::from(self.inner.config.max_sessions),
            memory_bytes: sessions.values().map(|s| s.memory_bytes()).sum(),
            draining: self.draining(),
            suspended: read(&self.inner.parked).len() as u64,
        }
    }

    /// Starts (`true`) or stops refusing new sessions; existing ones carry on either way.
    pub fn set_draining(&self, draining: bool) {
        let was = self.inner.draining.swap(draining, Ordering::SeqCst);
        if draining {
            self.drop_warm();
        } else {
            self.inner.moving.store(false, Ordering::SeqCst);
        }
        if was != draining {
            tracing::info!(draining, "drain changed");
        }
    }

    pub fn draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Refuses new sessions for good: the manager is stopping.
    pub fn stop_accepting(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.drop_warm();
    }

    /// Creates a session within the manager's capacity.
    pub async fn create(&self, request: CreateRequest) -> Result<Arc<Session>> {
        self.check_open()?;
        if let Some(id) = &request.from_snapshot {
            let _decoding = self.decoding_slot().await?;
            let image = self.inner.snapshots.load(id, self.image_bounds()).await?;
            return self.restore(image, &request, Provenance::Elsewhere).await;
        }
        let runtime = self.runtime(&request.runtime_name("python")?)?;
        let limits = self.limits(&request, &runtime, self.inner.config.defaults)?;
        let metadata = request.metadata.clone().unwrap_or_default();
        check_metadata(&metadata)?;
        let grants = self.grants(&request)?;
        let warm = request
            .is_plain(&self.inner.config.defaults)
            .then(|| self.claim_warm(&runtime.name))
            .flatten();
        let session = match warm {
            Some(session) => {
                session.end_in(limits.lifetime);
                session
            }
            None => {
                let env = check_env(request.env.unwrap_or_default())?;
                let permit = self.acquire_slot().await?;
                self.start(None, runtime, limits, env, permit, false, None)
                    .await?
            }
        };
        session.set_metadata(metadata);
        session.door.grant(grants);
        self.adopt(&session);
        if let Some(secs) = request.suspend_after_secs {
            session.set_suspend_after(Duration::from_secs(secs));
        }
        self.top_up_soon();
        Ok(session)
    }

    /// What a create's `network` and `tools` grant its session, checked.
    pub(super) fn grants(&self, request: &CreateRequest) -> Result<crate::egress::Grants> {
        self.inner
            .egress
            .grants(request.network.as_ref(), request.tools.as_ref())
    }

    pub(super) fn check_open(&self) -> Result<()> {
        if self.inner.stopping.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        if self.draining() {
            return Err(Error::Draining);
        }
        Ok(())
    }

    /// The session `id` names and the deadline `timeout_ms` asks for, both checked: the
    /// deadline first (422 before 404), then the session (404, or 410 with why it ended).
    pub async fn target(&self, id: &str, timeout_ms: Option<u64>) -> Result<Target> {
        let timeout = self.check_timeout(timeout_ms)?;
        Ok(Target {
            session: self.get(id).await?,
            timeout,
        })
    }

    /// Every client's session, live or suspended, oldest first.
    pub fn list(&self) -> Vec<Info> {
        let mut all: Vec<Info> = read(&self.inner.sessions)
            .values()
            .map(|s| s.info())
            .collect();
        all.extend(self.parked_infos());
        all.sort_by_key(|i| i.created_at);
        all
    }

    /// Ends and forgets a session at a client's request, live or suspended; later calls
    /// answer 404.
    pub async fn delete(&self, id: &str) -> Result<()> {
        let session = write(&self.inner.sessions).remove(id);
        if let Some(session) = session {
            session.end(EndReason::Deleted);
            return Ok(());
        }
        match self.find(id) {
            Found::Parked(parked) => {
                let _turn = parked.turn.lock().await;
                if write(&self.inner.parked).remove(id).is_some() {
                    self.inner.metrics.session_ended(&EndReason::Deleted);
                    self.inner.forget_stored(id);
                }
                Ok(())
            }
            Found::Live(_) => Box::pin(self.delete(id)).await,
            Found::Gone(Error::NotFound(_)) => self.get(id).await.map(drop),
            Found::Gone(e) => Err(e),
        }
    }

    /// Deletes session `id` from a context that cannot wait (a guard's `drop`): a live
    /// session ends at once, a suspended one in the background.
    pub fn discard(&self, id: &str) {
        let session = write(&self.inner.sessions).remove(id);
        match session {
            Some(session) => session.end(EndReason::Deleted),
            None => {
                let (registry, id) = (self.clone(), id.to_owned());
                tokio::spawn(async move { registry.delete(&id).await });
            }
        }
    }

    /// Deletes every session, live or suspended; how many there were.
    pub fn delete_all(&self) -> usize {
        let all: Vec<_> = write(&self.inner.sessions).drain().collect();
        for (_, session) in &all {
            session.end(EndReason::Deleted);
        }
        let parked: Vec<_> = write(&self.inner.parked).drain().collect();
        for (id, _) in &parked {
            self.inner.metrics.session_ended(&EndReason::Deleted);
            self.inner.forget_stored(id);
        }
        all.len() + parked.len()
    }

    /// Ends every session (the manager is stopping) and waits until their stores are gone.
    /// Those that ran a turn since their last checkpoint are checkpointed first (within
    /// `grace`), and what the store holds of them is kept: a manager started again on the same
    /// store serves them again.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.drop_warm();
        if !self.inner.config.checkpoint_every.is_zero() {
            let _ = tokio::time::timeout(grace, self.checkpoint(true)).await;
        }
        let all: Vec<_> = read(&self.inner.sessions).values().cloned().collect();
        for session in &all {
            session.end(EndReason::Shutdown);
        }
        let all_slots = self.inner.config.max_sessions;
        let _ = tokio::time::timeout(grace, self.inner.slots.acquire_many(all_slots)).await;
    }

    /// Starts a session on `permit`'s slot, under `id` when one is given (a resumed session
    /// keeps its own): a new interpreter, or one from an image whose files are written (or
    /// copied from a folder) into the new session's folder first. Each instance has a folder
    /// of its own, whatever its id.
    #[allow(
        clippy::too_many_arguments,
        reason = "the parts of a session, each distinct"
    )]
    pub(super) async fn start(
        &self,
        id: Option<String>,
        runtime: Arc<Runtime>,
        limits: Limits,
        env: Vec<(String, String)>,
        permit: OwnedSemaphorePermit,
        warm: bool,
        origin: Option<(Origin, Option<PathBuf>)>,
    ) -> Result<Arc<Session>> {
        let hex = uuid::Uuid::new_v4().simple();
        let id = id.unwrap_or_else(|| match self.inner.config.id_prefix.as_str() {
            "" => hex.to_string(),
            prefix => format!("{prefix}.{hex}"),
        });
        let dir = self.inner.data_dir.join("sessions").join(hex.to_string());
        let origin = match origin {
            None => None,
            Some((origin, copy_from)) => {
                // Most forks have no files to copy: that is seen without a blocking thread.
                let copy_from = copy_from.filter(|d| !image::own_dirs_empty(d));
                let (image, to) = (origin.image.clone(), dir.clone());
                let (_, max_files) = self.image_bounds();
                let written = match copy_from {
                    Some(source) => {
                        blocking(move || image::copy_dirs(&source, &to, max_files)).await
                    }
                    None if image.files.is_empty() => Ok(()),
                    None => blocking(move || image::write_dirs(&to, &image.files)).await,
                };
                if let Err(e) = written {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
                Some(origin)
            }
        };
        let weak = Arc::downgrade(&self.inner);
        let on_end = move |session: &Session, reason: EndReason| {
            if let Some(inner) = weak.upgrade() {
                inner.forget(session, reason);
            }
        };
        let door = Arc::new(crate::egress::Door::new(
            &self.inner.egress,
            self.inner.metrics.clone(),
            id.clone(),
            dir.join("workspace"),
        ));
        let new = NewSession {
            door,
            id,
            runtime,
            limits,
            env,
            dir: dir.clone(),
            permit,
            metrics: self.inner.metrics.clone(),
            warm,
            origin,
        };
        session::start(new, on_end).await.inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&dir);
        })
    }

    /// Makes `session` a client's: listed, counted, reaped, suspended when idle.
    pub(super) fn adopt(&self, session: &Arc<Session>) {
        self.inner.metrics.session_created(&session.runtime);
        session.set_suspend_after(self.inner.config.suspend_after);
        write(&self.inner.sessions).insert(session.id.clone(), session.clone());
    }
}

impl ManagerState {
    fn forget(&self, session: &Session, reason: EndReason) {
        let id = session.id.as_str();
        {
            let mut sessions = write(&self.sessions);
            if sessions
                .get(id)
                .is_some_and(|s| std::ptr::eq(s.as_ref(), session))
            {
                sessions.remove(id);
            }
        }
        if session.is_warm() || reason == EndReason::Suspended {
            return; // never a client's, or lives on in the store: nothing to count or remember
        }
        // A manager stopping keeps its sessions in the store, for the next one.
        if session.stored() && reason != EndReason::Shutdown {
            self.forget_stored(id);
        }
        if reason == EndReason::Deleted {
            self.metrics.session_ended(&reason);
        } else {
            tracing::info!(session = id, %reason, "session ended");
            self.bury(id, reason);
        }
    }
}

/// Runs blocking work (files, compression) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Io("a blocking task".into(), std::io::Error::other(e)))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tombstones_forget_the_oldest_past_the_cap() {
        let mut t = Tombstones::default();
        for i in 0..TOMBSTONES + 1 {
            t.insert(i.to_string(), EndReason::Idle);
        }
        assert!(!t.reasons.contains_key("0"));
        assert_eq!(t.reasons.get("1"), Some(&EndReason::Idle));
        assert_eq!(t.reasons.len(), TOMBSTONES);
    }
}
