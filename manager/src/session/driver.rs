//! The session's task: it owns the `Store`, runs the turns the handle sends one at a time,
//! keeps the rollback checkpoint, and puts a failed turn's state back. Where a turn runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arl_runtimes::{GuestError, Protocol, Report};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use wasmtime::Store;
use wasmtime_wasi::WasiCtxBuilder;

use super::handle::{Inbox, Job, Session, Start, Turn};
use super::history::{History, HistoryEntry};
use super::store::{Exports, SessionState, new_store, open_descriptors, preopen, restore_memory};
use super::types::{
    EndReason, Lifecycle, Limits, Outcome, Rollback, ended_error, floor_char_boundary,
    rolled_back_error,
};
use crate::egress::Door;
use crate::files::Workspace;
use crate::image::{GuestClock, Image, Pages};
use crate::metrics::{ExecutionOutcome, Metrics};
use crate::output::{Capture, Stream};
use crate::runtime::Runtime;
use crate::{Error, Result};

/// How long a session rests before it lets go of its rollback checkpoint (a copy of every
/// page it wrote), so that idle sessions cost what they did without rollback; the next turn
/// takes it again first.
const CHECKPOINT_IDLE: Duration = Duration::from_secs(1);

/// Everything `start` needs to make a session.
pub struct NewSession {
    pub id: String,
    pub runtime: Arc<Runtime>,
    pub limits: Limits,
    pub env: Vec<(String, String)>,
    /// The session's own folder: `workspace/`, `tmp/` and `uploads/` are made in it, removed
    /// at the end.
    pub dir: PathBuf,
    pub permit: OwnedSemaphorePermit,
    pub metrics: Arc<Metrics>,
    /// Where the guest's calls out of the sandbox go.
    pub door: Arc<Door>,
    /// Started ahead of demand, for no client yet (see [`Session::claim`]).
    pub warm: bool,
    /// The state to start from instead of a new interpreter (fork, restore, import).
    pub origin: Option<Origin>,
}

/// Where a session made from another's state comes from.
pub struct Origin {
    pub image: Arc<Image>,
    /// Draw new pseudo-random states on the first turn (a fork, not a restore).
    pub reseed: bool,
}

/// How to make the session's store and instance again: its first time, and after a rollback.
struct Recipe {
    runtime: Arc<Runtime>,
    env: Vec<(String, String)>,
    workspace: PathBuf,
    tmp: PathBuf,
    stdout: Capture,
    stderr: Capture,
    memory_bytes: u64,
    /// The largest report frame kept (from the session's output cap).
    report_limit: usize,
    door: Arc<Door>,
}

impl Recipe {
    /// A store with a new WASI context (the same preopens, in the same order) whose monotonic
    /// clock runs on from `clock`; nothing is instantiated in it yet.
    fn store(&self, clock: GuestClock) -> Result<Store<SessionState>> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(self.stdout.clone())
            .stderr(self.stderr.clone())
            .arg("/usr/local/bin/python.wasm")
            .envs(&self.env)
            .monotonic_clock(clock);
        preopen(&mut wasi, &self.runtime.mounts, &self.workspace, &self.tmp)?;
        let state = SessionState::new(
            wasi.build_p1(),
            self.memory_bytes,
            clock,
            self.report_limit,
            self.door.clone(),
        );
        Ok(new_store(self.runtime.pre.module().engine(), state))
    }

    /// Instantiates the runtime in `store`.
    async fn instantiate(&self, store: &mut Store<SessionState>) -> Result<Exports> {
        let instance = self
            .runtime
            .pre
            .instantiate_async(&mut *store)
            .await
            .map_err(Error::Instantiate)?;
        Exports::of(&instance, store)
    }
}

