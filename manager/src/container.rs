//! A container pool's pod as one sandbox: the manager in front of the `arl-exec` agent in the
//! runtime container, instead of WebAssembly sessions.
//!
//! The pod holds at most one session (`/v1/load` says capacity 1). A create claims the pod;
//! every session route is forwarded to the agent (`commands`, `signal`, `reset`, file
//! updates with patches) or served from the workspace the two containers share (file reads,
//! writes, listings). The seeds' sidecar routes are served under `/sidecar/*` and their
//! `arl.sidecar.AgentService` on the gRPC port, both only while the pod is claimed. `DELETE`
//! kills every process the agent started and empties the workspace, so the pod returns to
//! the pool clean; when that reset fails the pod stops being ready and the operator replaces
//! it. A session idle past its TTL, or past its lifetime, is reset and released the same way.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arl_exec::agent::{ExecStream, ShellStream};
use arl_exec::grpc::{AgentGrpc, RemoteAgent};
use arl_exec::http::parse;
use arl_exec::workspace::Workspace;
use arl_exec::{Address, ExecError, Executor};
use arl_proto::sidecar::{
    ExecRequest, FileRequest, FileResponse, ResetRequest, ResetResponse, ShellInput, SignalRequest,
    SignalResponse,
};
use arl_serve::Bearer;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::BoxStream;
use serde::Deserialize;
use serde_json::{Value, json};

/// The runtime name container sessions report.
pub const RUNTIME: &str = "container";

/// How a container pod's manager is set up.
#[derive(Debug, Clone)]
pub struct ContainerOptions {
    /// Where the agent listens.
    pub agent: Address,
    /// The workspace the manager shares with the runtime container.
    pub workspace: std::path::PathBuf,
    pub idle_ttl: Duration,
    pub lifetime: Duration,
    pub id_prefix: String,
    pub body_limit: usize,
    pub auth_token: Option<String>,
}

/// The pod: its agent, its workspace and its one session.
pub struct Pod {
    agent: RemoteAgent,
    files: Workspace,
    claim: Mutex<Option<Claim>>,
    /// Why sessions that were here ended, so that later calls answer 410.
    ended: Mutex<HashMap<String, &'static str>>,
    draining: AtomicBool,
    /// A reset failed: the pod is not fit for another session.
    broken: AtomicBool,
    options: ContainerOptions,
}

#[derive(Debug, Clone)]
struct Claim {
    id: String,
    created_at: SystemTime,
    created: Instant,
    last_used_at: SystemTime,
    last_used: Instant,
    commands: u64,
    running: u32,
    metadata: BTreeMap<String, String>,
    idle_ttl: Duration,
}

type ApiResult<T> = Result<T, ExecError>;

/// A refusal already made into a response (boxed: a response is large).
type Refusal = Box<Response>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn refusal(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

fn rfc3339(t: SystemTime) -> String {
    crate::rfc3339(t)
}

impl Pod {
    pub fn new(options: ContainerOptions) -> anyhow::Result<Arc<Self>> {
        let agent = RemoteAgent::new(&options.agent)?;
        let files = Workspace::open(&options.workspace)?;
        Ok(Arc::new(Self {
            agent,
            files,
            claim: Mutex::default(),
            ended: Mutex::default(),
            draining: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            options,
        }))
    }

    /// The claimed session named `id`: 404 for an id never here, 410 for one that ended.
    fn session(&self, id: &str) -> Result<Claim, Refusal> {
        if let Some(claim) = lock(&self.claim).as_ref().filter(|c| c.id == id) {
            return Ok(claim.clone());
        }
        match lock(&self.ended).get(id) {
            Some(reason) => Err(Box::new(
                (
                    StatusCode::GONE,
                    Json(json!({"error": {"code": "session_ended", "reason": reason,
                    "message": format!("session {id} ended: {reason}")}})),
                )
                    .into_response(),
            )),
            None => Err(Box::new(refusal(
                StatusCode::NOT_FOUND,
                "session_not_found",
                format!("no session {id} on this pod"),
            ))),
        }
    }

    /// Marks the session used; counts a command running while `running` is `Some`.
    fn touch(&self, id: &str, running: Option<bool>) {
        if let Some(claim) = lock(&self.claim).as_mut().filter(|c| c.id == id) {
            claim.last_used = Instant::now();
            claim.last_used_at = SystemTime::now();
            match running {
                Some(true) => {
                    claim.running += 1;
                    claim.commands += 1;
                }
                Some(false) => claim.running = claim.running.saturating_sub(1),
                None => {}
            }
        }
    }

    /// Resets the pod and releases its session with `reason`.
    async fn release(&self, id: &str, reason: &'static str) -> Result<(), ExecError> {
        let reset = self
            .agent
            .reset(ResetRequest {
                preserve_files: false,
            })
            .await;
        let mut claim = lock(&self.claim);
        if claim.as_ref().is_some_and(|c| c.id == id) {
            *claim = None;
            lock(&self.ended).insert(id.to_owned(), reason);
        }
        drop(claim);
        if let Err(e) = &reset {
            self.broken.store(true, Ordering::SeqCst);
            tracing::error!(error = %e, session = id, "resetting the pod failed: it is no longer ready");
        } else {
            tracing::info!(
                session = id,
                reason,
                "session ended; pod reset and back in the pool"
            );
        }
        reset.map(drop)
    }

    fn view(&self, claim: &Claim) -> Value {
        json!({
            "id": claim.id,
            "runtime": RUNTIME,
            "state": if claim.running > 0 { "running" } else { "idle" },
            "created_at": rfc3339(claim.created_at),
            "last_used_at": rfc3339(claim.last_used_at),
            "executions": claim.commands,
            "memory_bytes": 0,
            "limits": {"idle_ttl_s": claim.idle_ttl.as_secs(), "lifetime_s": self.options.lifetime.as_secs()},
            "metadata": claim.metadata,
        })
    }

    /// Ends sessions idle past their TTL or past the lifetime, every second.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(pod) = weak.upgrade() else { return };
                let due = lock(&pod.claim).as_ref().and_then(|c| {
                    let idle = c.running == 0 && c.last_used.elapsed() >= c.idle_ttl;
                    let old = c.created.elapsed() >= pod.options.lifetime;
                    match (idle, old) {
                        (_, true) => Some((c.id.clone(), "lifetime")),
                        (true, _) => Some((c.id.clone(), "idle")),
                        _ => None,
                    }
                });
                if let Some((id, reason)) = due {
                    let _ = pod.release(&id, reason).await;
                }
            }
        });
    }
}

