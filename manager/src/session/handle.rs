//! The handle every caller holds: it sends work to the session's task over a channel and
//! reads the bookkeeping the task keeps up to date. Dropping a turn's future cancels the turn.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::history::{History, HistoryEntry};
use super::stream::TurnStream;
use super::types::{EndReason, Info, Lifecycle, Limits, Outcome};
use arl_runtimes::Context;

use crate::egress::Door;
use crate::files::Workspace;
use crate::image::Image;
use crate::output::Sink;
use crate::{Error, Result};

/// Turns that may wait behind a running one before an execute is refused as busy.
pub const QUEUE_DEPTH: usize = 16;

/// Contexts a session may hold beside its own namespace.
pub const MAX_CONTEXTS: usize = 64;

/// A session's bookkeeping, shared by its handle and its task.
pub(super) struct Stats {
    pub created_at: SystemTime,
    pub created: Instant,
    pub state: Lifecycle,
    pub last_used_at: SystemTime,
    pub last_used: Instant,
    pub executions: u64,
    pub memory_bytes: u64,
    /// How long after `created` the session ends: its limits' lifetime, until a client
    /// moves the end (E2B's `set_timeout`).
    pub lifetime: Duration,
    /// The client's labels for the session, listed with it.
    pub metadata: Arc<Metadata>,
    /// Failed turns are rolled back: its limits' choice, until [`Session::forgo_rollback`].
    pub rollback: bool,
    /// Unused this long, it is suspended to the store; zero: never.
    pub suspend_after: Duration,
    /// `executions` when the store last got its state (`None`: never).
    pub saved: Option<u64>,
    /// The store has something of it (a record, at least) to remove when it ends.
    pub stored: bool,
}

/// A client's labels for a session: names to values.
pub type Metadata = std::collections::BTreeMap<String, String>;

/// One execution asked of the session's task.
pub(super) struct Turn {
    pub code: String,
    /// The namespace it runs in, when not the session's own.
    pub context: Option<Context>,
    pub timeout: Duration,
    pub sink: Option<Sink>,
    pub reply: oneshot::Sender<Outcome>,
}

/// What the session's task is asked to do, in order.
pub(super) enum Job {
    Turn(Turn),
    /// Take the state out, at rest between turns.
    Capture(oneshot::Sender<Result<Image>>),
}

/// The handle every caller holds; the store itself lives in the session's task.
pub struct Session {
    pub id: String,
    pub runtime: String,
    pub limits: Limits,
    /// The files under the guest's `/workspace`.
    pub workspace: Arc<Workspace>,
    jobs: mpsc::Sender<Job>,
    stop: watch::Sender<Option<EndReason>>,
    stats: Mutex<Stats>,
    history: Mutex<History>,
    contexts: Mutex<Vec<Context>>,
    /// Sessions of other runtimes that run this one's other languages (E2B's `js` and `ts`
    /// kernels beside a Python sandbox's), ended with it.
    companions: Mutex<Vec<Arc<Session>>>,
    /// The session's own folder (`workspace/`, `tmp/`).
    pub dir: PathBuf,
    /// What its guest may reach outside the sandbox, and what it has spent.
    pub door: Arc<Door>,
    /// Requests holding the session (see [`Live`]): it is not suspended under them.
    holds: AtomicUsize,
    released: Notify,
    /// Set once its task is over: the store dropped, the folder removed, the slot free.
    done: watch::Sender<bool>,
    /// Held while its state is written to the store, so that writes land in turn order.
    pub saving: tokio::sync::Mutex<()>,
}

/// A live session as a request holds it: while any is held, the session is not suspended,
/// so that nothing a request sends it is lost to a suspension racing it.
pub struct Live(Arc<Session>);

impl Live {
    /// The session, no longer held (for what outlives the request).
    pub fn arc(&self) -> Arc<Session> {
        self.0.clone()
    }

    /// Like [`Session::execute_in`], as a stream: the output as the guest writes it, then
    /// the outcome; the session is held until the stream ends. Dropping the stream stops the
    /// turn.
    pub fn execute_streaming_in(
        self,
        context: Option<Context>,
        code: String,
        timeout: Option<Duration>,
    ) -> TurnStream {
        let (sink, output) = mpsc::unbounded_channel();
        TurnStream::new(output, async move {
            self.0.execute_in(context, code, timeout, Some(sink)).await
        })
    }