/// Instantiates the session and starts its task. `on_end` runs once, after the store is
/// dropped and the folder removed.
pub async fn start(
    new: NewSession,
    on_end: impl FnOnce(&Session, EndReason) + Send + 'static,
) -> Result<Arc<Session>> {
    let NewSession {
        id,
        runtime,
        limits,
        env,
        dir,
        permit,
        metrics,
        door,
        warm,
        origin,
    } = new;
    let workspace = dir.join("workspace");
    let tmp = dir.join("tmp");
    let uploads = dir.join("uploads");
    for d in [&workspace, &tmp, &uploads] {
        std::fs::create_dir_all(d)
            .map_err(|e| Error::Io(format!("creating {}", d.display()), e))?;
    }
    let files = Workspace::open(&workspace, &tmp, &uploads, limits.workspace_bytes)?;
    let (stdout, stderr) = (Capture::new(Stream::Stdout), Capture::new(Stream::Stderr));
    let (env, bootstrap) = match &origin {
        // The image's interpreter is past its bootstrap, with the environment it was given.
        Some(origin) => (origin.image.env.clone(), None),
        None => {
            let env: Vec<_> = runtime.base_env.iter().chain(&env).cloned().collect();
            let bootstrap = runtime.protocol.bootstrap(&env);
            (env, bootstrap)
        }
    };
    let recipe = Recipe {
        runtime: runtime.clone(),
        env,
        workspace,
        tmp,
        stdout: stdout.clone(),
        stderr: stderr.clone(),
        memory_bytes: limits.memory_bytes,
        report_limit: crate::runtime::frame_limit(limits.output_bytes),
        door: door.clone(),
    };
    let image = origin.as_ref().map(|o| o.image.as_ref());
    let clock = image.map_or_else(GuestClock::new, |i| GuestClock::continuing(i.clock_ns));
    let mut store = recipe.store(clock)?;
    let mut exports = recipe.instantiate(&mut store).await?;
    if image.is_some() {
        exports.initialize = None; // the image's interpreter is initialised already
    }

    let (session, inbox) = Session::new(Start {
        id,
        runtime: runtime.name.clone(),
        limits,
        workspace: files,
        dir: dir.clone(),
        warm,
        executions: image.map_or(0, |i| i.executions),
        history: image.map_or_else(History::default, |i| History::from_lines(&i.history)),
        memory_bytes: exports.memory.data_size(&store) as u64,
        door,
        suspend_after: Duration::ZERO,
    });
    // Brought up to date when the session is first at rest; an image's pages are a start
    // (shared, not copied).
    let checkpoint = limits.rollback.then(|| Checkpoint {
        pages: image.map(|i| i.pages.clone()).unwrap_or_default(),
        memory_bytes: 0,
        told: false,
    });
    let driver = Driver {
        session: session.clone(),
        writes: None,
        store,
        exports,
        protocol: runtime.protocol,
        bootstrap,
        stdout,
        stderr,
        metrics,
        recipe,
        checkpoint,
        descriptors: 0,
        reseed: origin.as_ref().is_some_and(|o| o.reseed),
        image: origin.map(|o| o.image),
    };
    let ended = session.clone();
    tokio::spawn(async move {
        let reason = driver.run(inbox).await;
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove a session folder");
        }
        drop(permit); // the pooled slot is free again only now, with the store gone
        on_end(&ended, reason);
        ended.finish();
    });
    Ok(session)
}

/// How one turn ended, before it is turned into an [`Outcome`].
enum TurnEnd {
    Returned,
    Ended(EndReason),
}

/// What a rollback goes back to: the written pages and size of the memory at rest.
struct Checkpoint {
    pages: Arc<Pages>,
    memory_bytes: u64,
    /// Every page written since `pages` was last brought up to date is in what the kernel
    /// tells [`Writes`]: the next sync copies only those.
    told: bool,
}