/// The agent, for the pod's claimed session only: the seeds' routes and gRPC service reach
/// the agent through this, so nothing runs on a pod nobody holds.
#[derive(Clone)]
pub struct Claimed(Arc<Pod>);

impl Claimed {
    fn check(&self) -> Result<String, ExecError> {
        let id = lock(&self.0.claim).as_ref().map(|c| c.id.clone());
        let id = id.ok_or_else(|| {
            ExecError::new(
                arl_exec::error::Kind::Unprocessable,
                "no_session",
                "this pod has no session: create one (POST /v1/sessions) first",
            )
        })?;
        self.0.touch(&id, None);
        Ok(id)
    }
}

impl Executor for Claimed {
    async fn update_files(&self, request: FileRequest) -> arl_exec::Result<FileResponse> {
        self.check()?;
        self.0.agent.update_files(request).await
    }

    async fn execute(&self, request: ExecRequest) -> arl_exec::Result<ExecStream> {
        let id = self.check()?;
        self.0.touch(&id, Some(true));
        // Counted as running until its log ends or the caller drops it: the idle TTL does not
        // end a session while a command runs.
        let done = Done {
            pod: self.0.clone(),
            id,
        };
        let log = self.0.agent.execute(request).await?;
        Ok(Box::pin(futures_util::StreamExt::map(log, move |m| {
            let _ = &done;
            m
        })))
    }

    async fn signal(&self, request: SignalRequest) -> arl_exec::Result<SignalResponse> {
        self.check()?;
        self.0.agent.signal(request).await
    }

    async fn reset(&self, request: ResetRequest) -> arl_exec::Result<ResetResponse> {
        self.check()?;
        self.0.agent.reset(request).await
    }

    async fn shell(&self, input: BoxStream<'static, ShellInput>) -> arl_exec::Result<ShellStream> {
        self.check()?;
        self.0.agent.shell(input).await
    }

    async fn health(&self) -> arl_exec::Result<()> {
        self.0.agent.health().await
    }
}

/// Marks a command finished when its log is dropped.
struct Done {
    pod: Arc<Pod>,
    id: String,
}

impl Drop for Done {
    fn drop(&mut self) {
        self.pod.touch(&self.id, Some(false));
    }
}

/// The gRPC service: the seeds' `arl.sidecar.AgentService`, for the claimed session.
pub fn grpc_service(
    pod: &Arc<Pod>,
    body_limit: usize,
) -> arl_proto::sidecar::agent_service_server::AgentServiceServer<AgentGrpc<Claimed>> {
    AgentGrpc::server(Arc::new(Claimed(pod.clone())), body_limit)
}

