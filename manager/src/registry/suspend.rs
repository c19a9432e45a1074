//! Sessions at rest in the store: suspended when idle (or when asked) and resumed by their
//! next request under the same id, checkpointed while live, and served again by a manager
//! restarted on the same store.
//!
//! A session is in one of two maps: live (`sessions`, an instance on a slot) or parked
//! (`parked`, its state in the store and its description here). Both are locked together,
//! live first, so a lookup never misses a session moving between them. A request holds the
//! live session it found ([`Live`]); a suspension parks the session first (later requests
//! wait on the parked entry), then waits for those holds to go before it captures, so no
//! turn sent to the session is lost to the suspension.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Mutex as AsyncMutex;

use super::{ManagerState, Registry, blocking, lock, read, write};
use crate::egress::Grants;
use crate::image;
use crate::session::{EndReason, Info, Lifecycle, Live, Origin, Session};
use crate::snapshots::{Kept, SessionRecord, epoch_ms, from_epoch_ms};
use crate::{Error, Result};

/// A client's session whose state is in the store, its instance freed.
pub(super) struct Parked {
    /// As `GET /v1/sessions/{id}` shows it: state `suspended`.
    info: Info,
    /// Its lifetime left: a suspended session's clock does not run.
    lifetime_left: Duration,
    suspend_after: Duration,
    /// What its guest was granted, when this process suspended it (a restarted manager
    /// resumes it with no network and no tools).
    grants: Option<Arc<Grants>>,
    contexts: Vec<arl_runtimes::Context>,
    /// Held while the session is being suspended or resumed.
    pub(super) turn: Arc<AsyncMutex<()>>,
    /// When it was last used, on this process's clock.
    idle_since: Instant,
    /// Bytes the store holds of it.
    stored_bytes: std::sync::atomic::AtomicU64,
}

impl Parked {
    fn info(&self) -> Info {
        Info {
            stored_bytes: self.stored_bytes.load(Ordering::SeqCst),
            ..self.info.clone()
        }
    }
}

/// Why a session is suspended, which decides what waits for what and who holds it after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Suspension {
    /// It sat idle: only if no request holds it; it stays this manager's.
    Idle,
    /// A client asked: after the requests holding it; it stays this manager's.
    Asked,
    /// A drain: after the requests holding it; released for any manager sharing the store to
    /// resume, and forgotten here.
    Release,
}

/// Where a lookup found a session.
pub(super) enum Found {
    Live(Live),
    Parked(Arc<Parked>),
    Gone(Error),
}

/// What a manager found in its store when it started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Sessions brought back, suspended, under their ids.
    pub sessions: usize,
    /// Sessions it held and cannot restore: they answer 410 `lost`.
    pub lost: usize,
    /// Files a writer that died mid-write left in the store.
    pub swept: usize,
    /// Session folders a dead predecessor left.
    pub folders: usize,
}

impl Registry {
    /// The session `id` names, live or parked; an ended one answers why it ended.
    pub(super) fn find(&self, id: &str) -> Found {
        let sessions = read(&self.inner.sessions);
        if let Some(session) = sessions.get(id) {
            return match session.ended() {
                Some(reason) => Found::Gone(Error::Ended(reason)),
                None => Found::Live(session.hold()),
            };
        }
        if let Some(parked) = read(&self.inner.parked).get(id) {
            return Found::Parked(parked.clone());
        }
        drop(sessions);
        match lock(&self.inner.tombstones).reasons.get(id) {
            Some(reason) => Found::Gone(Error::Ended(reason.clone())),
            None => Found::Gone(Error::NotFound(id.to_owned())),
        }
    }

    /// The live session `id` names, held for the request: a suspended one is resumed first,
    /// and one this manager does not know is looked for in the store.
    pub async fn get(&self, id: &str) -> Result<Live> {
        loop {
            match self.find(id) {
                Found::Live(live) => return Ok(live),
                Found::Parked(parked) => self.resume(id, &parked).await?,
                Found::Gone(Error::NotFound(_)) if self.adopt_stored(id).await? => {}
                Found::Gone(e) => return Err(e),
            }
        }
    }