/// The kernel's note of the pages a session's memory was written at (`arl_writes`): what
/// keeps a checkpoint up to date at the cost of what a turn wrote. Dropped before the store
/// whose memory it tracks.
///
/// A protected page costs a write fault when it is next written; an unprotected one is listed
/// at every sync and compared with its copy. So pages that a session writes at every turn (its
/// stack, its allocator's heads, often with the same bytes) are left unprotected, and a page is
/// protected again once it has been listed unchanged for a while: the longer, the more often
/// it came back after being protected (up to [`Heat::MOST_PATIENCE`]).
struct Writes {
    tracked: arl_writes::Tracked<'static>,
    /// The pages listed at the last sync (kept for its allocation).
    pages: Vec<u32>,
    /// What is known of each page listed since tracking began.
    heat: std::collections::HashMap<u32, Heat>,
    /// Quiet pages waiting to be protected: gathered over syncs, so that each protection (a
    /// TLB flush on every core the process runs on) covers many.
    quiet: Vec<u32>,
}

/// Quiet pages gathered before they are protected in one go (until then each is compared at
/// every sync, as if it were still hot).
const QUIET_BATCH: usize = 64;

/// How a page has been written.
#[derive(Debug, Clone, Copy)]
struct Heat {
    /// Syncs in a row that found it unchanged, while unprotected.
    quiet: u16,
    /// How many such syncs before it is protected again.
    patience: u16,
    /// Protected at a sync: listed again only once written.
    protected: bool,
    /// Quiet long enough, waiting in [`Writes::quiet`] to be protected.
    pending: bool,
}

impl Heat {
    /// A page written for the first time: protected after two quiet syncs.
    const NEW: Heat = Heat {
        quiet: 0,
        patience: 2,
        protected: false,
        pending: false,
    };
    /// The most syncs a quiet page waits before it is protected: about what one write fault
    /// costs against one comparison of a page (a page rewritten with the same bytes at every
    /// turn looks quiet, and costs a fault each time it is protected).
    const MOST_PATIENCE: u16 = 16;
}

impl Writes {
    /// Tracks `memory`'s writes from now, or `None` where the kernel keeps no such note (the
    /// manager says which at start): the checkpoint then finds written pages by comparing.
    fn track(memory: &wasmtime::Memory, store: &Store<SessionState>) -> Option<Self> {
        let tracker = arl_writes::Tracker::get().ok()?;
        let start = memory.data_ptr(store) as usize;
        match tracker.track(start, memory.data_size(store)) {
            Ok(tracked) => Some(Self {
                tracked,
                pages: Vec::new(),
                heat: std::collections::HashMap::new(),
                quiet: Vec::new(),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "tracking a session's writes failed: its checkpoints compare");
                None
            }
        }
    }

    /// Protects every page written so far: what a whole comparison has just copied.
    fn protect_all(&mut self) -> std::io::Result<()> {
        self.heat.clear();
        self.quiet.clear();
        self.tracked.take_written(&mut self.pages)
    }

    /// Brings `pages` up to date with `memory` (which may have grown) from what the kernel
    /// lists, and protects the listed pages that have gone quiet.
    fn sync(&mut self, pages: &mut Arc<Pages>, memory: &[u8]) -> std::io::Result<()> {
        self.tracked.grow_to(memory.len())?;
        self.tracked.written(&mut self.pages)?;
        let unchanged = Pages::sync_listed(pages, memory, &self.pages);
        let mut unchanged = unchanged.iter().peekable();
        for &page in &self.pages {
            let same = unchanged.next_if_eq(&&page).is_some();
            let heat = self.heat.entry(page).or_insert(Heat::NEW);
            if heat.protected {
                // Written since it was protected: it runs hot, so wait longer next time.
                heat.protected = false;
                heat.quiet = 0;
                heat.patience = heat.patience.saturating_mul(4).min(Heat::MOST_PATIENCE);
            } else if !same {
                heat.quiet = 0;
                heat.pending = false; // written again while it waited: not quiet after all
            } else if !heat.pending {
                heat.quiet += 1;
                if heat.quiet >= heat.patience {
                    heat.pending = true;
                    self.quiet.push(page);
                }
            }
        }
        if self.quiet.len() >= QUIET_BATCH {
            let heat = &mut self.heat;
            self.quiet.retain(|page| {
                heat.get_mut(page).is_some_and(|h| {
                    let quiet = std::mem::take(&mut h.pending);
                    h.protected = quiet;
                    h.quiet = 0;
                    quiet
                })
            });
            self.quiet.sort_unstable();
            self.tracked.protect(&self.quiet)?;
            self.quiet.clear();
        }
        Ok(())
    }
}

