//! One session: a `Store` with one instance of a runtime, owned by one task that runs its
//! turns in order.
//!
//! A turn that traps, runs past its deadline, is cut short by its caller going away, or
//! blows the memory limit is rolled back: the task drops the instance and puts the state it
//! had before the turn (kept as a [`Pages`] checkpoint, brought up to date after each turn,
//! off the reply's path) into a fresh one, and the session carries on. A session created with
//! `rollback: false` ends instead, as an `exit()` always does.

use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use arl_runtimes::{GuestError, Protocol, Report};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot, watch};
use wasmtime::{Memory, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder, TypedFunc};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, HostMonotonicClock, WasiCtxBuilder, WasiView};

use crate::files::Workspace;
use crate::metrics::{ExecutionOutcome, Metrics};
use crate::output::{Capture, Chunk, Sink, Stream};
use crate::runtime::Runtime;
use crate::state::{GuestClock, Image, Pages};
use crate::{Error, Result};

/// Turns that may wait behind a running one before an execute is refused as busy.
pub const QUEUE_DEPTH: usize = 16;

/// How long a session rests before it lets go of its rollback checkpoint (a copy of every
/// page it wrote), so that idle sessions cost what they did without rollback; the next turn
/// takes it again first.
const CHECKPOINT_IDLE: Duration = Duration::from_secs(1);

/// Bytes of history a session keeps; the oldest turns go first.
pub const HISTORY_BYTES: usize = 1 << 20;
/// Bytes of each of a turn's code, stdout, stderr and result that its history entry keeps.
const HISTORY_FIELD_BYTES: usize = 16 << 10;

/// What a store holds besides the instance.
pub struct SessionState {
    pub(crate) wasi: WasiP1Ctx,
    limiter: Limiter,
    /// The last frame the guest sent through the door this turn.
    pub(crate) report: Option<Vec<u8>>,
    clock: GuestClock,
}

/// The store's limits, noting when the guest was refused memory.
struct Limiter {
    limits: StoreLimits,
    refused: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        self.refused |= !allowed;
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// The bounds of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock time for one execution, blocking calls included.
    pub timeout: Duration,
    /// Linear memory the guest may grow to.
    pub memory_bytes: u64,
    /// Bytes kept per stream per execution.
    pub output_bytes: usize,
    /// A session unused this long is ended.
    pub idle_ttl: Duration,
    /// A session this old is ended, even mid-turn.
    pub lifetime: Duration,
    /// Bytes that uploads may fill the workspace with.
    pub workspace_bytes: u64,
    /// Roll a failed turn back (`true`) or end the session (`false`).
    pub rollback: bool,
}

/// Why a turn was rolled back. Its `Display` is the reason clients see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rollback {
    /// It ran past its deadline.
    Deadline,
    /// The guest trapped; wasmtime's words.
    Trap(String),
    /// It raised `MemoryError` after being refused memory at the session's limit.
    Memory,
    /// Its caller went away mid-turn.
    Cancelled,
}

impl Rollback {
    /// The stable one-word code.
    pub fn code(&self) -> &'static str {
        match self {
            Rollback::Deadline => "deadline",
            Rollback::Trap(_) => "trap",
            Rollback::Memory => "memory",
            Rollback::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for Rollback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rollback::Trap(what) => write!(f, "trap: {what}"),
            other => f.write_str(other.code()),
        }
    }
}

/// Why a session ended. Its `Display` is the reason clients see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// A turn ran past its deadline.
    Deadline,
    /// The guest called `exit()` (or `sys.exit`, `os._exit`).
    Exit(i64),
    /// The guest trapped; wasmtime's words.
    Trap(String),
    /// Unused for longer than its idle TTL.
    Idle,
    /// Older than its lifetime.
    Lifetime,
    /// Deleted by a client.
    Deleted,
    /// Ended, idle, to relieve memory pressure on the node.
    Evicted,
    /// The manager is shutting down.
    Shutdown,
    /// The caller went away mid-turn, so the turn was stopped.
    Cancelled,
}

impl EndReason {
    /// The stable one-word code for the reason (`"trap"` for every trap).
    pub fn code(&self) -> &'static str {
        match self {
            EndReason::Deadline => "deadline",
            EndReason::Exit(_) => "exit",
            EndReason::Trap(_) => "trap",
            EndReason::Idle => "idle",
            EndReason::Lifetime => "lifetime",
            EndReason::Deleted => "deleted",
            EndReason::Evicted => "evicted",
            EndReason::Shutdown => "shutdown",
            EndReason::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::Trap(what) => write!(f, "trap: {what}"),
            other => f.write_str(other.code()),
        }
    }
}