/// The HTTP routes of a container pod.
pub fn router(pod: Arc<Pod>) -> Router {
    use arl_exec::http as agent;
    let auth = Bearer::new(pod.options.auth_token.as_deref());
    let claimed = Arc::new(Claimed(pod.clone()));
    let sidecar = agent::router(claimed.clone());
    // The session's own routes: the agent's handlers (and the shared workspace's files),
    // behind a check that the id is the pod's session.
    let session = Router::new()
        .route(
            "/v1/sessions/{id}/commands",
            post(agent::execute::<Claimed>),
        )
        .route("/v1/sessions/{id}/signal", post(agent::signal::<Claimed>))
        .route("/v1/sessions/{id}/reset", post(agent::reset::<Claimed>))
        .route(
            "/v1/sessions/{id}/files",
            get(list_files).post(agent::files::<Claimed>),
        )
        .route(
            "/v1/sessions/{id}/files/{*path}",
            get(read_file).put(write_file).delete(remove_file),
        )
        .route_layer(middleware::from_fn_with_state(pod.clone(), this_session))
        .with_state(claimed);
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/v1/load", get(load))
        .route("/v1/drain", post(drain).delete(undrain))
        .route("/v1/sessions", post(create).get(list))
        .route("/v1/sessions/{id}", get(show).delete(delete))
        .with_state(pod.clone())
        .merge(session)
        .nest("/sidecar", sidecar)
        .fallback(|| async {
            refusal(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route on a container pod",
            )
        })
        .layer(DefaultBodyLimit::max(pod.options.body_limit))
        .layer(middleware::from_fn(move |r: Request, next: Next| {
            let open = matches!(r.uri().path(), "/healthz" | "/readyz");
            let allowed = open
                || auth.allows_request(
                    r.uri().path(),
                    r.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()),
                );
            async move {
                if allowed {
                    next.run(r).await
                } else {
                    let mut response = refusal(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "this manager needs `Authorization: Bearer <token>` (its --auth-token)",
                    );
                    response
                        .headers_mut()
                        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                    response
                }
            }
        }))
}

/// Lets a request through to a session route only when its `{id}` is the pod's session
/// (404 for an id never here, 410 with the reason for one that ended).
async fn this_session(
    State(pod): State<Arc<Pod>>,
    Path(params): Path<HashMap<String, String>>,
    request: Request,
    next: Next,
) -> Response {
    let id = params.get("id").map(String::as_str).unwrap_or_default();
    match pod.session(id) {
        Ok(_) => next.run(request).await,
        Err(refused) => *refused,
    }
}

async fn readyz(State(pod): State<Arc<Pod>>) -> Response {
    if pod.broken.load(Ordering::SeqCst) {
        return refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "a reset failed: this pod is to be replaced",
        );
    }
    match pod.agent.health().await {
        Ok(()) => Json(json!({"status": "ready"})).into_response(),
        Err(e) => refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("the agent does not answer: {e}"),
        ),
    }
}

async fn load(State(pod): State<Arc<Pod>>) -> Json<crate::metrics::Load> {
    let taken = lock(&pod.claim).is_some();
    Json(crate::metrics::Load {
        sessions: u64::from(taken),
        capacity: 1,
        memory_bytes: 0,
        draining: pod.draining.load(Ordering::SeqCst) || pod.broken.load(Ordering::SeqCst),
        suspended: 0,
    })
}

async fn drain(State(pod): State<Arc<Pod>>) -> StatusCode {
    pod.draining.store(true, Ordering::SeqCst);
    StatusCode::NO_CONTENT
}

async fn undrain(State(pod): State<Arc<Pod>>) -> StatusCode {
    pod.draining.store(false, Ordering::SeqCst);
    StatusCode::NO_CONTENT
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    runtime: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
    idle_ttl_secs: Option<u64>,
}

async fn create(State(pod): State<Arc<Pod>>, body: Bytes) -> Response {
    let body: CreateBody = match parse(&body, true) {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    if let Some(runtime) = body.runtime.as_deref().filter(|r| *r != RUNTIME) {
        return refusal(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_runtime",
            format!("runtime `{runtime}` is not served here: this pod is one `{RUNTIME}` sandbox"),
        );
    }
    if pod.draining.load(Ordering::SeqCst) || pod.broken.load(Ordering::SeqCst) {
        return refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this pod takes no new session",
        );
    }
    if let Err(e) = pod.agent.health().await {
        return refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("the agent does not answer: {e}"),
        );
    }
    let idle_ttl = body
        .idle_ttl_secs
        .map_or(pod.options.idle_ttl, Duration::from_secs)
        .min(pod.options.lifetime);
    let hex = uuid::Uuid::new_v4().simple().to_string();
    let id = match pod.options.id_prefix.as_str() {
        "" => hex,
        prefix => format!("{prefix}.{hex}"),
    };
    let (now, at) = (Instant::now(), SystemTime::now());
    let claim = Claim {
        id,
        created_at: at,
        created: now,
        last_used_at: at,
        last_used: now,
        commands: 0,
        running: 0,
        metadata: body.metadata.unwrap_or_default(),
        idle_ttl,
    };
    {
        let mut slot = lock(&pod.claim);
        if slot.is_some() {
            return refusal(
                StatusCode::TOO_MANY_REQUESTS,
                "capacity_exhausted",
                "this pod's one sandbox is taken; create on another pod",
            );
        }
        *slot = Some(claim.clone());
    }
    tracing::info!(session = %claim.id, "pod claimed");
    (StatusCode::CREATED, Json(pod.view(&claim))).into_response()
}