/// The session's task: owns the store, runs turns one at a time.
struct Driver {
    session: Arc<Session>,
    /// Which pages of the store's memory were written (declared before `store`: dropped first).
    writes: Option<Writes>,
    store: Store<SessionState>,
    exports: Exports,
    protocol: Protocol,
    /// The first turn, which prepares the session; taken when it runs.
    bootstrap: Option<String>,
    stdout: Capture,
    stderr: Capture,
    metrics: Arc<Metrics>,
    recipe: Recipe,
    /// The memory as the last turn left it, when turns are rolled back.
    checkpoint: Option<Checkpoint>,
    /// Descriptors open at rest (the preopens): more means the guest holds files open.
    descriptors: usize,
    /// The next turn reseeds the guest's pseudo-random states first.
    reseed: bool,
    /// The state to put into the instance before its first turn (fork, restore, import):
    /// as a new session's bootstrap, after its create has answered.
    image: Option<Arc<Image>>,
}

impl Driver {
    async fn run(mut self, inbox: Inbox) -> EndReason {
        let Inbox {
            jobs: mut queue,
            stop: mut stopped,
        } = inbox;
        let reason = self.serve(&mut queue, &mut stopped).await;
        self.advance(Lifecycle::Ended(reason.clone()));
        queue.close();
        // Turns still queued learn that the session ended: their reply is dropped.
        while queue.try_recv().is_ok() {}
        reason
    }