/// Where a session is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Instantiated; the runtime's bootstrap turn has not finished.
    Starting,
    /// At rest between turns.
    Idle,
    /// A turn is running.
    Running,
    /// Ended; no turn will run again.
    Ended(EndReason),
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Idle => "idle",
            Phase::Running => "running",
            Phase::Ended(_) => "ended",
        }
    }
}

/// What one execution produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    /// The repr of the final expression, when there is one and it is not `None`.
    pub result: Option<String>,
    /// The exception the code raised and did not catch; the session lives on.
    pub error: Option<GuestError>,
    pub duration: Duration,
    /// Some output (or the result) passed the cap and was cut.
    pub truncated: bool,
    /// The turn ended the session, and why.
    pub ended: Option<EndReason>,
    /// The turn's effects on the interpreter were undone, and why; the session goes on.
    pub rolled_back: Option<Rollback>,
}

/// A snapshot of a session's bookkeeping.
#[derive(Debug, Clone)]
pub struct Info {
    pub id: String,
    pub runtime: String,
    pub phase: Phase,
    pub created_at: SystemTime,
    pub last_used_at: SystemTime,
    pub executions: u64,
    pub memory_bytes: u64,
    pub limits: Limits,
}

struct Stats {
    created_at: SystemTime,
    created: Instant,
    phase: Phase,
    last_used_at: SystemTime,
    last_used: Instant,
    executions: u64,
    memory_bytes: u64,
}

struct Turn {
    code: String,
    timeout: Duration,
    sink: Option<Sink>,
    reply: oneshot::Sender<Outcome>,
}

/// What the session's task is asked to do, in order.
enum Job {
    Turn(Turn),
    /// Take the state out, at rest between turns.
    Capture(oneshot::Sender<Result<Image>>),
}

/// A session's trajectory: one JSON line per client turn, within [`HISTORY_BYTES`].
#[derive(Debug, Default, Clone)]
struct History {
    lines: VecDeque<Arc<str>>,
    bytes: usize,
    /// Turns forgotten to stay within the bound.
    dropped: u64,
}

impl History {
    fn push(&mut self, line: Arc<str>) {
        self.bytes += line.len() + 1;
        self.lines.push_back(line);
        while self.bytes > HISTORY_BYTES
            && let Some(old) = self.lines.pop_front()
        {
            self.bytes -= old.len() + 1;
            self.dropped += 1;
        }
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
}

fn clip(s: &str, clipped: &mut bool) -> String {
    if s.len() <= HISTORY_FIELD_BYTES {
        return s.to_owned();
    }
    *clipped = true;
    s[..floor_char_boundary(s, HISTORY_FIELD_BYTES)].to_owned()
}

/// The handle every caller holds; the store itself lives in the session's task.
pub struct Session {
    pub id: String,
    pub runtime: String,
    pub limits: Limits,
    /// Waiting in the warm pool, not yet any client's.
    warm: std::sync::atomic::AtomicBool,
    /// The files under the guest's `/workspace`.
    pub workspace: Workspace,
    jobs: mpsc::Sender<Job>,
    stop: watch::Sender<Option<EndReason>>,
    stats: Mutex<Stats>,
    history: Mutex<History>,
    /// The session's own folder (`workspace/`, `tmp/`).
    pub dir: PathBuf,
}

impl Session {
    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn info(&self) -> Info {
        let stats = self.stats();
        Info {
            id: self.id.clone(),
            runtime: self.runtime.clone(),
            phase: stats.phase.clone(),
            created_at: stats.created_at,
            last_used_at: stats.last_used_at,
            executions: stats.executions,
            memory_bytes: stats.memory_bytes,
            limits: self.limits,
        }
    }