    /// Like [`execute_streaming_in`](Self::execute_streaming_in), in the session's own
    /// namespace.
    pub fn execute_streaming(self, code: String, timeout: Option<Duration>) -> TurnStream {
        self.execute_streaming_in(None, code, timeout)
    }
}

impl Clone for Live {
    fn clone(&self) -> Self {
        self.0.hold()
    }
}

impl std::ops::Deref for Live {
    type Target = Arc<Session>;
    fn deref(&self) -> &Arc<Session> {
        &self.0
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if self.0.holds.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.released.notify_waiters();
        }
    }
}

/// The receiving ends of a session's handle: what its task reads.
pub(super) struct Inbox {
    pub jobs: mpsc::Receiver<Job>,
    pub stop: watch::Receiver<Option<EndReason>>,
}

/// What a new handle starts with.
pub(super) struct Start {
    pub id: String,
    pub runtime: String,
    pub limits: Limits,
    pub workspace: Workspace,
    pub dir: PathBuf,
    /// Started ahead of demand, for no client yet (see [`Session::claim`]).
    pub warm: bool,
    pub executions: u64,
    pub history: History,
    pub memory_bytes: u64,
    pub door: Arc<Door>,
    pub suspend_after: Duration,
}

impl Session {
    /// A handle and the inbox its task reads.
    pub(super) fn new(start: Start) -> (Arc<Self>, Inbox) {
        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        let (stop, stopped) = watch::channel(None);
        let (now, at) = (Instant::now(), SystemTime::now());
        let session = Arc::new(Session {
            id: start.id,
            runtime: start.runtime,
            limits: start.limits,
            workspace: Arc::new(start.workspace),
            jobs,
            stop,
            stats: Mutex::new(Stats {
                created_at: at,
                created: now,
                state: if start.warm {
                    Lifecycle::Warm
                } else {
                    Lifecycle::Starting
                },
                last_used_at: at,
                last_used: now,
                executions: start.executions,
                memory_bytes: start.memory_bytes,
                lifetime: start.limits.lifetime,
                metadata: Arc::default(),
                rollback: start.limits.rollback,
                suspend_after: start.suspend_after,
                saved: None,
                stored: false,
            }),
            history: Mutex::new(start.history),
            contexts: Mutex::default(),
            companions: Mutex::default(),
            dir: start.dir,
            door: start.door,
            holds: AtomicUsize::new(0),
            released: Notify::new(),
            done: watch::Sender::new(false),
            saving: tokio::sync::Mutex::new(()),
        });
        let inbox = Inbox {
            jobs: queue,
            stop: stopped,
        };
        (session, inbox)
    }

    pub(super) fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn info(&self) -> Info {
        let stats = self.stats();
        Info {
            id: self.id.clone(),
            runtime: self.runtime.clone(),
            state: stats.state.clone(),
            created_at: stats.created_at,
            last_used_at: stats.last_used_at,
            executions: stats.executions,
            memory_bytes: stats.memory_bytes,
            limits: Limits {
                lifetime: stats.lifetime,
                rollback: stats.rollback,
                ..self.limits
            },
            metadata: stats.metadata.clone(),
            network: self.door.summary(),
            stored_bytes: 0,
        }
    }

    /// Holds the session for a request (see [`Live`]).
    pub fn hold(self: &Arc<Self>) -> Live {
        self.holds.fetch_add(1, Ordering::SeqCst);
        Live(self.clone())
    }

    /// Whether a request holds the session.
    pub fn held(&self) -> bool {
        self.holds.load(Ordering::SeqCst) > 0
    }

    /// Waits until no request holds the session.
    pub async fn released(&self) {
        loop {
            let notified = self.released.notified();
            if !self.held() {
                return;
            }
            notified.await;
        }
    }

    /// Marks its task over (see [`finished`](Self::finished)).
    pub(super) fn finish(&self) {
        self.done.send_replace(true);
    }

    /// Waits until its task is over: the store dropped, the folder removed, the slot free.
    pub async fn finished(&self) {
        let _ = self.done.subscribe().wait_for(|done| *done).await;
    }

    /// Unused this long, the session is suspended; zero: never.
    pub fn suspend_after(&self) -> Duration {
        self.stats().suspend_after
    }