    async fn serve(
        &mut self,
        queue: &mut mpsc::Receiver<Job>,
        stopped: &mut watch::Receiver<Option<EndReason>>,
    ) -> EndReason {
        if let Some(image) = self.image.take() {
            let memory = self.exports.memory;
            let store = &mut self.store;
            let put = blocking_in_place(|| {
                restore_memory(store, &memory, image.memory_bytes, &image.pages)
            });
            if let Err(e) = put {
                return EndReason::Trap(format!("restoring the session's state: {e}"));
            }
            self.session.stats().memory_bytes = image.memory_bytes;
        }
        if let Some(init) = self.exports.initialize.take() {
            let deadline = self.session.limits.timeout;
            let run = tokio::time::timeout(deadline, init.call_async(&mut self.store, ()));
            match run.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return classify(&e),
                Err(_) => return EndReason::Deadline,
            }
        }
        if let Some(code) = self.bootstrap.take() {
            let deadline = self.session.limits.timeout.max(Duration::from_secs(30));
            self.stderr.reset(self.session.limits.output_bytes, None);
            let never = std::future::pending();
            let (end, _) = self.turn(code.as_bytes(), deadline, stopped, never).await;
            let (stderr, _) = self.stderr.take();
            if let TurnEnd::Ended(reason) = end {
                if !matches!(reason, EndReason::Deleted | EndReason::Shutdown) {
                    let stderr = String::from_utf8_lossy(&stderr);
                    tracing::warn!(session = %self.session.id, %reason, %stderr, "bootstrap failed");
                }
                return reason;
            }
            if !stderr.is_empty() {
                let what = String::from_utf8_lossy(&stderr).trim().to_owned();
                return EndReason::Trap(format!("the runtime failed to start: {what}"));
            }
        }
        self.descriptors = open_descriptors(&mut self.store);
        self.sync_checkpoint();
        self.advance(Lifecycle::Idle);
        loop {
            let job = tokio::select! {
                job = queue.recv() => job,
                reason = stop_reason(stopped) => return reason,
                () = tokio::time::sleep(CHECKPOINT_IDLE), if self.checkpoint.is_some() => {
                    // Idle: the checkpoint would only double what the session holds.
                    self.checkpoint = None;
                    continue;
                }
            };
            let mut job = match job {
                None => return EndReason::Deleted, // every handle is gone
                Some(Job::Capture(reply)) => {
                    let _ = reply.send(self.capture());
                    continue;
                }
                Some(Job::Turn(turn)) => turn,
            };
            if !self.session.rolls_back() {
                self.checkpoint = None;
                self.writes = None; // nothing to keep up to date: no write faults either
            } else if self.checkpoint.is_none() {
                self.checkpoint = Some(Checkpoint {
                    pages: Arc::default(),
                    memory_bytes: 0,
                    told: false,
                });
                self.sync_checkpoint();
            }
            if job.reply.is_closed() {
                continue; // its caller left while it waited: nothing ran
            }
            let started_at = SystemTime::now();
            let n = self.session.stats().executions + 1;
            let mut outcome = self.execute(&mut job, stopped).await;
            if let Some(rollback) = outcome.rolled_back.clone()
                && let Err(e) = self.roll_back().await
            {
                tracing::warn!(session = %self.session.id, error = %e, "rolling back failed");
                let reason = match &rollback {
                    Rollback::Deadline => EndReason::Deadline,
                    Rollback::Trap(what) => EndReason::Trap(what.clone()),
                    Rollback::Cancelled => EndReason::Cancelled,
                    Rollback::Memory => EndReason::Trap("out of memory".into()),
                    Rollback::Disk(quota) => EndReason::Disk(*quota),
                };
                outcome.rolled_back = None;
                outcome.error = Some(GuestError {
                    kind: "SessionEnded".into(),
                    message: format!(
                        "the execution failed ({rollback}) and rolling it back failed ({e}); \
                         the session has ended"
                    ),
                    traceback: String::new(),
                });
                outcome.ended = Some(reason);
            }
            if matches!(outcome.rolled_back, Some(Rollback::Disk(_)))
                && let Err(e) = self.session.workspace.clear_tmp()
            {
                tracing::warn!(session = %self.session.id, error = %e, "emptying /tmp failed");
            }
            let ended = outcome.ended.clone();
            let counted = !self.session.is_warm(); // a warm-up turn is no client's
            counted.then(|| {
                self.metrics.execution(
                    match (&ended, &outcome.error) {
                        _ if matches!(outcome.rolled_back, Some(Rollback::Cancelled)) => {
                            ExecutionOutcome::Cancelled
                        }
                        _ if outcome.rolled_back.is_some() => ExecutionOutcome::RolledBack,
                        (Some(EndReason::Cancelled), _) => ExecutionOutcome::Cancelled,
                        (Some(_), _) => ExecutionOutcome::Ended,
                        (None, Some(_)) => ExecutionOutcome::Error,
                        (None, None) => ExecutionOutcome::Ok,
                    },
                    outcome.duration,
                )
            });
            if counted {
                let entry = HistoryEntry::of(n, started_at, &job.code, &outcome);
                self.session.record(&entry);
            }
            let _ = job.reply.send(outcome);
            if let Some(reason) = ended {
                return reason;
            }
            // After the reply, before the next turn: what a rollback would go back to.
            self.sync_checkpoint();
        }
    }

    /// Brings the rollback checkpoint up to date with the memory at rest: from what the kernel
    /// lists as written where it keeps a note, else by comparing every page.
    ///
    /// A new checkpoint (and a new instance: a session's first, or a rollback's) is compared
    /// whole, and only then is its memory tracked, with every page it wrote protected: the
    /// bootstrap's reads of the image are not slowed by tracking (the kernel maps a tracked
    /// file's pages one fault at a time, not sixteen).
    fn sync_checkpoint(&mut self) {
        let Some(checkpoint) = &mut self.checkpoint else {
            return;
        };
        let memory = self.exports.memory.data(&self.store);
        let synced = match &mut self.writes {
            Some(writes) if checkpoint.told => Some(writes.sync(&mut checkpoint.pages, memory)),
            _ => None,
        };
        match synced {
            Some(Ok(())) => {}
            None => {
                Pages::sync(&mut checkpoint.pages, memory);
                if self.writes.is_none() {
                    self.writes = Writes::track(&self.exports.memory, &self.store);
                }
                if let Some(writes) = &mut self.writes
                    && let Err(e) = writes.protect_all()
                {
                    tracing::warn!(session = %self.session.id, error = %e, "tracking a session's writes failed: its checkpoints compare");
                    self.writes = None;
                }
            }
            Some(Err(e)) => {
                tracing::warn!(session = %self.session.id, error = %e, "reading a session's writes failed: its checkpoints compare");
                self.writes = None;
                Pages::sync(&mut checkpoint.pages, memory);
            }
        }
        checkpoint.told = self.writes.is_some();
        checkpoint.memory_bytes = memory.len() as u64;
    }

    /// Puts the checkpoint into a fresh instance in place of the current one, whose state a
    /// failed turn left unknown. Its clock runs on.
    async fn roll_back(&mut self) -> Result<()> {
        let Some(checkpoint) = &self.checkpoint else {
            return Err(Error::InvalidRequest(
                "this session does not roll back".into(),
            ));
        };
        let clock = GuestClock::continuing(self.store.data().clock_ns());
        // The old store goes first (its memory's tracking before it): the pooled slot it
        // holds is this session's.
        self.writes = None;
        self.store = self.recipe.store(clock)?;
        let mut exports = self.recipe.instantiate(&mut self.store).await?;
        restore_memory(
            &mut self.store,
            &exports.memory,
            checkpoint.memory_bytes,
            &checkpoint.pages,
        )?;
        exports.initialize = None;
        self.exports = exports;
        self.session.stats().memory_bytes = checkpoint.memory_bytes;
        Ok(())
    }

    /// The session's state, at rest.
    fn capture(&mut self) -> Result<Image> {
        let open = open_descriptors(&mut self.store);
        if open > self.descriptors {
            return Err(Error::Refused(format!(
                "the guest holds {} file(s) open; close them (or end the `with` block) and \
                 try again: open files cannot be carried into another instance",
                open - self.descriptors
            )));
        }
        let memory = self.exports.memory.data(&self.store);
        let pages = match &self.checkpoint {
            Some(checkpoint) => checkpoint.pages.clone(), // in step with the memory at rest
            None => Arc::new(Pages::capture(memory)),
        };
        let stats = self.session.stats();
        let (history, _) = self.session.history();
        Ok(Image {
            runtime: self.recipe.runtime.name.clone(),
            module: self.recipe.runtime.digest.clone(),
            memory_bytes: memory.len() as u64,
            pages,
            clock_ns: self.store.data().clock_ns(),
            executions: stats.executions,
            env: self.recipe.env.clone(),
            limits: self.session.limits,
            history,
            files: vec![],
            source: self.session.id.clone(),
            captured_at: SystemTime::now(),
        })
    }

    fn advance(&self, next: Lifecycle) {
        self.session.stats().state.advance(next);
    }

    async fn execute(
        &mut self,
        job: &mut Turn,
        stopped: &mut watch::Receiver<Option<EndReason>>,
    ) -> Outcome {
        let n = {
            let mut stats = self.session.stats();
            stats.state.advance(Lifecycle::Running);
            stats.executions += 1;
            stats.executions
        };
        let limits = self.session.limits;
        let lifetime_left = self.session.time_left();
        let capped = job.timeout >= lifetime_left;
        let deadline = job.timeout.min(lifetime_left);
        let input = self.protocol.encode_turn(
            &job.code,
            n,
            limits.output_bytes,
            std::mem::take(&mut self.reseed),
            job.context.as_ref(),
        );
        self.store.data_mut().clear_refusal();
        self.stdout.reset(limits.output_bytes, job.sink.clone());
        self.stderr.reset(limits.output_bytes, job.sink.take());
        let started = Instant::now();
        let (end, report) = self
            .turn(&input, deadline, stopped, job.reply.closed())
            .await;
        let duration = started.elapsed();
        let requests = self.recipe.door.take_records();
        let (stdout, out_cut) = self.stdout.take();
        let (stderr, err_cut) = self.stderr.take();
        let report = report.as_deref().and_then(Report::parse);
        let refused = self.store.data_mut().report_refused.take();
        let mut ended = match end {
            TurnEnd::Ended(EndReason::Deadline) if capped => Some(EndReason::Lifetime),
            TurnEnd::Ended(reason) => Some(reason),
            TurnEnd::Returned if self.past_quota() => Some(EndReason::Disk(limits.workspace_bytes)),
            TurnEnd::Returned => None,
        };
        let (mut result, mut error, mut clipped) = (None, None, false);
        let mut results = Vec::new();
        match (report, self.protocol) {
            (Some(_), _) if matches!(ended, Some(EndReason::Disk(_))) => {}
            (Some(report), _) => {
                result = report.result;
                error = report.error;
                clipped = report.clipped;
                results = report.results;
                if let Some(code) = report.exit {
                    ended.get_or_insert(EndReason::Exit(code));
                }
            }
            (None, _) if ended.is_none() && refused.is_some() => {
                error = Some(GuestError {
                    kind: "ReportTooLarge".into(),
                    message: format!(
                        "the turn's result and error came to {} bytes, past the {} this \
                         session keeps (four times its output cap): they were dropped",
                        refused.unwrap_or_default(),
                        self.recipe.report_limit
                    ),
                    traceback: String::new(),
                });
            }
            (None, Protocol::Python) if ended.is_none() => {
                error = Some(GuestError {
                    kind: "DriverLost".into(),
                    message: "the turn did not report: the session's `_arl` driver was removed \
                              or replaced by the code"
                        .into(),
                    traceback: String::new(),
                });
            }
            (None, _) => {}
        }
        let refused_memory = self.store.data().memory_refused();
        let mut rolled_back = None;
        if self.checkpoint.is_some() {
            rolled_back = match &ended {
                Some(reason) => reason.rollback(),
                None if refused_memory
                    && error.as_ref().is_some_and(|e| e.kind == "MemoryError") =>
                {
                    Some(Rollback::Memory)
                }
                None => None,
            };
            if rolled_back.is_some() {
                ended = None;
            }
        }
        let mut truncated = out_cut || err_cut || clipped || refused.is_some();
        let cap = limits.output_bytes;
        let fields = result.iter_mut().chain(
            error
                .iter_mut()
                .flat_map(|e| [&mut e.kind, &mut e.message, &mut e.traceback]),
        );
        for text in fields.filter(|t| t.len() > cap) {
            text.truncate(floor_char_boundary(text, cap));
            truncated = true;
        }
        if let Some(reason) = &ended {
            error.get_or_insert_with(|| ended_error(reason, deadline));
        }
        if let Some(rollback) = &rolled_back {
            let guest_error = error.take();
            error = Some(rolled_back_error(rollback, deadline, guest_error));
        }
        {
            let mut stats = self.session.stats();
            stats.last_used = Instant::now();
            stats.last_used_at = SystemTime::now();
            stats.memory_bytes = self.exports.memory.data_size(&self.store) as u64;
            stats.state.advance(Lifecycle::Idle);
        }
        Outcome {
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            result,
            error,
            duration,
            truncated,
            ended,
            rolled_back,
            results,
            requests,
        }
    }

    /// Calls `turn` with `input`, bounded by `deadline`, by the session's stop signal and by
    /// `cancelled` (the caller going away).
    async fn turn(
        &mut self,
        input: &[u8],
        deadline: Duration,
        stopped: &mut watch::Receiver<Option<EndReason>>,
        cancelled: impl std::future::Future<Output = ()>,
    ) -> (TurnEnd, Option<Vec<u8>>) {
        self.store.data_mut().report = None;
        self.store.data_mut().report_refused = None;
        let (store, exports) = (&mut self.store, &self.exports);
        let call = async {
            let len = i32::try_from(input.len())
                .map_err(|_| wasmtime::format_err!("turn input over 2 GiB"))?;
            let mut ptr = exports.host_alloc.call_async(&mut *store, len).await?;
            let fits = (ptr as u32 as usize)
                .checked_add(input.len())
                .is_some_and(|end| ptr != 0 && end <= exports.memory.data_size(&*store));
            if fits {
                exports
                    .memory
                    .write(&mut *store, ptr as u32 as usize, input)?;
            } else {
                ptr = 0; // the guest raises MemoryError for the turn
            }
            exports.turn.call_async(&mut *store, (ptr, len)).await
        };
        let end = tokio::select! {
            done = tokio::time::timeout(deadline, call) => match done {
                Ok(Ok(_status)) => TurnEnd::Returned,
                Ok(Err(e)) => TurnEnd::Ended(classify(&e)),
                Err(_) => TurnEnd::Ended(EndReason::Deadline),
            },
            reason = stop_reason(stopped) => TurnEnd::Ended(reason),
            () = cancelled => TurnEnd::Ended(EndReason::Cancelled),
            quota = filled(self.session.workspace.clone()) => TurnEnd::Ended(EndReason::Disk(quota)),
        };
        (end, self.store.data_mut().report.take())
    }

    /// Counts the session's files after a turn: whether the guest wrote them past the quota.
    /// A count that fails (the host out of descriptors) lets the turn stand.
    fn past_quota(&self) -> bool {
        let workspace = &self.session.workspace;
        workspace
            .recount()
            .is_ok_and(|used| used > workspace.quota())
    }
}

