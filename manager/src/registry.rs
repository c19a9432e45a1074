//! All sessions of one manager: create within capacity, look up, list, end, reap.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use arl_runtimes::{ModuleCache, Progress};
use tokio::sync::Semaphore;

use crate::config::ManagerConfig;
use crate::engine::{EngineSettings, SandboxEngine};
use crate::metrics::Metrics;
use crate::runtime::{Runtime, RuntimeSpec};
use crate::session::{self, EndReason, Info, Limits, NewSession, Session};
use crate::state::{Image, SnapshotInfo, SnapshotStore};
use crate::{Error, Result};

/// How long after a create the warm pool is refilled.
const REFILL_DELAY: Duration = Duration::from_millis(25);
/// How long a create waits for the slot of a warm session it evicted.
const EVICT_WAIT: Duration = Duration::from_secs(2);
/// Ended sessions remembered so that later calls answer "ended, because..." (410).
const TOMBSTONES: usize = 100_000;
/// Entries a request's `env` may have, and bytes each key or value may hold.
const MAX_ENV: usize = 256;
const MAX_ENV_BYTES: usize = 32 << 10;

/// What a client asks for when it creates a session; every field optional.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// The runtime's name; `"python"` when absent.
    #[schema(example = "python")]
    pub runtime: Option<String>,
    /// Deadline of one execution; the manager's default when absent.
    pub timeout_ms: Option<u64>,
    /// Memory limit; the manager's default when absent.
    pub memory_mib: Option<u64>,
    /// Added to the guest's fixed environment.
    pub env: Option<BTreeMap<String, String>>,
    /// End the session after this long unused; the manager's default when absent.
    pub idle_ttl_secs: Option<u64>,
    /// End the session this long after its creation, even mid-turn; the manager's default
    /// when absent.
    pub lifetime_secs: Option<u64>,
    /// Roll a turn that traps, times out, is cancelled or blows the memory limit back, and
    /// carry on (`true`, the manager's default unless it runs with `--no-rollback`); or end
    /// the session (`false`).
    pub rollback: Option<bool>,
    /// Start from this snapshot's state instead of a new interpreter. Its limits are the
    /// snapshot's unless given here; `env` cannot be given (the interpreter has its own).
    #[schema(example = "snap-5f0c1b2e9d8a4c7b8e6f1a2b3c4d5e6f")]
    pub from_snapshot: Option<String>,
}

/// The longest idle TTL or lifetime a request may ask for: 30 days.
const MAX_TTL_SECS: u64 = 30 * 24 * 3600;

impl CreateRequest {
    /// Whether it asks for nothing but the defaults (a runtime aside), so that a warm session
    /// started ahead can serve it.
    fn is_plain(&self, defaults: &Limits) -> bool {
        self.from_snapshot.is_none()
            && self.rollback.is_none_or(|r| r == defaults.rollback)
            && self.timeout_ms.is_none()
            && self.memory_mib.is_none()
            && self.idle_ttl_secs.is_none()
            && self.lifetime_secs.is_none()
            && self.env.as_ref().is_none_or(BTreeMap::is_empty)
    }
}

/// How loaded a manager is: what the operator scales and places on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Load {
    /// Live sessions.
    pub sessions: u64,
    /// Sessions this manager can hold at once.
    pub capacity: u64,
    /// Linear memory of the live sessions, summed.
    pub memory_bytes: u64,
    /// Whether new sessions are refused.
    pub draining: bool,
}