    /// Sets how long the session may sit unused before it is suspended.
    pub fn set_suspend_after(&self, after: Duration) {
        self.stats().suspend_after = after;
    }

    /// Whether the store lacks its latest state: it ran a turn since it was last saved, or
    /// (having run none) the store does not know it yet. `whole`: whether the store lacks an
    /// image of it as it is now, even one that never ran a turn.
    pub fn needs_saving(&self, whole: bool) -> bool {
        let stats = self.stats();
        match stats.executions {
            0 if !whole => !stats.stored,
            n => stats.saved != Some(n),
        }
    }

    /// Turns it has run.
    pub fn executions(&self) -> u64 {
        self.stats().executions
    }

    /// Whether the store has something of it.
    pub fn stored(&self) -> bool {
        self.stats().stored
    }

    /// Notes that the store holds its record, and its state as of `executions` turns when
    /// given.
    pub fn saved(&self, executions: Option<u64>) {
        let mut stats = self.stats();
        stats.stored = true;
        if executions.is_some() {
            stats.saved = executions;
        }
    }

    /// Carries a resumed session's clocks on from its record: when it was created and last
    /// used, and the lifetime it had left (a suspended session's clock does not run).
    pub fn resumed(&self, created_at: SystemTime, last_used_at: SystemTime, left: Duration) {
        let mut stats = self.stats();
        stats.created_at = created_at;
        stats.last_used_at = last_used_at;
        stats.lifetime = stats.created.elapsed().saturating_add(left);
        stats.saved = Some(stats.executions);
        stats.stored = true;
    }

    /// How long until the session's end.
    pub fn time_left(&self) -> Duration {
        let stats = self.stats();
        stats.lifetime.saturating_sub(stats.created.elapsed())
    }

    /// Moves the session's end to `from_now` from now (which may be sooner than it was).
    pub fn end_in(&self, from_now: Duration) {
        let mut stats = self.stats();
        stats.lifetime = stats.created.elapsed().saturating_add(from_now);
    }

    /// Whether a failed turn is rolled back (rather than ending the session).
    pub fn rolls_back(&self) -> bool {
        self.stats().rollback
    }

    /// Turns rollback off from the next turn on: a failed turn then ends the session, and no
    /// turn pays for the checkpoint a rollback needs. For sessions that run one program and
    /// are deleted (SandboxFusion's `/run_code`, MCP's one-off `execute`).
    pub fn forgo_rollback(&self) {
        self.stats().rollback = false;
    }

    /// The client's labels for the session.
    pub fn metadata(&self) -> Arc<Metadata> {
        self.stats().metadata.clone()
    }

    /// Labels the session (a claimed warm session takes its client's labels).
    pub fn set_metadata(&self, metadata: Metadata) {
        self.stats().metadata = Arc::new(metadata);
    }

    /// Whether the session waits in the warm pool, no client's yet.
    pub fn is_warm(&self) -> bool {
        self.stats().state == Lifecycle::Warm
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
        let mut stats = self.stats();
        if stats.state == Lifecycle::Warm {
            stats.state = Lifecycle::Idle; // the warm pool holds only sessions at rest
        }
        let (now, at) = (Instant::now(), SystemTime::now());
        stats.created = now;
        stats.created_at = at;
        stats.last_used = now;
        stats.last_used_at = at;
        stats.executions = 0;
    }

    /// The reason the session ended, if it has.
    pub fn ended(&self) -> Option<EndReason> {
        match &self.stats().state {
            Lifecycle::Ended(reason) => Some(reason.clone()),
            _ => None,
        }
    }

    /// Since when the session has been at rest between turns; `None` while a turn runs.
    pub fn idle_since(&self) -> Option<Instant> {
        let stats = self.stats();
        matches!(stats.state, Lifecycle::Idle).then_some(stats.last_used)
    }

    /// When the session's idle TTL or lifetime has passed at `now`, the reason.
    pub fn expired(&self, now: Instant) -> Option<EndReason> {
        let stats = self.stats();
        if now.duration_since(stats.created) >= stats.lifetime {
            return Some(EndReason::Lifetime);
        }
        // One that is suspended before its idle TTL is up lives on in the store instead.
        let suspends = !stats.suspend_after.is_zero() && stats.suspend_after < self.limits.idle_ttl;
        let idle = matches!(stats.state, Lifecycle::Idle | Lifecycle::Starting) && !suspends;
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
        self.execute_in(None, code, timeout, sink).await
    }