    /// Whether the session waits in the warm pool, no client's yet.
    pub fn is_warm(&self) -> bool {
        self.warm.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The guest's linear memory after its last turn.
    pub fn memory_bytes(&self) -> u64 {
        self.stats().memory_bytes
    }

    /// When the session was handed to its client.
    pub fn created_at(&self) -> SystemTime {
        self.stats().created_at
    }

    /// Hands a warm session (started ahead, its first turn already run) to a client: its
    /// clocks and counters start now, as if it had just been created.
    pub fn claim(&self) {
        self.warm.store(false, std::sync::atomic::Ordering::SeqCst);
        let mut stats = self.stats();
        let (now, at) = (Instant::now(), SystemTime::now());
        stats.created = now;
        stats.created_at = at;
        stats.last_used = now;
        stats.last_used_at = at;
        stats.executions = 0;
    }

    /// The reason the session ended, if it has.
    pub fn ended(&self) -> Option<EndReason> {
        match &self.stats().phase {
            Phase::Ended(reason) => Some(reason.clone()),
            _ => None,
        }
    }

    /// Since when the session has been at rest between turns; `None` while a turn runs.
    pub fn idle_since(&self) -> Option<Instant> {
        let stats = self.stats();
        matches!(stats.phase, Phase::Idle).then_some(stats.last_used)
    }

    /// When the session's idle TTL or lifetime has passed at `now`, the reason.
    pub fn expired(&self, now: Instant) -> Option<EndReason> {
        let stats = self.stats();
        if now.duration_since(stats.created) >= self.limits.lifetime {
            return Some(EndReason::Lifetime);
        }
        let idle = matches!(stats.phase, Phase::Idle | Phase::Starting);
        (idle && now.duration_since(stats.last_used) >= self.limits.idle_ttl)
            .then_some(EndReason::Idle)
    }

    /// Runs `code` as the next turn, after the turns already queued. `timeout` overrides the
    /// session's deadline for this turn; `sink` receives output as the guest writes it.
    ///
    /// Dropping the returned future stops the turn (or skips it while queued): a turn cut
    /// short leaves the interpreter in no known state, so it is rolled back as after a
    /// deadline (or, with `rollback: false`, ends the session).
    pub async fn execute(
        &self,
        code: String,
        timeout: Option<Duration>,
        sink: Option<Sink>,
    ) -> Result<Outcome> {
        if let Some(reason) = self.ended() {
            return Err(Error::Ended(reason));
        }
        let (reply, answer) = oneshot::channel();
        self.send(Job::Turn(Turn {
            code,
            timeout: timeout.unwrap_or(self.limits.timeout),
            sink,
            reply,
        }))?;
        answer.await.map_err(|_| self.gone())
    }

    /// The session's state after the turns queued before this call: what fork, snapshot and
    /// export are made of. Refused (`Error::Refused`) while the guest holds files open.
    pub async fn capture(&self) -> Result<Image> {
        if let Some(reason) = self.ended() {
            return Err(Error::Ended(reason));
        }
        let (reply, answer) = oneshot::channel();
        self.send(Job::Capture(reply))?;
        answer.await.map_err(|_| self.gone())?
    }

    fn send(&self, job: Job) -> Result<()> {
        self.jobs.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Busy(QUEUE_DEPTH),
            mpsc::error::TrySendError::Closed(_) => self.gone(),
        })
    }

    /// The session's trajectory as JSON Lines, oldest turn first, and how many older turns
    /// were forgotten to keep it within [`HISTORY_BYTES`].
    pub fn history(&self) -> (Vec<Arc<str>>, u64) {
        let history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        (history.lines.iter().cloned().collect(), history.dropped)
    }

    fn record(&self, n: u64, started_at: SystemTime, code: &str, outcome: &Outcome) {
        let mut clipped = false;
        let entry = HistoryEntry {
            n,
            started_at: crate::rfc3339(started_at),
            code: clip(code, &mut clipped),
            stdout: clip(&outcome.stdout, &mut clipped),
            stderr: clip(&outcome.stderr, &mut clipped),
            result: outcome.result.as_deref().map(|r| clip(r, &mut clipped)),
            error: outcome.error.clone(),
            duration_ms: outcome.duration.as_secs_f64() * 1e3,
            rolled_back: outcome.rolled_back.is_some(),
            rollback_reason: outcome.rolled_back.as_ref().map(ToString::to_string),
            end_reason: outcome.ended.as_ref().map(ToString::to_string),
            clipped,
        };
        if let Ok(line) = serde_json::to_string(&entry) {
            self.history
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(line.into());
        }
    }