    /// The session's description, without resuming it.
    pub async fn info(&self, id: &str) -> Result<Info> {
        match self.find(id) {
            Found::Live(live) => Ok(live.info()),
            Found::Parked(parked) => Ok(parked.info()),
            Found::Gone(Error::NotFound(_)) if self.adopt_stored(id).await? => self
                .parked_info(id)
                .ok_or_else(|| Error::NotFound(id.to_owned())),
            Found::Gone(e) => Err(e),
        }
    }

    fn parked_info(&self, id: &str) -> Option<Info> {
        read(&self.inner.parked).get(id).map(|p| p.info())
    }

    /// Every parked session's description.
    pub(super) fn parked_infos(&self) -> Vec<Info> {
        read(&self.inner.parked)
            .values()
            .map(|p| p.info())
            .collect()
    }

    /// Suspends session `id` now (after the turns queued before), as idleness would.
    pub async fn suspend(&self, id: &str) -> Result<Info> {
        let session = match self.find(id) {
            Found::Live(live) => live.arc(),
            Found::Parked(parked) => return Ok(parked.info()),
            Found::Gone(e) => return Err(e),
        };
        self.park(&session, Suspension::Asked).await
    }

    /// Resumes session `id` now, if it is suspended.
    pub async fn resume_now(&self, id: &str) -> Result<Info> {
        Ok(self.get(id).await?.info())
    }

    /// Puts `session`'s state in the store and frees its instance; it stays a session of this
    /// manager, parked, unless it is released (see [`Suspension`]). A failure leaves it live,
    /// and is counted.
    pub(super) async fn park(&self, session: &Arc<Session>, why: Suspension) -> Result<Info> {
        if !session.companions().is_empty() {
            return Err(Error::Refused(
                "it runs other languages' kernels beside its own; those cannot be suspended".into(),
            ));
        }
        let id = session.id.clone();
        let mut info = session.info();
        info.state = Lifecycle::Suspended;
        let turn = Arc::new(AsyncMutex::new(()));
        let Ok(parking) = turn.clone().try_lock_owned() else {
            return Err(Error::Refused("it is being suspended".into()));
        };
        let parked = Arc::new(Parked {
            info,
            lifetime_left: session.time_left(),
            suspend_after: session.suspend_after(),
            grants: Some(session.door.grants()),
            contexts: session.contexts(),
            turn,
            idle_since: session.idle_since().unwrap_or_else(Instant::now),
            stored_bytes: std::sync::atomic::AtomicU64::new(0),
        });
        {
            let mut sessions = write(&self.inner.sessions);
            let mut parked_map = write(&self.inner.parked);
            let ours = sessions.get(&id).is_some_and(|s| Arc::ptr_eq(s, session));
            if !ours || session.ended().is_some() {
                return Err(Error::Ended(session.ended().unwrap_or(EndReason::Deleted)));
            }
            if why == Suspension::Idle && session.held() {
                return Err(Error::Refused("a request is using it".into()));
            }
            sessions.remove(&id);
            parked_map.insert(id.clone(), parked.clone());
        }
        session.released().await;
        let owner = (why != Suspension::Release).then(|| self.inner.config.id_prefix.clone());
        match self.save(session, Kept::Suspended, owner).await {
            Ok(bytes) => parked.stored_bytes.store(bytes, Ordering::SeqCst),
            Err(e) => {
                self.unpark(session, &parked);
                // A guest holding a file open is refused a capture, and tried again later; the
                // store's own failures are the operator's to see.
                if e.is_internal() {
                    self.inner.metrics.store_failure();
                    tracing::warn!(session = %id, error = %e, "could not suspend a session: it stays live");
                }
                return Err(e);
            }
        }
        session.end(EndReason::Suspended);
        session.finished().await;
        self.inner.metrics.suspended();
        if why == Suspension::Release {
            // Requests waiting on it find it gone, and learn from the store where it went.
            write(&self.inner.parked).remove(&id);
        }
        drop(parking);
        Ok(parked.info())
    }