/// How often the files of a running turn are counted against the session's quota: what a
/// guest can write past it is what it writes in this long.
const DISK_CHECK: Duration = Duration::from_millis(100);

/// Resolves (with the quota) when a count finds `workspace`'s files past their quota.
async fn filled(workspace: Arc<Workspace>) -> u64 {
    loop {
        tokio::time::sleep(DISK_CHECK).await;
        let counted = workspace.clone();
        let used = tokio::task::spawn_blocking(move || counted.recount()).await;
        if let Ok(Ok(used)) = used
            && used > workspace.quota()
        {
            return workspace.quota();
        }
    }
}

/// Runs `f`, milliseconds of copying at worst, without holding up the other tasks of this
/// worker thread (the answer to the request that led here among them): on the multi-thread
/// runtime they move to another worker meanwhile.
fn blocking_in_place<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Waits until the session is told to end, and why.
async fn stop_reason(stopped: &mut watch::Receiver<Option<EndReason>>) -> EndReason {
    match stopped.wait_for(Option::is_some).await {
        Ok(reason) => reason.clone().unwrap_or(EndReason::Deleted),
        Err(_) => EndReason::Deleted,
    }
}

fn classify(e: &wasmtime::Error) -> EndReason {
    if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return EndReason::Exit(i64::from(exit.0));
    }
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        return EndReason::Trap(
            trap.to_string()
                .trim_start_matches("wasm trap: ")
                .to_owned(),
        );
    }
    EndReason::Trap(e.to_string().lines().next().unwrap_or("trap").to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_and_traps_are_told_apart() {
        let exit = wasmtime::Error::new(wasmtime_wasi::I32Exit(4));
        assert_eq!(classify(&exit), EndReason::Exit(4));
        let trap = wasmtime::Error::new(wasmtime::Trap::UnreachableCodeReached);
        assert!(matches!(classify(&trap), EndReason::Trap(t) if t.contains("unreachable")));
    }
}