    /// Like [`execute`](Self::execute), as a stream: the output as the guest writes it, then
    /// the outcome. Dropping the stream stops the turn.
    pub fn execute_streaming(
        self: Arc<Self>,
        code: String,
        timeout: Option<Duration>,
    ) -> TurnStream {
        let (sink, output) = mpsc::unbounded_channel();
        let turn = Box::pin(async move { self.execute(code, timeout, Some(sink)).await });
        TurnStream {
            output,
            turn: Some(turn),
            outcome: None,
        }
    }

    fn gone(&self) -> Error {
        Error::Ended(self.ended().unwrap_or(EndReason::Deleted))
    }

    /// Ends the session: a running turn is stopped, the store dropped, the workspace removed.
    pub fn end(&self, reason: EndReason) {
        self.stop.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(reason);
            true
        });
    }
}

/// What a streamed turn yields.
#[derive(Debug)]
pub enum TurnEvent {
    /// Output, in the order the guest wrote it.
    Output(Chunk),
    /// The outcome, last.
    Done(Result<Outcome>),
}

/// A turn as a stream of [`TurnEvent`]s; see [`Session::execute_streaming`].
pub struct TurnStream {
    output: mpsc::UnboundedReceiver<Chunk>,
    turn: Option<Pin<Box<dyn Future<Output = Result<Outcome>> + Send>>>,
    outcome: Option<Result<Outcome>>,
}

impl futures_util::Stream for TurnStream {
    type Item = TurnEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TurnEvent>> {
        let this = &mut *self;
        if let Some(turn) = &mut this.turn {
            if let Poll::Ready(Some(chunk)) = this.output.poll_recv(cx) {
                return Poll::Ready(Some(TurnEvent::Output(chunk)));
            }
            match turn.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(outcome) => {
                    this.turn = None;
                    this.outcome = Some(outcome);
                }
            }
        }
        // The turn is over: what is left of its output, then its outcome.
        if let Ok(chunk) = this.output.try_recv() {
            return Poll::Ready(Some(TurnEvent::Output(chunk)));
        }
        Poll::Ready(this.outcome.take().map(TurnEvent::Done))
    }
}

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
    /// Started ahead of demand, for no client yet (see [`Session::claim`]).
    pub warm: bool,
    /// The state to start from instead of a new interpreter (fork, restore, import).
    pub from: Option<From>,
}

/// Where a session made from another's state comes from.
pub struct From {
    pub image: Arc<Image>,
    /// Draw new pseudo-random states on the first turn (a fork, not a restore).
    pub reseed: bool,
}

/// Gives a guest its folders: the runtime's read-only mounts, then its own `/workspace` and
/// `/tmp`. ARL's snapshot is made with the same call, because wasi-libc keeps the table of
/// preopens it saw in linear memory: a session must open the same ones in the same order.
pub(crate) fn preopen(
    wasi: &mut WasiCtxBuilder,
    mounts: &[arl_runtimes::Mount],
    workspace: &std::path::Path,
    tmp: &std::path::Path,
) -> Result<()> {
    let mounts = mounts
        .iter()
        .map(|m| (m.host.as_path(), m.guest.as_str(), FsPerms::ReadOnly));
    let own = [
        (workspace, "/workspace", FsPerms::ReadWrite),
        (tmp, "/tmp", FsPerms::ReadWrite),
    ];
    for (host, guest, perms) in mounts.chain(own) {
        wasi.preopened_dir(host, guest, perms).map_err(|e| {
            Error::Io(
                format!("opening {}", host.display()),
                std::io::Error::other(e.to_string()),
            )
        })?;
    }
    Ok(())
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
        let state = SessionState {
            wasi: wasi.build_p1(),
            limiter: Limiter {
                limits: StoreLimitsBuilder::new()
                    .memory_size(self.memory_bytes as usize)
                    .instances(1)
                    .memories(1)
                    .tables(1)
                    .build(),
                refused: false,
            },
            report: None,
            clock,
        };
        let mut store = Store::new(self.runtime.pre.module().engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_async_yield_and_update(1);
        Ok(store)
    }

    /// Instantiates the runtime in `store`.
    async fn instantiate(&self, store: &mut Store<SessionState>) -> Result<Exports> {
        let instance = self
            .runtime
            .pre
            .instantiate_async(&mut *store)
            .await
            .map_err(Error::Instantiate)?;
        let exports = (|| -> wasmtime::Result<_> {
            Ok(Exports {
                memory: instance
                    .get_memory(&mut *store, "memory")
                    .ok_or_else(|| wasmtime::format_err!("no memory export"))?,
                turn: instance.get_typed_func(&mut *store, "turn")?,
                host_alloc: instance.get_typed_func(&mut *store, "host_alloc")?,
                initialize: instance.get_typed_func(&mut *store, "_initialize").ok(),
            })
        })()
        .map_err(Error::Instantiate)?;
        Ok(exports)
    }
}