async fn list(State(pod): State<Arc<Pod>>) -> Json<Value> {
    let sessions: Vec<Value> = lock(&pod.claim).iter().map(|c| pod.view(c)).collect();
    Json(json!({"sessions": sessions}))
}

async fn show(State(pod): State<Arc<Pod>>, Path(id): Path<String>) -> Response {
    match pod.session(&id) {
        Ok(claim) => Json(pod.view(&claim)).into_response(),
        Err(r) => *r,
    }
}

async fn delete(State(pod): State<Arc<Pod>>, Path(id): Path<String>) -> Response {
    if let Err(r) = pod.session(&id) {
        return *r;
    }
    match pod.release(&id, "deleted").await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Default, Deserialize)]
struct ListQuery {
    path: Option<String>,
}

/// Runs a file operation on the shared workspace off the async threads.
async fn on_files<T: Send + 'static>(
    claimed: &Claimed,
    f: impl FnOnce(&Workspace) -> ApiResult<T> + Send + 'static,
) -> Result<T, Refusal> {
    let pod = claimed.0.clone();
    tokio::task::spawn_blocking(move || f(&pod.files))
        .await
        .map_err(|e| Box::new(ExecError::internal("a file operation", e).into_response()))?
        .map_err(|e| Box::new(e.into_response()))
}

async fn list_files(State(claimed): State<Arc<Claimed>>, Query(q): Query<ListQuery>) -> Response {
    let path = q.path.unwrap_or_default();
    let shown = path.clone();
    match on_files(&claimed, move |w| w.list(&path)).await {
        Ok(entries) => {
            let entries: Vec<Value> = entries
                .into_iter()
                .map(|(name, dir, size)| {
                    let full = if shown.is_empty() {
                        name
                    } else {
                        format!("{}/{name}", shown.trim_end_matches('/'))
                    };
                    json!({"path": full, "kind": if dir { "dir" } else { "file" }, "size": size})
                })
                .collect();
            Json(json!({"path": shown, "entries": entries})).into_response()
        }
        Err(r) => *r,
    }
}

async fn read_file(
    State(claimed): State<Arc<Claimed>>,
    Path((_, path)): Path<(String, String)>,
) -> Response {
    match on_files(&claimed, move |w| w.read_file(&path)).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        Err(r) => *r,
    }
}

async fn write_file(
    State(claimed): State<Arc<Claimed>>,
    Path((_, path)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let shown = path.clone();
    let size = body.len();
    match on_files(&claimed, move |w| w.write_file(&path, &body)).await {
        Ok(replaced) => {
            let status = if replaced {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            (
                status,
                Json(json!({"path": shown, "kind": "file", "size": size})),
            )
                .into_response()
        }
        Err(r) => *r,
    }
}

async fn remove_file(
    State(claimed): State<Arc<Claimed>>,
    Path((_, path)): Path<(String, String)>,
) -> Response {
    match on_files(&claimed, move |w| w.remove(&path)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => *r,
    }
}

/// Serves a container pod on `listeners` until `shutdown`: HTTP, and gRPC with the seeds'
/// `AgentService` and health.
pub async fn serve(
    options: ContainerOptions,
    http: tokio::net::TcpListener,
    grpc: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let body_limit = options.body_limit;
    let auth = Bearer::new(options.auth_token.as_deref());
    let pod = Pod::new(options)?;
    pod.spawn_reaper();
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut stopping = stopping.clone();
        async move {
            let _ = stopping.wait_for(|s| *s).await;
        }
    };
    let (_reporter, health) = tonic_health::server::health_reporter();
    let service = tonic::service::interceptor::InterceptedService::new(
        grpc_service(&pod, body_limit),
        auth.interceptor("this manager needs `authorization: Bearer <token>` (its --auth-token)"),
    );
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(service)
            .serve_with_incoming_shutdown(arl_serve::grpc_incoming(grpc), stopped()),
    );
    let http = tokio::spawn(arl_serve::serve_http(http, router(pod.clone()), stopped()));
    shutdown.await;
    tracing::info!("stopping");
    let _ = stop.send(true);
    let claimed = lock(&pod.claim).as_ref().map(|c| c.id.clone());
    if let Some(id) = claimed {
        let _ = pod.release(&id, "shutdown").await;
    }
    http.await??;
    grpc.await??;
    Ok(())
}