    /// Puts a session whose suspension failed back among the live ones.
    fn unpark(&self, session: &Arc<Session>, parked: &Arc<Parked>) {
        let mut sessions = write(&self.inner.sessions);
        let mut parked_map = write(&self.inner.parked);
        if parked_map
            .get(&session.id)
            .is_some_and(|p| Arc::ptr_eq(p, parked))
        {
            parked_map.remove(&session.id);
            sessions.insert(session.id.clone(), session.clone());
        }
    }

    /// Writes `session`'s state (or, for a session that never ran a turn and is only held,
    /// its record alone) to the store, as of the turns queued before this call, held by
    /// `owner` (`None`: released for any manager).
    pub(super) async fn save(
        &self,
        session: &Arc<Session>,
        kept: Kept,
        owner: Option<String>,
    ) -> Result<u64> {
        let _saving = session.saving.lock().await;
        let info = session.info();
        let bare = kept == Kept::Held;
        let image = if bare {
            None
        } else {
            let mut image = session.capture().await?;
            let (dir, quota) = (session.dir.clone(), session.limits.workspace_bytes);
            image.files = blocking(move || image::read_dirs(&dir, quota)).await?;
            Some(image)
        };
        let executions = image.as_ref().map_or(info.executions, |i| i.executions);
        let record = SessionRecord {
            id: session.id.clone(),
            runtime: session.runtime.clone(),
            kept,
            owner,
            executions,
            created_at_ms: epoch_ms(info.created_at),
            last_used_at_ms: epoch_ms(info.last_used_at),
            saved_at_ms: epoch_ms(SystemTime::now()),
            lifetime_left_ms: u64::try_from(session.time_left().as_millis()).unwrap_or(u64::MAX),
            suspend_after_ms: u64::try_from(session.suspend_after().as_millis())
                .unwrap_or(u64::MAX),
            limits: info.limits.into(),
            image_bytes: 0,
            metadata: (*info.metadata).clone(),
        };
        let bytes = self.inner.store.put_session(record, image).await?;
        session.saved((!bare).then_some(executions));
        Ok(bytes)
    }

    /// Resumes the parked session `id` from the store under the same id (unless another
    /// request did it first). A state the store cannot give back makes the session lost.
    async fn resume(&self, id: &str, parked: &Arc<Parked>) -> Result<()> {
        if self.inner.moving.load(Ordering::SeqCst) {
            // Its sessions are leaving this manager: this one goes too, and is resumed there.
            self.release(id, parked).await?;
            return Err(Error::Moved(String::new()));
        }
        let _turn = parked.turn.lock().await;
        let still = read(&self.inner.parked)
            .get(id)
            .is_some_and(|p| Arc::ptr_eq(p, parked));
        if !still {
            return Ok(()); // resumed, or ended, meanwhile
        }
        let image = match self
            .inner
            .store
            .session_image(id, self.image_bounds())
            .await
        {
            Ok(Some(image)) => image,
            Ok(None) => return Err(self.lose(id, "the store has no state for it")),
            Err(Error::BadSnapshot(why)) => return Err(self.lose(id, &why)),
            Err(e) => {
                self.inner.metrics.store_failure();
                return Err(Error::StoreUnavailable(e.public_message()));
            }
        };
        let runtime = self.runtime(&image.runtime)?;
        if runtime.digest != image.module {
            return Err(Error::ModuleMismatch(
                image.module.chars().take(12).collect(),
                runtime.digest.chars().take(12).collect(),
            ));
        }
        let permit = self.acquire_slot_or_suspend().await?;
        let limits = image.limits;
        let origin = Origin {
            image: Arc::new(image),
            reseed: false,
        };
        let session = self
            .start(
                Some(id.to_owned()),
                runtime,
                limits,
                vec![],
                permit,
                false,
                Some((origin, None)),
            )
            .await?;
        let info = &parked.info;
        session.resumed(info.created_at, info.last_used_at, parked.lifetime_left);
        session.set_suspend_after(parked.suspend_after);
        session.set_metadata((*info.metadata).clone());
        if let Some(grants) = &parked.grants {
            session.door.grant(grants.as_ref().clone());
        }
        session.set_contexts(parked.contexts.clone());
        {
            let mut sessions = write(&self.inner.sessions);
            let mut parked_map = write(&self.inner.parked);
            sessions.insert(id.to_owned(), session.clone());
            parked_map.remove(id);
        }
        self.inner.metrics.resumed();
        Ok(())
    }