/// Grows `memory` to `bytes` and writes `pages` into it.
fn put_back(
    store: &mut Store<SessionState>,
    memory: &Memory,
    bytes: u64,
    pages: &Pages,
) -> Result<()> {
    let have = memory.data_size(&*store) as u64;
    if bytes > have {
        memory
            .grow(&mut *store, (bytes - have).div_ceil(65536))
            .map_err(|e| Error::Instantiate(e.context("growing the memory to the image's size")))?;
    }
    pages.restore(memory.data_mut(&mut *store));
    Ok(())
}

/// Files and folders open in a WASI context: the preopens at rest, more while the guest
/// holds files (its streams and other resources are not counted).
fn open_descriptors(store: &mut Store<SessionState>) -> usize {
    store
        .data_mut()
        .wasi
        .ctx()
        .table
        .iter_mut()
        .filter(|entry| entry.is::<wasmtime_wasi::filesystem::Descriptor>())
        .count()
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
        warm,
        from,
    } = new;
    let workspace = dir.join("workspace");
    let tmp = dir.join("tmp");
    let uploads = dir.join("uploads");
    for d in [&workspace, &tmp, &uploads] {
        std::fs::create_dir_all(d)
            .map_err(|e| Error::Io(format!("creating {}", d.display()), e))?;
    }
    let files = Workspace::open(&workspace, &uploads, limits.workspace_bytes)?;
    let (stdout, stderr) = (Capture::new(Stream::Stdout), Capture::new(Stream::Stderr));
    let (env, bootstrap) = match &from {
        // The image's interpreter is past its bootstrap, with the environment it was given.
        Some(from) => (from.image.env.clone(), None),
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
    };
    let image = from.as_ref().map(|f| f.image.as_ref());
    let clock = image.map_or_else(GuestClock::new, |i| GuestClock::continuing(i.clock_ns));
    let mut store = recipe.store(clock)?;
    let mut exports = recipe.instantiate(&mut store).await?;
    if image.is_some() {
        exports.initialize = None; // the image's interpreter is initialised already
    }

    let now = SystemTime::now();
    let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
    let (stop, stopped) = watch::channel(None);
    let (executions, history) = match image {
        Some(image) => {
            let mut history = History::default();
            for line in &image.history {
                history.push(line.clone());
            }
            (image.executions, history)
        }
        None => (0, History::default()),
    };
    let session = Arc::new(Session {
        id,
        runtime: runtime.name.clone(),
        limits,
        warm: std::sync::atomic::AtomicBool::new(warm),
        workspace: files,
        jobs,
        stop,
        stats: Mutex::new(Stats {
            created_at: now,
            created: Instant::now(),
            phase: Phase::Starting,
            last_used_at: now,
            last_used: Instant::now(),
            executions,
            memory_bytes: exports.memory.data_size(&store) as u64,
        }),
        history: Mutex::new(history),
        dir: dir.clone(),
    });
    // Brought up to date when the session is first at rest; an image's pages are a start
    // (shared, not copied).
    let checkpoint = limits.rollback.then(|| Checkpoint {
        pages: image.map(|i| i.pages.clone()).unwrap_or_default(),
        memory_bytes: 0,
    });
    let driver = Driver {
        session: session.clone(),
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
        reseed: from.as_ref().is_some_and(|f| f.reseed),
        image: from.map(|f| f.image),
    };
    let ended = session.clone();
    tokio::spawn(async move {
        let reason = driver.run(queue, stopped).await;
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove a session folder");
        }
        drop(permit); // the pooled slot is free again only now, with the store gone
        on_end(&ended, reason);
    });
    Ok(session)
}

struct Exports {
    memory: Memory,
    turn: TypedFunc<(i32, i32), i32>,
    host_alloc: TypedFunc<i32, i32>,
    /// A WASI reactor's constructor (`_initialize`), called once before the first turn.
    initialize: Option<TypedFunc<(), ()>>,
}