/// The sessions of one manager and the engine they run on. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    config: ManagerConfig,
    engine: SandboxEngine,
    cache: ModuleCache,
    runtimes: RwLock<HashMap<String, Arc<Runtime>>>,
    sessions: RwLock<HashMap<String, Arc<Session>>>,
    tombstones: Mutex<Tombstones>,
    slots: Arc<Semaphore>,
    /// Sessions started ahead of demand, per runtime, oldest first.
    warm: Mutex<HashMap<String, VecDeque<Arc<Session>>>>,
    /// A top-up is running.
    filling: AtomicBool,
    metrics: Arc<Metrics>,
    draining: AtomicBool,
    stopping: AtomicBool,
    snapshots: SnapshotStore,
    data_dir: PathBuf,
    _private_dir: Option<tempfile::TempDir>,
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
                let tmp = tempfile::Builder::new()
                    .prefix("arl-manager-")
                    .tempdir()
                    .map_err(|e| Error::Io("creating the data folder".into(), e))?;
                (tmp.path().to_owned(), Some(tmp))
            }
        };
        let sessions_dir = data_dir.join("sessions");
        std::fs::create_dir_all(&sessions_dir)
            .map_err(|e| Error::Io(format!("creating {}", sessions_dir.display()), e))?;
        Ok(Self {
            inner: Arc::new(Inner {
                cache: ModuleCache::new(config.cache_dir.join("modules")),
                slots: Arc::new(Semaphore::new(config.max_sessions as usize)),
                snapshots: SnapshotStore::new(config.snapshot_dir()),
                config,
                engine,
                runtimes: RwLock::default(),
                sessions: RwLock::default(),
                tombstones: Mutex::default(),
                warm: Mutex::default(),
                filling: AtomicBool::new(false),
                metrics: Arc::new(Metrics::new()),
                draining: AtomicBool::new(false),
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
        }
    }

    /// Starts (`true`) or stops refusing new sessions; existing ones carry on either way.
    pub fn set_draining(&self, draining: bool) {
        let was = self.inner.draining.swap(draining, Ordering::SeqCst);
        if draining {
            self.drop_warm();
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

    /// Loads a runtime (compiling it on first use) and makes it available to new sessions.
    /// Blocking: call it from a blocking thread.
    pub fn load_runtime(&self, spec: RuntimeSpec, progress: Progress<'_>) -> Result<()> {
        let runtime = Runtime::load(
            self.inner.engine.engine(),
            &self.inner.cache,
            spec,
            progress,
        )?;
        write(&self.inner.runtimes).insert(runtime.name.clone(), Arc::new(runtime));
        Ok(())
    }

    /// Fetches, verifies, snapshots and loads CPython. Blocking, about three minutes the
    /// first time.
    pub fn load_python(&self, progress: Progress<'_>) -> Result<()> {
        let cache_dir = &self.inner.config.cache_dir;
        let artifacts = arl_runtimes::python::fetch(cache_dir, progress)?;
        let (snapshot, digest) = crate::snapshot::python(&artifacts, cache_dir, progress)?;
        self.load_runtime(RuntimeSpec::python(artifacts, snapshot, digest), progress)
    }

    /// Whether any runtime is loaded.
    pub fn ready(&self) -> bool {
        !read(&self.inner.runtimes).is_empty()
    }

    /// Creates a session within the manager's capacity.
    pub async fn create(&self, request: CreateRequest) -> Result<Arc<Session>> {
        self.check_open()?;
        if let Some(id) = &request.from_snapshot {
            let (max_memory, max_files) = self.image_bounds();
            let snapshots = self.inner.snapshots.clone();
            let id = id.clone();
            let image = blocking(move || snapshots.load(&id, max_memory, max_files)).await?;
            return self.restore(image, &request, false, None).await;
        }
        let runtime = self.runtime(request.runtime.as_deref().unwrap_or("python"))?;
        if request.is_plain(&self.inner.config.defaults)
            && let Some(session) = self.take_warm(&runtime.name)
        {
            session.claim();
            self.adopt(&session);
            self.top_up_soon();
            return Ok(session);
        }
        let limits = self.limits(&request, &runtime, self.inner.config.defaults)?;
        let env = check_env(request.env.unwrap_or_default())?;
        let permit = self.slot().await?;
        let session = self
            .start(runtime, limits, env, permit, false, None)
            .await?;
        self.adopt(&session);
        self.top_up_soon();
        Ok(session)
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.stopping.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        if self.draining() {
            return Err(Error::Draining);
        }
        Ok(())
    }

    fn runtime(&self, name: &str) -> Result<Arc<Runtime>> {
        let runtimes = read(&self.inner.runtimes);
        if runtimes.is_empty() {
            return Err(Error::NotReady);
        }
        runtimes.get(name).cloned().ok_or_else(|| {
            let mut names: Vec<_> = runtimes.keys().cloned().collect();
            names.sort();
            Error::UnknownRuntime(name.to_owned(), names.join(", "))
        })
    }

    /// A free pooled slot, taken from a warm session when there is no other.
    async fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        match self.inner.slots.clone().try_acquire_owned() {
            Ok(permit) => Ok(permit),
            Err(_) => self.evict_warm().await,
        }
    }

    /// The largest import (an export's bytes) this manager takes.
    pub fn import_limit(&self) -> usize {
        let (memory, files) = self.image_bounds();
        usize::try_from(memory.saturating_add(files)).unwrap_or(usize::MAX)
    }

    /// The most memory and file bytes an image may claim here.
    fn image_bounds(&self) -> (u64, u64) {
        let config = &self.inner.config;
        (
            config.max_memory_bytes,
            config.defaults.workspace_bytes.max(1 << 30),
        )
    }

    /// A new session with the same interpreter state and files as `id`'s, evolving on its
    /// own from now: its pseudo-random states are drawn anew on its first turn.
    pub async fn fork(&self, id: &str) -> Result<Arc<Session>> {
        self.check_open()?;
        let source = self.get(id)?;
        let image = source.capture().await?;
        let request = CreateRequest::default();
        self.restore(image, &request, true, Some(source.dir.clone()))
            .await
    }

    /// Stores the state and files of session `id` as a snapshot.
    pub async fn snapshot(&self, id: &str) -> Result<SnapshotInfo> {
        let image = self.image_with_files(id).await?;
        let snapshots = self.inner.snapshots.clone();
        blocking(move || snapshots.save(&image)).await
    }

    /// The state and files of session `id`, as bytes another manager can import.
    pub async fn export(&self, id: &str) -> Result<Vec<u8>> {
        let image = self.image_with_files(id).await?;
        blocking(move || {
            let mut bytes = Vec::new();
            image
                .encode(&mut bytes)
                .map_err(|e| Error::Io("encoding the export".into(), e))?;
            Ok(bytes)
        })
        .await
    }

    /// A new session from bytes made by [`export`](Self::export), here or on another manager.
    pub async fn import(&self, bytes: bytes::Bytes) -> Result<Arc<Session>> {
        self.check_open()?;
        let (max_memory, max_files) = self.image_bounds();
        let image = blocking(move || Image::decode(&bytes[..], max_memory, max_files)).await?;
        self.restore(image, &CreateRequest::default(), false, None)
            .await
    }

    async fn image_with_files(&self, id: &str) -> Result<Image> {
        let session = self.get(id)?;
        let mut image = session.capture().await?;
        let (dir, quota) = (session.dir.clone(), session.limits.workspace_bytes);
        image.files = blocking(move || crate::state::read_dirs(&dir, quota)).await?;
        Ok(image)
    }

    /// The stored snapshots.
    pub fn snapshots(&self) -> &SnapshotStore {
        &self.inner.snapshots
    }

    /// Starts a session from `image`, with the request's limits over the image's; its files
    /// are the image's own, or copied from `copy_from` (a fork's parent).
    async fn restore(
        &self,
        image: Image,
        request: &CreateRequest,
        reseed: bool,
        copy_from: Option<PathBuf>,
    ) -> Result<Arc<Session>> {
        self.check_open()?;
        if request.env.is_some() {
            return Err(Error::InvalidRequest(
                "env cannot be given with from_snapshot: the interpreter keeps its own".into(),
            ));
        }
        let runtime = self.runtime(request.runtime.as_deref().unwrap_or(&image.runtime))?;
        if runtime.name != image.runtime || runtime.digest != image.module {
            return Err(Error::ModuleMismatch(
                short(&image.module),
                short(&runtime.digest),
            ));
        }
        let limits = self.limits(request, &runtime, image.limits)?;
        if limits.memory_bytes < image.memory_bytes {
            return Err(Error::InvalidRequest(format!(
                "the snapshot's memory is {} MiB, above the memory_mib asked for",
                image.memory_bytes.div_ceil(1 << 20)
            )));
        }
        let permit = self.slot().await?;
        let from = session::From {
            image: Arc::new(image),
            reseed,
        };
        let session = self
            .start(
                runtime,
                limits,
                vec![],
                permit,
                false,
                Some((from, copy_from)),
            )
            .await?;
        self.adopt(&session);
        Ok(session)
    }

    /// Starts a session on `permit`'s slot: a new interpreter, or one from an image whose
    /// files are written (or copied from a folder) into the new session's folder first.
    async fn start(
        &self,
        runtime: Arc<Runtime>,
        limits: Limits,
        env: Vec<(String, String)>,
        permit: tokio::sync::OwnedSemaphorePermit,
        warm: bool,
        from: Option<(session::From, Option<PathBuf>)>,
    ) -> Result<Arc<Session>> {
        let hex = uuid::Uuid::new_v4().simple();
        let id = match self.inner.config.id_prefix.as_str() {
            "" => hex.to_string(),
            prefix => format!("{prefix}.{hex}"),
        };
        let dir = self.inner.data_dir.join("sessions").join(&id);
        let from = match from {
            None => None,
            Some((from, copy_from)) => {
                // Most forks have no files to copy: that is seen without a blocking thread.
                let copy_from = copy_from.filter(|d| !crate::state::own_dirs_empty(d));
                let (image, to) = (from.image.clone(), dir.clone());
                let written = match copy_from {
                    Some(source) => blocking(move || crate::state::copy_dirs(&source, &to)).await,
                    None if image.files.is_empty() => Ok(()),
                    None => blocking(move || crate::state::write_dirs(&to, &image.files)).await,
                };
                if let Err(e) = written {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
                Some(from)
            }
        };
        let weak = Arc::downgrade(&self.inner);
        let on_end = move |session: &Session, reason: EndReason| {
            if let Some(inner) = weak.upgrade() {
                inner.forget(session, reason);
            }
        };
        let new = NewSession {
            id,
            runtime,
            limits,
            env,
            dir: dir.clone(),
            permit,
            metrics: self.inner.metrics.clone(),
            warm,
            from,
        };
        session::start(new, on_end).await.inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&dir);
        })
    }

    /// Makes `session` a client's: listed, counted, reaped.
    fn adopt(&self, session: &Arc<Session>) {
        self.inner.metrics.session_created(&session.runtime);
        write(&self.inner.sessions).insert(session.id.clone(), session.clone());
    }

    /// A warm session of `runtime` that is still alive, if one waits.
    fn take_warm(&self, runtime: &str) -> Option<Arc<Session>> {
        let mut warm = lock(&self.inner.warm);
        let queue = warm.get_mut(runtime)?;
        std::iter::from_fn(|| queue.pop_front()).find(|s| s.ended().is_none())
    }

    /// Frees a slot held by a warm session for a client's session (the manager is otherwise
    /// full); `Full` when there is none to give up.
    async fn evict_warm(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        let full = || Error::Full(self.inner.config.max_sessions);
        let waited = Instant::now();
        let victim = loop {
            let queued = lock(&self.inner.warm)
                .values_mut()
                .find_map(VecDeque::pop_front);
            if let Some(victim) = queued {
                break victim;
            }
            // A warm session still starting holds a slot too: it gives it up once queued.
            if !self.inner.filling.load(Ordering::SeqCst) || waited.elapsed() > EVICT_WAIT {
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
        lock(&self.inner.warm)
            .values()
            .flatten()
            .map(|s| s.id.clone())
            .collect()
    }

    /// Ends every warm session (draining or stopping: they would only hold slots).
    fn drop_warm(&self) {
        let all: Vec<_> = lock(&self.inner.warm)
            .values_mut()
            .flat_map(std::mem::take)
            .collect();
        for session in all {
            session.end(EndReason::Deleted);
        }
    }

    /// Tops up a moment after a create: the client's first turns, which usually follow at
    /// once, go first on the cores.
    fn top_up_soon(&self) {
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
        if target == 0 || self.inner.filling.swap(true, Ordering::SeqCst) {
            return;
        }
        let runtimes: Vec<_> = read(&self.inner.runtimes)
            .values()
            .filter(|r| r.protocol.has_bootstrap())
            .cloned()
            .collect();
        for runtime in runtimes {
            loop {
                let have = lock(&self.inner.warm)
                    .get(&runtime.name)
                    .map_or(0, VecDeque::len);
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
                    .start(runtime.clone(), defaults, vec![], permit, true, None)
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
                        lock(&self.inner.warm)
                            .entry(runtime.name.clone())
                            .or_default()
                            .push_back(session);
                    }
                    other => {
                        tracing::warn!(?other, "a warm session failed its first turn");
                        session.end(EndReason::Deleted);
                        break;
                    }
                }
            }
        }
        self.inner.filling.store(false, Ordering::SeqCst);
    }

    /// `base` (the manager's defaults, or a snapshot's limits) with the request's over it.
    fn limits(&self, request: &CreateRequest, runtime: &Runtime, base: Limits) -> Result<Limits> {
        let config = &self.inner.config;
        let mut limits = base;
        if let Some(rollback) = request.rollback {
            limits.rollback = rollback;
        }
        if let Some(ms) = request.timeout_ms {
            if ms == 0 || Duration::from_millis(ms) > config.max_timeout {
                return Err(Error::InvalidRequest(format!(
                    "timeout_ms must be between 1 and {}",
                    config.max_timeout.as_millis()
                )));
            }
            limits.timeout = Duration::from_millis(ms);
        }
        if let Some(mib) = request.memory_mib {
            let bytes = mib.saturating_mul(1 << 20);
            if bytes < runtime.min_memory_bytes || bytes > config.max_memory_bytes {
                return Err(Error::InvalidRequest(format!(
                    "memory_mib must be between {} (the {} runtime's initial memory) and {}",
                    runtime.min_memory_bytes.div_ceil(1 << 20),
                    runtime.name,
                    config.max_memory_bytes >> 20
                )));
            }
            limits.memory_bytes = bytes;
        }
        for (name, asked, limit) in [
            ("idle_ttl_secs", request.idle_ttl_secs, &mut limits.idle_ttl),
            ("lifetime_secs", request.lifetime_secs, &mut limits.lifetime),
        ] {
            if let Some(secs) = asked {
                if secs == 0 || secs > MAX_TTL_SECS {
                    return Err(Error::InvalidRequest(format!(
                        "{name} must be between 1 and {MAX_TTL_SECS}"
                    )));
                }
                *limit = Duration::from_secs(secs);
            }
        }
        Ok(limits)
    }

    /// Checks a per-execution deadline a client asked for (`None`: the session's own).
    pub fn check_timeout(&self, timeout_ms: Option<u64>) -> Result<Option<Duration>> {
        let max = self.inner.config.max_timeout;
        match timeout_ms {
            Some(0) => Err(Error::InvalidRequest(
                "timeout_ms must be at least 1".into(),
            )),
            Some(ms) if Duration::from_millis(ms) > max => Err(Error::InvalidRequest(format!(
                "timeout_ms must be at most {}",
                max.as_millis()
            ))),
            other => Ok(other.map(Duration::from_millis)),
        }
    }

    /// The live session with `id`; an ended one answers why it ended.
    pub fn get(&self, id: &str) -> Result<Arc<Session>> {
        if let Some(session) = read(&self.inner.sessions).get(id) {
            return match session.ended() {
                Some(reason) => Err(Error::Ended(reason)),
                None => Ok(session.clone()),
            };
        }
        let tombstones = self
            .inner
            .tombstones
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match tombstones.reasons.get(id) {
            Some(reason) => Err(Error::Ended(reason.clone())),
            None => Err(Error::NotFound(id.to_owned())),
        }
    }

    /// Every live session, oldest first.
    pub fn list(&self) -> Vec<Info> {
        let mut all: Vec<Info> = read(&self.inner.sessions)
            .values()
            .map(|s| s.info())
            .collect();
        all.sort_by_key(|i| i.created_at);
        all
    }

    /// Ends and forgets a session at a client's request; later calls answer 404.
    pub fn delete(&self, id: &str) -> Result<()> {
        let session = write(&self.inner.sessions).remove(id);
        match session {
            Some(session) => {
                session.end(EndReason::Deleted);
                Ok(())
            }
            None => self.get(id).map(drop),
        }
    }

    /// Deletes every session; how many there were.
    pub fn delete_all(&self) -> usize {
        let all: Vec<_> = write(&self.inner.sessions).drain().collect();
        for (_, session) in &all {
            session.end(EndReason::Deleted);
        }
        all.len()
    }

    /// Ends every session whose idle TTL or lifetime has passed at `now`; how many.
    pub fn reap(&self, now: Instant) -> usize {
        self.inner.reap(now)
    }

    /// Starts the reaper task, which also keeps the warm sessions topped up; it stops when the
    /// registry is dropped.
    pub fn spawn_reaper(&self) {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let every = self.inner.config.reap_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                inner.reap(Instant::now());
                Registry { inner }.top_up().await;
            }
        });
    }

    /// Ends every session (the manager is stopping) and waits until their stores are gone.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.drop_warm();
        let all: Vec<_> = read(&self.inner.sessions).values().cloned().collect();
        for session in &all {
            session.end(EndReason::Shutdown);
        }
        let all_slots = self.inner.config.max_sessions;
        let _ = tokio::time::timeout(grace, self.inner.slots.acquire_many(all_slots)).await;
    }
}