    /// A free slot, made by suspending the longest-idle session when the manager is full.
    async fn acquire_slot_or_suspend(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        match self.acquire_slot().await {
            Err(Error::Full(n)) => {
                let idle = read(&self.inner.sessions)
                    .values()
                    .filter_map(|s| suspendable_since(s).map(|t| (t, s.clone())))
                    .min_by_key(|(t, _)| *t)
                    .map(|(_, s)| s);
                match idle {
                    Some(victim) if self.park(&victim, Suspension::Idle).await.is_ok() => {
                        self.acquire_slot().await
                    }
                    _ => Err(Error::Full(n)),
                }
            }
            other => other,
        }
    }

    /// Ends the parked session `id` as lost, leaving what the store holds for inspection.
    fn lose(&self, id: &str, why: &str) -> Error {
        tracing::error!(
            session = id,
            why,
            "a suspended session cannot be restored: lost"
        );
        write(&self.inner.parked).remove(id);
        self.inner.bury(id, EndReason::Lost);
        Error::Ended(EndReason::Lost)
    }

    /// Looks for session `id` in the store, for a manager that does not know it: one released
    /// for any manager (a drain moved it), or this manager's own from before a restart, is
    /// parked here; one held by another manager answers where it is. Whether it was parked.
    async fn adopt_stored(&self, id: &str) -> Result<bool> {
        let record = match self.inner.store.session(id).await {
            Ok(Some(record)) => record,
            Ok(None) | Err(Error::BadSnapshot(_)) => return Ok(false),
            Err(e) => {
                tracing::warn!(session = id, error = %e, "could not look a session up in the store");
                return Ok(false);
            }
        };
        let mine = &self.inner.config.id_prefix;
        match (&record.owner, record.kept) {
            (Some(owner), _) if owner != mine => return Err(Error::Moved(owner.clone())),
            // A draining manager takes nothing in: another one will.
            (None, _) if self.draining() => return Err(Error::Moved(String::new())),
            (_, Kept::Held) => {
                self.inner.bury(id, EndReason::Lost);
                return Err(Error::Ended(EndReason::Lost));
            }
            _ => {}
        }
        let mut record = record;
        record.owner = Some(mine.clone());
        if let Err(e) = self.inner.store.put_record(&record).await {
            self.inner.metrics.store_failure();
            return Err(Error::StoreUnavailable(e.public_message()));
        }
        self.park_record(record);
        Ok(true)
    }

    /// Parks the session a store record describes (it is this manager's now).
    fn park_record(&self, record: SessionRecord) {
        let parked = Arc::new(Parked {
            info: Info {
                id: record.id.clone(),
                runtime: record.runtime.clone(),
                state: Lifecycle::Suspended,
                created_at: from_epoch_ms(record.created_at_ms),
                last_used_at: from_epoch_ms(record.last_used_at_ms),
                executions: record.executions,
                memory_bytes: 0,
                limits: record.limits.into(),
                metadata: Arc::new(record.metadata),
                network: crate::egress::Summary::default(),
                stored_bytes: record.image_bytes,
            },
            lifetime_left: Duration::from_millis(record.lifetime_left_ms),
            suspend_after: Duration::from_millis(record.suspend_after_ms),
            grants: None,
            contexts: vec![],
            turn: Arc::default(),
            idle_since: Instant::now(),
            stored_bytes: std::sync::atomic::AtomicU64::new(record.image_bytes),
        });
        let _sessions = read(&self.inner.sessions);
        write(&self.inner.parked).insert(record.id, parked);
    }