/// How one turn ended, before it is turned into an [`Outcome`].
enum TurnEnd {
    Returned,
    Ended(EndReason),
}

impl EndReason {
    /// The rollback that undoes a turn ended this way, where one can.
    fn rollback(&self) -> Option<Rollback> {
        match self {
            EndReason::Deadline => Some(Rollback::Deadline),
            EndReason::Trap(what) => Some(Rollback::Trap(what.clone())),
            EndReason::Cancelled => Some(Rollback::Cancelled),
            _ => None,
        }
    }
}

/// What a rollback goes back to: the written pages and size of the memory at rest.
struct Checkpoint {
    pages: Arc<Pages>,
    memory_bytes: u64,
}

/// The session's task: owns the store, runs turns one at a time.
struct Driver {
    session: Arc<Session>,
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
    async fn run(
        mut self,
        mut queue: mpsc::Receiver<Job>,
        mut stopped: watch::Receiver<Option<EndReason>>,
    ) -> EndReason {
        let reason = self.serve(&mut queue, &mut stopped).await;
        self.set_phase(Phase::Ended(reason.clone()));
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
            let put = heavy(|| put_back(store, &memory, image.memory_bytes, &image.pages));
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
        self.set_phase(Phase::Idle);
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
            if self.session.limits.rollback && self.checkpoint.is_none() {
                self.checkpoint = Some(Checkpoint {
                    pages: Arc::default(),
                    memory_bytes: 0,
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
                self.session.record(n, started_at, &job.code, &outcome);
            }
            let _ = job.reply.send(outcome);
            if let Some(reason) = ended {
                return reason;
            }
            // After the reply, before the next turn: what a rollback would go back to.
            self.sync_checkpoint();
        }
    }

    /// Brings the rollback checkpoint up to date with the memory at rest.
    fn sync_checkpoint(&mut self) {
        if let Some(checkpoint) = &mut self.checkpoint {
            let memory = self.exports.memory.data(&self.store);
            Pages::sync(&mut checkpoint.pages, memory);
            checkpoint.memory_bytes = memory.len() as u64;
        }
    }

    /// Puts the checkpoint into a fresh instance in place of the current one, whose state a
    /// failed turn left unknown. Its clock runs on.
    async fn roll_back(&mut self) -> Result<()> {
        let Some(checkpoint) = &self.checkpoint else {
            return Err(Error::InvalidRequest(
                "this session does not roll back".into(),
            ));
        };
        let clock = GuestClock::continuing(self.store.data().clock.now());
        // The old store goes first: the pooled slot it holds is this session's.
        self.store = self.recipe.store(clock)?;
        let mut exports = self.recipe.instantiate(&mut self.store).await?;
        put_back(
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
            clock_ns: self.store.data().clock.now(),
            executions: stats.executions,
            env: self.recipe.env.clone(),
            limits: self.session.limits,
            history,
            files: vec![],
            source: self.session.id.clone(),
            captured_at: SystemTime::now(),
        })
    }

    fn set_phase(&self, phase: Phase) {
        let mut stats = self.session.stats();
        if !matches!(stats.phase, Phase::Ended(_)) {
            stats.phase = phase;
        }
    }