    /// Like [`execute`](Self::execute), in `context` (see [`Session::add_context`]) when one
    /// is named.
    pub async fn execute_in(
        &self,
        context: Option<Context>,
        code: String,
        timeout: Option<Duration>,
        sink: Option<Sink>,
    ) -> Result<Outcome> {
        if let Some(reason) = self.ended() {
            return Err(Error::Ended(reason));
        }
        self.workspace.check_room()?;
        let (reply, answer) = oneshot::channel();
        self.send(Job::Turn(Turn {
            code,
            context,
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
    /// were forgotten to keep it within [`HISTORY_BYTES`](super::HISTORY_BYTES).
    pub fn history(&self) -> (Vec<Arc<str>>, u64) {
        let history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        (history.lines.iter().cloned().collect(), history.dropped)
    }

    /// Adds turn `n` to the history.
    pub(super) fn record(&self, entry: &HistoryEntry) {
        if let Ok(line) = serde_json::to_string(entry) {
            self.history
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(line.into());
        }
    }

    /// Opens a context, a namespace of its own beside the session's, whose cells start in
    /// `cwd` (as the guest sees it). Its namespace is made by its first turn.
    pub fn add_context(&self, cwd: String) -> Result<Context> {
        let mut contexts = self.contexts.lock().unwrap_or_else(PoisonError::into_inner);
        if contexts.len() >= MAX_CONTEXTS {
            return Err(Error::InvalidRequest(format!(
                "a session holds at most {MAX_CONTEXTS} contexts: remove one first"
            )));
        }
        let context = Context {
            id: uuid::Uuid::new_v4().simple().to_string(),
            cwd,
        };
        contexts.push(context.clone());
        Ok(context)
    }

    /// The session's contexts, oldest first.
    pub fn contexts(&self) -> Vec<Context> {
        self.contexts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Gives a resumed session the contexts it had.
    pub fn set_contexts(&self, contexts: Vec<Context>) {
        *self.contexts.lock().unwrap_or_else(PoisonError::into_inner) = contexts;
    }

    /// The context `id`, if the session has it.
    pub fn context(&self, id: &str) -> Option<Context> {
        self.contexts().into_iter().find(|c| c.id == id)
    }

    /// Forgets the context `id` (its namespace is dropped by
    /// [`Registry::forget_context`](crate::registry::Registry::forget_context)). Whether it was
    /// there.
    pub fn remove_context(&self, id: &str) -> bool {
        let mut contexts = self.contexts.lock().unwrap_or_else(PoisonError::into_inner);
        let before = contexts.len();
        contexts.retain(|c| c.id != id);
        contexts.len() < before
    }

    /// The live companion of runtime `runtime`, if there is one.
    pub fn companion(&self, runtime: &str) -> Option<Arc<Session>> {
        self.companions()
            .into_iter()
            .find(|c| c.runtime == runtime && c.ended().is_none())
    }

    /// Adopts `companion`, ended with this session, unless a live one of its runtime is
    /// there already (two requests raced to make it): then that one is kept and returned, and
    /// `companion` ended.
    pub fn adopt_companion(&self, companion: Arc<Session>) -> Arc<Session> {
        let mut companions = self
            .companions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        companions.retain(|c| c.ended().is_none());
        if let Some(there) = companions.iter().find(|c| c.runtime == companion.runtime) {
            companion.end(EndReason::Deleted);
            return there.clone();
        }
        companions.push(companion.clone());
        drop(companions);
        if self.ended().is_some() {
            companion.end(EndReason::Deleted);
        }
        companion
    }

    /// The session's companions, live or not.
    pub fn companions(&self) -> Vec<Arc<Session>> {
        self.companions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn gone(&self) -> Error {
        Error::Ended(self.ended().unwrap_or(EndReason::Deleted))
    }

    /// Ends the session: a running turn is stopped, the store dropped, the workspace removed.
    pub fn end(&self, reason: EndReason) {
        let first = self.stop.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(reason);
            true
        });
        if first {
            for companion in self.companions() {
                companion.end(EndReason::Deleted);
            }
        }
    }
}