    /// Serves again what this manager's store holds of its sessions from before it started
    /// (suspended or checkpointed: parked; only held: lost), and cleans what a dead
    /// predecessor left: staged store files and session folders.
    pub async fn recover(&self) -> Result<Recovered> {
        let (store, snapshots) = (self.inner.store.clone(), self.inner.snapshots.clone());
        let dir = self.inner.data_dir.join("sessions");
        let (swept, folders) =
            blocking(move || Ok((store.sweep() + snapshots.sweep(), clear_folder(&dir)))).await?;
        let mut found = Recovered {
            swept,
            folders: folders + blocking(|| Ok(super::private::sweep_dead())).await?,
            ..Recovered::default()
        };
        let mine = &self.inner.config.id_prefix;
        for record in self.inner.store.sessions().await? {
            if record.owner.as_ref() != Some(mine) {
                continue;
            }
            if record.kept == Kept::Held {
                self.inner.bury(&record.id, EndReason::Lost);
                let _ = self.inner.store.delete_session(&record.id).await;
                found.lost += 1;
            } else {
                self.park_record(record);
                found.sessions += 1;
            }
        }
        if found != Recovered::default() {
            tracing::info!(
                sessions = found.sessions,
                lost = found.lost,
                swept = found.swept,
                folders = found.folders,
                store = self.inner.store.location(),
                "recovered what an earlier manager left"
            );
        }
        Ok(found)
    }

    /// Hands every session of this manager to the others sharing its store: each is
    /// suspended (after the turns queued before) and released with no owner, and forgotten
    /// here, where a request for it answers 421 `session_moved`. How many moved.
    pub async fn move_out(&self) -> usize {
        self.inner.moving.store(true, Ordering::SeqCst);
        let mut moved = 0;
        // A request that was resuming a session as the move began brings it back live: the
        // next round takes it.
        for _ in 0..3 {
            let live: Vec<_> = read(&self.inner.sessions)
                .values()
                .filter(|s| !s.is_warm())
                .cloned()
                .collect();
            for session in &live {
                match self.park(session, Suspension::Release).await {
                    Ok(_) => moved += 1,
                    Err(e) => {
                        tracing::warn!(session = %session.id, error = %e, "could not move a session out");
                    }
                }
            }
            let parked: Vec<_> = read(&self.inner.parked)
                .iter()
                .map(|(id, p)| (id.clone(), p.clone()))
                .collect();
            for (id, parked) in &parked {
                if self.release(id, parked).await.is_ok() {
                    moved += 1;
                }
            }
            if live.is_empty() && parked.is_empty() {
                break;
            }
        }
        tracing::info!(moved, "moved the sessions out through the store");
        moved
    }

    /// Releases the parked session `id` for any manager sharing the store, and forgets it.
    async fn release(&self, id: &str, parked: &Arc<Parked>) -> Result<()> {
        let _turn = parked.turn.lock().await;
        let still = read(&self.inner.parked)
            .get(id)
            .is_some_and(|p| Arc::ptr_eq(p, parked));
        if !still {
            return Ok(());
        }
        let released = match self.inner.store.session(id).await {
            Ok(Some(mut record)) => {
                record.owner = None;
                self.inner.store.put_record(&record).await
            }
            Ok(None) => Err(Error::BadSnapshot("its record is gone".into())),
            Err(e) => Err(e),
        };
        match released {
            Ok(()) => {
                write(&self.inner.parked).remove(id);
                Ok(())
            }
            Err(e) => {
                self.inner.metrics.store_failure();
                tracing::warn!(session = id, error = %e, "could not release a session");
                Err(e)
            }
        }
    }