    async fn execute(
        &mut self,
        job: &mut Turn,
        stopped: &mut watch::Receiver<Option<EndReason>>,
    ) -> Outcome {
        let n = {
            let mut stats = self.session.stats();
            stats.phase = Phase::Running;
            stats.executions += 1;
            stats.executions
        };
        let limits = self.session.limits;
        let age = self.session.stats().created.elapsed();
        let lifetime_left = limits.lifetime.saturating_sub(age);
        let capped = job.timeout >= lifetime_left;
        let deadline = job.timeout.min(lifetime_left);
        let input = self
            .protocol
            .encode_turn(&job.code, n, std::mem::take(&mut self.reseed));
        self.store.data_mut().limiter.refused = false;
        self.stdout.reset(limits.output_bytes, job.sink.clone());
        self.stderr.reset(limits.output_bytes, job.sink.take());
        let started = Instant::now();
        let (end, report) = self
            .turn(&input, deadline, stopped, job.reply.closed())
            .await;
        let duration = started.elapsed();
        let (stdout, out_cut) = self.stdout.take();
        let (stderr, err_cut) = self.stderr.take();
        let report = report.as_deref().and_then(Report::parse);
        let mut ended = match end {
            TurnEnd::Ended(EndReason::Deadline) if capped => Some(EndReason::Lifetime),
            TurnEnd::Ended(reason) => Some(reason),
            TurnEnd::Returned => None,
        };
        let (mut result, mut error) = (None, None);
        match (report, self.protocol) {
            (Some(report), _) => {
                result = report.result;
                error = report.error;
                if let Some(code) = report.exit {
                    ended.get_or_insert(EndReason::Exit(code));
                }
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
        let refused_memory = self.store.data().limiter.refused;
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
        let mut truncated = out_cut || err_cut;
        if let Some(r) = result.as_mut().filter(|r| r.len() > limits.output_bytes) {
            r.truncate(floor_char_boundary(r, limits.output_bytes));
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
            if !matches!(stats.phase, Phase::Ended(_)) {
                stats.phase = Phase::Idle;
            }
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
        };
        (end, self.store.data_mut().report.take())
    }
}

/// Runs `f`, milliseconds of copying at worst, without holding up the other tasks of this
/// worker thread (the answer to the request that led here among them): on the multi-thread
/// runtime they move to another worker meanwhile.
fn heavy<R>(f: impl FnOnce() -> R) -> R {
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

fn ended_error(reason: &EndReason, deadline: Duration) -> GuestError {
    let message = match reason {
        EndReason::Deadline => format!(
            "the execution ran past its deadline of {} ms; the session has ended",
            deadline.as_millis()
        ),
        EndReason::Exit(code) => {
            format!("the code exited with status {code}; the session has ended")
        }
        EndReason::Evicted => {
            "the node ran short of memory and this session, idle the longest, was ended".into()
        }
        EndReason::Cancelled => {
            "the caller went away mid-turn, so the turn was stopped; the session has ended".into()
        }
        other => format!("the session has ended: {other}"),
    };
    GuestError {
        kind: "SessionEnded".into(),
        message,
        traceback: String::new(),
    }
}

fn rolled_back_error(
    rollback: &Rollback,
    deadline: Duration,
    guest: Option<GuestError>,
) -> GuestError {
    const BACK: &str = "the session is back in its state before this execution";
    let (kind, message) = match rollback {
        Rollback::Deadline => (
            "Timeout",
            format!(
                "the execution ran past its deadline of {} ms and was stopped; {BACK}",
                deadline.as_millis()
            ),
        ),
        Rollback::Trap(what) => ("Trap", format!("the guest trapped ({what}); {BACK}")),
        Rollback::Cancelled => (
            "Cancelled",
            format!("the caller went away mid-turn, so the turn was stopped; {BACK}"),
        ),
        Rollback::Memory => {
            let guest = guest.unwrap_or_else(|| GuestError {
                kind: "MemoryError".into(),
                message: String::new(),
                traceback: String::new(),
            });
            return GuestError {
                message: format!("the session's memory limit was reached; {BACK}"),
                ..guest
            };
        }
    };
    GuestError {
        kind: kind.into(),
        message,
        traceback: guest.map(|g| g.traceback).unwrap_or_default(),
    }
}

fn floor_char_boundary(s: &str, mut at: usize) -> usize {
    while at > 0 && !s.is_char_boundary(at) {
        at -= 1;
    }
    at
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

    #[test]
    fn end_reasons_read_as_clients_see_them() {
        assert_eq!(EndReason::Deadline.to_string(), "deadline");
        assert_eq!(EndReason::Exit(3).to_string(), "exit");
        assert_eq!(
            EndReason::Trap("unreachable".into()).to_string(),
            "trap: unreachable"
        );
        assert_eq!(EndReason::Trap("x".into()).code(), "trap");
    }

    #[test]
    fn exits_and_traps_are_told_apart() {
        let exit = wasmtime::Error::new(wasmtime_wasi::I32Exit(4));
        assert_eq!(classify(&exit), EndReason::Exit(4));
        let trap = wasmtime::Error::new(wasmtime::Trap::UnreachableCodeReached);
        assert!(matches!(classify(&trap), EndReason::Trap(t) if t.contains("unreachable")));
    }

    #[test]
    fn cutting_a_result_keeps_whole_characters() {
        let s = "aé";
        assert_eq!(floor_char_boundary(s, 2), 1);
        assert_eq!(floor_char_boundary(s, 3), 3);
    }
}