impl Inner {
    fn forget(&self, session: &Session, reason: EndReason) {
        let id = session.id.as_str();
        write(&self.sessions).remove(id);
        if session.is_warm() {
            return; // never a client's: nothing to count or remember
        }
        self.metrics.session_ended(&reason);
        if reason != EndReason::Deleted {
            tracing::info!(session = id, %reason, "session ended");
            self.tombstones
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id.to_owned(), reason);
        }
    }

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
        let warm: Vec<_> = lock(&self.warm)
            .values_mut()
            .flat_map(std::mem::take)
            .collect();
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

/// Runs blocking work (files, compression) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Io("a blocking task".into(), std::io::Error::other(e)))?
}

/// The first 12 hex digits of a digest, as errors show it.
fn short(digest: &str) -> String {
    digest.chars().take(12).collect()
}

fn check_env(env: BTreeMap<String, String>) -> Result<Vec<(String, String)>> {
    if env.len() > MAX_ENV {
        return Err(Error::InvalidRequest(format!(
            "env may have at most {MAX_ENV} entries"
        )));
    }
    for (key, value) in &env {
        if key.is_empty() || key.contains(['=', '\0']) || key.len() > MAX_ENV_BYTES {
            return Err(Error::InvalidRequest(format!(
                "env key {key:?} must be non-empty, without '=' or NUL, at most {MAX_ENV_BYTES} bytes"
            )));
        }
        if value.contains('\0') || value.len() > MAX_ENV_BYTES {
            return Err(Error::InvalidRequest(format!(
                "env value of {key:?} must have no NUL and at most {MAX_ENV_BYTES} bytes"
            )));
        }
    }
    Ok(env.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_keys_and_values_are_checked() {
        let ok = BTreeMap::from([("A".to_owned(), "1".to_owned())]);
        assert_eq!(
            check_env(ok).ok(),
            Some(vec![("A".to_owned(), "1".to_owned())])
        );
        for bad in [("", "x"), ("A=B", "x"), ("A", "nul\0")] {
            let env = BTreeMap::from([(bad.0.to_owned(), bad.1.to_owned())]);
            assert!(
                matches!(check_env(env), Err(Error::InvalidRequest(_))),
                "{bad:?}"
            );
        }
    }

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