    /// Suspends the sessions unused past their `suspend_after`, ends parked sessions unused
    /// past `--suspended-ttl-secs`; returns how many of each were found due.
    pub async fn suspend_idle(&self, now: Instant) -> (usize, usize) {
        let due: Vec<_> = read(&self.inner.sessions)
            .values()
            .filter(|s| {
                let after = s.suspend_after();
                !after.is_zero()
                    && suspendable_since(s).is_some_and(|t| now.duration_since(t) >= after)
            })
            .cloned()
            .collect();
        for session in &due {
            if let Err(e) = self.park(session, Suspension::Idle).await {
                tracing::debug!(session = %session.id, error = %e, "not suspended");
            }
        }
        let ttl = self.inner.config.suspended_ttl;
        let expired: Vec<String> = read(&self.inner.parked)
            .iter()
            .filter(|(_, p)| now.duration_since(p.idle_since) >= ttl && p.turn.try_lock().is_ok())
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            if write(&self.inner.parked).remove(id).is_some() {
                self.inner.bury(id, EndReason::Idle);
                self.inner.forget_stored(id);
            }
        }
        (due.len(), expired.len())
    }

    /// Checkpoints every live session at rest that ran a turn since its last checkpoint, one
    /// at a time; a session that never ran one gets a record alone (after a crash it is known,
    /// and lost), unless `whole` (the manager is stopping: every session is kept whole, to be
    /// served again). A session mid-turn waits for the next round. How many were written.
    pub async fn checkpoint(&self, whole: bool) -> usize {
        let due: Vec<_> = read(&self.inner.sessions)
            .values()
            .filter(|s| {
                !s.is_warm()
                    && s.ended().is_none()
                    && s.idle_since().is_some()
                    && s.needs_saving(whole)
            })
            .cloned()
            .collect();
        let mut written = 0;
        for session in due {
            let kept = if session.executions() == 0 && !whole {
                Kept::Held
            } else {
                Kept::Checkpoint
            };
            let owner = Some(self.inner.config.id_prefix.clone());
            match self.save(&session, kept, owner).await {
                Ok(_) => written += 1,
                Err(Error::Ended(_) | Error::Refused(_)) => {}
                Err(e) => {
                    self.inner.metrics.store_failure();
                    tracing::warn!(session = %session.id, error = %e, "checkpoint failed");
                }
            }
        }
        written
    }

    /// Starts the checkpoint task (`--checkpoint-every-secs`); it stops when the registry
    /// is dropped.
    pub(super) fn spawn_checkpoints(&self) {
        let every = self.inner.config.checkpoint_every;
        if every.is_zero() {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                Registry { inner }.checkpoint(false).await;
            }
        });
    }
}

impl ManagerState {
    /// Remembers that session `id` ended, and why (410 from now on).
    pub(super) fn bury(&self, id: &str, reason: EndReason) {
        self.metrics.session_ended(&reason);
        lock(&self.tombstones).insert(id.to_owned(), reason);
    }

    /// Removes what the store keeps of session `id`, in the background.
    pub(super) fn forget_stored(&self, id: &str) {
        let (store, id) = (self.store.clone(), id.to_owned());
        tokio::spawn(async move {
            if let Err(e) = store.delete_session(&id).await {
                tracing::warn!(session = id, error = %e, "could not remove a session from the store");
            }
        });
    }
}

/// Since when `session` has been at rest, when it could be suspended now: a client's, held
/// by no request, with no other language's kernel beside it.
fn suspendable_since(session: &Session) -> Option<Instant> {
    let free = !session.held() && !session.is_warm() && session.companions().is_empty();
    session.idle_since().filter(|_| free)
}

/// Removes every folder in `dir` (a dead predecessor's sessions); how many.
fn clear_folder(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| std::fs::remove_dir_all(e.path()).is_ok())
        .count()
}
