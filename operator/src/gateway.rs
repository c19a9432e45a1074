//! The gateway: one HTTP entry for every session of the cluster.
//!
//! It serves the manager's `/v1/sessions` routes. A create goes to the least-utilised
//! manager that accepts sessions (of the asked runtime, and of `?pool=` if given); the id the
//! manager returns is `<namespace>.<pod>.<hex>` (its `--id-prefix` is the fleet's key for
//! it, `fleet::member_key`), so every later call
//! is routed by the id alone, with no table to keep or lose. Bodies and responses, server-sent
//! events included, are streamed through untouched. A session a drain moved to another
//! manager through the store they share keeps its id: the old pod, or the store, says where
//! it is, and the gateway follows (see [`to_owner`]). A session whose pod is gone with it,
//! or no longer answers, is `410 session_gone`.
//! Snapshots are not routed by id: managers that share a snapshot folder all have them, so
//! the gateway asks each in turn.

use std::sync::Arc;
use std::time::Duration;

use arl_serve::Bearer;
use axum::Router;
use axum::body::{Body, Bytes, HttpBody as _};
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use bytes::BytesMut;
use futures_util::StreamExt as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::fleet::{Fleet, Member, Unplaced};

/// Request bodies of at most this many bytes are read whole before they are forwarded.
const WHOLE_BODY: u64 = 64 << 10;
/// Largest create body the gateway reads (it must look at `runtime`).
const CREATE_BODY_LIMIT: usize = 1 << 20;
/// Imports up to this size are held whole, so that a manager that is full passes one on to
/// the next; a larger one streams through to the first candidate as it arrives.
pub(crate) const IMPORT_SPOOL: usize = 32 << 20;
/// Imports passing through one gateway at once: with the spool, at most 128 MiB held.
pub(crate) const IMPORTS: usize = 4;
/// E2B's headers, passed on to the manager: the sandbox a call is for, and the API key the
/// manager hands back as the sandbox's access token.
const E2B_PASSED: [&str; 2] = ["e2b-sandbox-id", "x-api-key"];
/// MCP's headers, passed on to the manager.
const MCP_PASSED: [&str; 2] = ["mcp-protocol-version", "mcp-session-id"];
/// Headers E2B's SDK authenticates with, each accepted as the gateway's token: the API key,
/// the sandbox's access token (envd, `/execute`) and its traffic token (contexts).
const E2B_KEYS: [&str; 3] = ["x-api-key", "x-access-token", "e2b-traffic-access-token"];

/// Headers passed from client to manager and back.
const PASSED: [header::HeaderName; 5] = [
    header::CONTENT_TYPE,
    header::ACCEPT,
    header::CACHE_CONTROL,
    header::RETRY_AFTER,
    header::LOCATION,
];

/// The gateway's state. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    fleet: Fleet,
    http: reqwest::Client,
    token: Bearer,
    /// The most bytes, and the longest time, one manager's listing may take.
    listing: (usize, Duration),
    /// Turns to pass an import on.
    imports: Arc<Semaphore>,
    /// Sessions that a drain moved to another manager through the store, by id: the member
    /// now holding each. A cache: a gateway that lost it finds them again (see [`to_owner`]).
    moved: Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
}

/// Sessions the gateway remembers as moved; past it, it forgets them all and finds each
/// again on its next call.
const MOVED: usize = 100_000;
/// Managers a call about one session is tried on before it is answered as gone.
const HOPS: usize = 4;

/// How much of one manager's `GET /v1/sessions` or `/v1/snapshots` the gateway reads, and
/// for how long: a manager that answers more, or slower, is reported unreachable rather
/// than holding the gateway's memory or its answer.
const LISTING_BYTES: usize = 32 << 20;
pub(crate) const LISTING_TIME: Duration = Duration::from_secs(10);

impl Gateway {
    /// A gateway over `fleet`; clients must send `token` as a bearer token when it is set.
    pub fn new(fleet: Fleet, token: Option<&str>) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .unwrap_or_default();
        Self {
            fleet,
            http,
            token: Bearer::new(token),
            listing: (LISTING_BYTES, LISTING_TIME),
            imports: Arc::new(Semaphore::new(IMPORTS)),
            moved: Arc::default(),
        }
    }

    fn moved(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, String>> {
        self.moved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes that session `id` is held by member `key` (not the pod its id names).
    fn note_moved(&self, id: &str, key: String) {
        let mut moved = self.moved();
        if moved.len() >= MOVED {
            moved.clear();
        }
        moved.insert(id.to_owned(), key);
    }

    /// The same gateway reading at most `bytes` of each manager's listing, within `time`.
    pub fn with_listing_bounds(mut self, bytes: usize, time: Duration) -> Self {
        self.listing = (bytes, time);
        self
    }

    /// Every ready manager's `GET path`, asked at once: by manager name, the array under
    /// `field` of its answer (the answer itself with `None`), or `None` when it gave none within
    /// the listing bounds.
    async fn listings(
        &self,
        path: &str,
        field: Option<&str>,
        headers: &HeaderMap,
    ) -> Vec<(String, Option<Vec<Value>>)> {
        let members: Vec<Member> = self
            .fleet
            .members()
            .into_iter()
            .filter(|m| m.ready)
            .collect();
        let calls = members.iter().map(|m| self.listing(m, path, headers));
        let answers = futures_util::future::join_all(calls).await;
        members
            .into_iter()
            .zip(answers)
            .map(|(member, answer)| {
                let found = answer.and_then(|mut v| {
                    let listed = match field {
                        Some(field) => v[field].take(),
                        None => v,
                    };
                    match listed {
                        Value::Array(items) => Some(items),
                        _ => None,
                    }
                });
                (member.key(), found)
            })
            .collect()
    }

    /// Every manager's sessions as listed at `path` (ARL's or the RLM sidecar's), and the
    /// managers whose listing did not come (whole, in time).
    async fn sessions(&self, path: &str, headers: &HeaderMap) -> (Vec<Value>, Vec<String>) {
        let mut sessions = Vec::new();
        let mut unreachable = Vec::new();
        for (member, listed) in self.listings(path, Some("sessions"), headers).await {
            match listed {
                Some(found) => sessions.extend(found),
                None => unreachable.push(member),
            }
        }
        (sessions, unreachable)
    }

    /// `member`'s answer to `GET path` as JSON, when it comes whole within the listing
    /// bounds and says 2xx; `None` otherwise.
    async fn listing(&self, member: &Member, path: &str, headers: &HeaderMap) -> Option<Value> {
        let (max, time) = self.listing;
        let read = async {
            let empty = Payload::Whole(Bytes::new());
            let mut response = send(self, member, Method::GET, path, headers, empty)
                .await
                .ok()
                .filter(|r| r.status().is_success())?;
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.ok()? {
                if body.len() + chunk.len() > max {
                    tracing::warn!(pod = %member.key(), max, path, "a listing over the bound");
                    return None;
                }
                body.extend_from_slice(&chunk);
            }
            serde_json::from_slice(&body).ok()
        };
        tokio::time::timeout(time, read).await.ok().flatten()
    }
}

/// A JSON error in the manager's shape.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = json!({ "error": { "code": code, "message": message.into() } });
    (status, axum::Json(body)).into_response()
}

/// The gateway's routes.
pub fn router(gateway: Gateway) -> Router {
    let v1 = Router::new()
        .route("/v1/sessions", post(create).get(list))
        .route("/v1/sessions/import", post(import))
        .route("/v1/snapshots", get(list_snapshots))
        .route("/v1/snapshots/{id}", get(first_found).delete(first_found))
        .route("/v1/sessions/{id}", any(forward))
        .route("/v1/sessions/{id}/{*rest}", any(forward))
        .route("/v1/load", get(load))
        // The RLM sidecar routes, for the same clients reaching the cluster instead of a
        // manager beside them. `DELETE /sessions` (end every session) is the manager's alone:
        // through the gateway it would end every client's.
        .route("/session", post(create))
        .route("/session/{id}", any(forward))
        .route("/session/{id}/{*rest}", any(forward))
        .route("/sessions", get(list_rlm).delete(refuse_delete_all))
        // E2B's: a create placed by its template, the rest routed by the sandbox's id (in
        // the path, or in `E2b-Sandbox-Id`).
        .route("/v2/sandboxes", post(e2b_create).get(e2b_list))
        .route("/v2/sandboxes/{id}/{*rest}", any(forward))
        .route("/sandboxes", post(e2b_create))
        .route("/sandboxes/{id}", any(forward))
        .route("/sandboxes/{id}/{*rest}", any(forward))
        .route("/execute", post(forward))
        .route("/contexts", get(forward).post(forward))
        .route("/contexts/{id}", any(forward))
        .route("/contexts/{id}/{*rest}", any(forward))
        .route("/files", get(forward).post(forward))
        .route("/filesystem.Filesystem/{method}", post(forward))
        .route("/process.Process/{method}", post(forward))
        .route("/health", get(e2b_health))
        // MCP's: routed by the session a tool call names, placed otherwise.
        .route("/mcp", post(mcp))
        // SandboxFusion's: each program is one session on the least-utilised manager.
        .route("/run_code", post(run_fusion))
        .route("/run_jupyter", post(run_fusion))
        // The same for clients that cannot send a token: it is the path's second segment.
        .route("/fusion/{token}/run_code", post(run_fusion))
        .route("/fusion/{token}/run_jupyter", post(run_fusion))
        .route(
            "/fusion/{token}/v1/ping",
            get(|| async { axum::Json("pong") }),
        )
        .route_layer(middleware::from_fn_with_state(
            gateway.clone(),
            authenticate,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/v1/ping", get(|| async { axum::Json("pong") })) // SandboxFusion's liveness
        .merge(v1)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no_route", "no such route") })
        .with_state(gateway)
}

async fn authenticate(State(gateway): State<Gateway>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    let e2b_key = E2B_KEYS
        .into_iter()
        .filter_map(|h| request.headers().get(h))
        .any(|key| gateway.token.allows_key(key.as_bytes()));
    if e2b_key || gateway.token.allows_request(request.uri().path(), given) {
        return next.run(request).await;
    }
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "send the gateway's token as `Authorization: Bearer <token>`",
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

async fn ready(State(gateway): State<Gateway>) -> Response {
    let accepting = gateway
        .fleet
        .members()
        .iter()
        .filter(|m| m.accepts())
        .count();
    if accepting == 0 {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_backends",
            "no manager accepts sessions yet",
        );
    }
    (
        StatusCode::OK,
        axum::Json(json!({ "ready": true, "accepting": accepting })),
    )
        .into_response()
}

/// The summed load of every manager whose load is known.
async fn load(State(gateway): State<Gateway>) -> Response {
    let members = gateway.fleet.members();
    let sum = gateway.fleet.total_load();
    let body = json!({
        "sessions": sum.sessions,
        "capacity": sum.capacity,
        "memory_bytes": sum.memory_bytes,
        "managers": members.len(),
        "accepting": members.iter().filter(|m| m.accepts()).count(),
    });
    axum::Json(body).into_response()
}

#[derive(Debug, Deserialize)]
struct Placement {
    /// Only pods of this WarmPool.
    pool: Option<String>,
}

/// Places a session on the least-utilised manager that takes it, at the same path: ARL's
/// `POST /v1/sessions`, or the RLM sidecar's `POST /session`.
async fn create(
    State(gateway): State<Gateway>,
    Query(placement): Query<Placement>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    create_at(gateway, placement, headers, body, uri.path()).await
}

/// Places a SandboxFusion request (`POST /run_code`, `POST /run_jupyter`, also under
/// `/fusion/<token>/`) on the least-utilised Python manager (`?pool=` to pick a WarmPool),
/// body and answer passed whole.
async fn run_fusion(
    State(gateway): State<Gateway>,
    Query(placement): Query<Placement>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // The manager is reached with the gateway's own token, never a path token.
    let path = match arl_serve::path_token(uri.path()) {
        Some(token) => &uri.path()[arl_serve::PATH_TOKEN_PREFIX.len() + token.len()..],
        None => uri.path(),
    };
    fusion(gateway, placement, headers, body, path).await
}

async fn fusion(
    gateway: Gateway,
    placement: Placement,
    headers: HeaderMap,
    body: Body,
    path: &str,
) -> Response {
    let Ok(body) = axum::body::to_bytes(body, IMPORT_SPOOL).await else {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("a SandboxFusion request through the gateway is at most {IMPORT_SPOOL} bytes"),
        );
    };
    let pool = placement.pool.as_deref();
    place(&gateway, fusion_runtime(&body), pool, path, &headers, body).await
}

/// The runtime a SandboxFusion request runs on: JavaScript for `nodejs` and `typescript`
/// programs, Python for the rest (whose manager answers a language it does not run).
fn fusion_runtime(body: &[u8]) -> &'static str {
    #[derive(serde::Deserialize)]
    struct Language {
        language: Option<String>,
    }
    match serde_json::from_slice::<Language>(body)
        .ok()
        .and_then(|l| l.language)
    {
        Some(l) if l == "nodejs" || l == "typescript" => "javascript",
        _ => "python",
    }
}

/// Places an E2B sandbox (`POST /v2/sandboxes`, 2.7's `POST /sandboxes`): its `templateID`
/// names Python (`code-interpreter-v1`, the SDK's default, `code-interpreter`, `base`), a
/// WarmPool, or a runtime.
async fn e2b_create(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    request: Request,
) -> Response {
    let path = request.uri().path().to_owned();
    let Ok(body) = axum::body::to_bytes(request.into_body(), CREATE_BODY_LIMIT).await else {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "a create body is at most 1 MiB",
        );
    };
    let template = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["templateID"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "code-interpreter-v1".to_owned());
    let pooled = gateway
        .fleet
        .members()
        .into_iter()
        .find(|m| m.pool == template);
    let (runtime, pool) = match pooled {
        _ if ["code-interpreter-v1", "code-interpreter", "base"].contains(&template.as_str()) => {
            ("python".to_owned(), None)
        }
        Some(member) => (
            member.runtime.unwrap_or_else(|| "python".to_owned()),
            Some(template.as_str()),
        ),
        None => (template.clone(), None),
    };
    // A manager knows runtimes, not pools: name the pool's runtime to it.
    let body = match (pool, serde_json::from_slice::<Value>(&body)) {
        (Some(_), Ok(Value::Object(mut fields))) => {
            fields.insert("templateID".into(), Value::String(runtime.clone()));
            Bytes::from(Value::Object(fields).to_string())
        }
        _ => body,
    };
    place(&gateway, &runtime, pool, &path, &headers, body).await
}

/// Every manager's sessions in the RLM sidecar's shape, `{"count", "sessions"}`.
async fn list_rlm(State(gateway): State<Gateway>, headers: HeaderMap) -> Response {
    let (sessions, unreachable) = gateway.sessions("/sessions", &headers).await;
    let body = json!({ "count": sessions.len(), "sessions": sessions, "unreachable": unreachable });
    axum::Json(body).into_response()
}

async fn refuse_delete_all() -> Response {
    error(
        StatusCode::FORBIDDEN,
        "not_through_the_gateway",
        "DELETE /sessions ends every session of a manager; the gateway serves many clients, so \
         it does not offer it: delete sessions one by one (DELETE /session/{id})",
    )
}

async fn create_at(
    gateway: Gateway,
    placement: Placement,
    headers: HeaderMap,
    body: Body,
    path: &str,
) -> Response {
    let body = match axum::body::to_bytes(body, CREATE_BODY_LIMIT).await {
        Ok(body) => body,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "a create body is at most 1 MiB",
            );
        }
    };
    let runtime = if body.iter().all(u8::is_ascii_whitespace) {
        "python".to_owned()
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(fields)) => match fields.get("runtime") {
                None | Some(Value::Null) => "python".to_owned(),
                Some(Value::String(r)) => r.clone(),
                Some(_) => {
                    return error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid_request",
                        "runtime must be a string",
                    );
                }
            },
            Ok(_) => {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_request",
                    "the body must be a JSON object",
                );
            }
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    format!("the body is not JSON: {e}"),
                );
            }
        }
    };
    place(
        &gateway,
        &runtime,
        placement.pool.as_deref(),
        path,
        &headers,
        body,
    )
    .await
}

/// Where an import goes: the pool, and the runtime its export was taken of.
#[derive(Debug, Deserialize)]
struct ImportPlacement {
    pool: Option<String>,
    runtime: Option<String>,
}

/// Places a session exported from another manager, as a create is placed. An export of up
/// to [`IMPORT_SPOOL`] is held and offered to each candidate in turn; a larger one is never
/// held whole, but streamed through to the least-utilised candidate alone. At most
/// [`IMPORTS`] pass at once; past that, 503 with `Retry-After`.
async fn import(
    State(gateway): State<Gateway>,
    Query(placement): Query<ImportPlacement>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Ok(_turn) = gateway.imports.clone().try_acquire_owned() else {
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "imports_busy",
            format!("the gateway is passing {IMPORTS} imports on already; retry shortly"),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    };
    let runtime = placement.runtime.as_deref().unwrap_or("python");
    let pool = placement.pool.as_deref();
    const PATH: &str = "/v1/sessions/import";
    let mut rest = body.into_data_stream();
    let mut held = BytesMut::new();
    while held.len() <= IMPORT_SPOOL {
        match rest.next().await {
            Some(Ok(chunk)) => held.extend_from_slice(&chunk),
            Some(Err(e)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "body_unreadable",
                    format!("reading the import: {e}"),
                );
            }
            None => return place(&gateway, runtime, pool, PATH, &headers, held.freeze()).await,
        }
    }
    let first = match gateway.fleet.place(runtime, pool, |_| true) {
        Ok(candidates) => candidates.into_iter().next(),
        Err(why) => return unplaced(runtime, why),
    };
    let Some(member) = first else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_backends",
            "no manager answered",
        );
    };
    let whole = futures_util::stream::once(async move { Ok(held.freeze()) }).chain(rest);
    let payload = Payload::Stream(Body::from_stream(whole));
    match send(&gateway, &member, Method::POST, PATH, &headers, payload).await {
        Ok(response) => {
            if response.status() == StatusCode::CREATED {
                gateway.fleet.note_placed(&member.key());
            }
            relay(response).await
        }
        Err(e) => {
            tracing::warn!(pod = %member.key(), error = %e, "manager unreachable");
            gateway.fleet.set_load(&member.key(), None);
            error(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                "the manager chosen for this import did not take it; retry",
            )
        }
    }
}

/// The answer when no manager can take a new session of `runtime`.
fn unplaced(runtime: &str, why: Unplaced) -> Response {
    match why {
        Unplaced::Full => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "capacity_exhausted",
                "every manager for this runtime is full or draining",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Unplaced::NoBackends => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_backends",
            format!("no manager serves runtime `{runtime}`"),
        ),
    }
}

/// Sends `body` to `path` on the least-utilised manager serving `runtime` that takes it: a
/// full one (429/503) or one that does not answer passes it to the next.
async fn place(
    gateway: &Gateway,
    runtime: &str,
    pool: Option<&str>,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let candidates = match gateway.fleet.place(runtime, pool, |_| true) {
        Ok(candidates) => candidates,
        Err(why) => return unplaced(runtime, why),
    };
    let mut last = None;
    for member in candidates {
        match send(
            gateway,
            &member,
            Method::POST,
            path,
            headers,
            Payload::Whole(body.clone()),
        )
        .await
        {
            Ok(response) if matches!(response.status().as_u16(), 429 | 503) => {
                gateway.fleet.note_full(&member.key());
                last = Some(response);
            }
            Ok(response) => {
                if response.status() == StatusCode::CREATED {
                    gateway.fleet.note_placed(&member.key());
                }
                return relay(response).await;
            }
            Err(e) => {
                tracing::warn!(pod = %member.key(), error = %e, "manager unreachable; trying the next");
                gateway.fleet.set_load(&member.key(), None);
            }
        }
    }
    match last {
        Some(response) => relay(response).await,
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_backends",
            "no manager answered",
        ),
    }
}

/// Every session of every manager.
async fn list(State(gateway): State<Gateway>, headers: HeaderMap) -> Response {
    let (sessions, unreachable) = gateway.sessions("/v1/sessions", &headers).await;
    axum::Json(json!({ "sessions": sessions, "unreachable": unreachable })).into_response()
}

/// What E2B's `Sandbox.list` filters and pages by (see the manager's `GET /v2/sandboxes`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct E2bListQuery {
    metadata: Option<String>,
    state: Option<String>,
    template: Option<String>,
    limit: Option<usize>,
    next_token: Option<String>,
}

/// E2B's `Sandbox.list` across the fleet: each manager's matching sandboxes (up to 1,000 of
/// each), oldest first, paged here by `limit` and `nextToken` as a manager pages its own.
async fn e2b_list(
    State(gateway): State<Gateway>,
    Query(query): Query<E2bListQuery>,
    headers: HeaderMap,
) -> Response {
    let filters = [
        ("metadata", &query.metadata),
        ("state", &query.state),
        ("template", &query.template),
    ];
    let asked = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(filters.iter().filter_map(|(k, v)| Some((k, v.as_ref()?))))
        .finish();
    let path = format!("/v2/sandboxes?{asked}&limit=1000");
    let mut all: Vec<Value> = Vec::new();
    for (_, listed) in gateway.listings(&path, None, &headers).await {
        all.extend(listed.into_iter().flatten());
    }
    let key = |v: &Value| {
        (
            v["startedAt"].as_str().unwrap_or("").to_owned(),
            v["sandboxID"].as_str().unwrap_or("").to_owned(),
        )
    };
    all.sort_by_key(key);
    let mut rest = all.into_iter();
    if let Some(after) = &query.next_token {
        rest.by_ref().find(|v| v["sandboxID"] == after.as_str());
    }
    let page: Vec<Value> = rest
        .by_ref()
        .take(query.limit.unwrap_or(100).clamp(1, 1000))
        .collect();
    let more = rest.next().is_some();
    let mut response = axum::Json(&page).into_response();
    if more
        && let Some(last) = page.last().and_then(|v| v["sandboxID"].as_str())
        && let Ok(token) = HeaderValue::from_str(last)
    {
        response.headers_mut().insert("x-next-token", token);
    }
    response
}

/// envd's `/health`: the sandbox's manager answers for a sandbox named in `E2b-Sandbox-Id`;
/// without one, the gateway itself is up.
async fn e2b_health(state: State<Gateway>, request: Request) -> Response {
    if request.headers().contains_key(E2B_PASSED[0]) {
        forward(state, request).await
    } else {
        StatusCode::NO_CONTENT.into_response()
    }
}

/// Every snapshot any manager has, newest first, each once.
async fn list_snapshots(State(gateway): State<Gateway>, headers: HeaderMap) -> Response {
    let mut snapshots: Vec<Value> = Vec::new();
    for (_, listed) in gateway
        .listings("/v1/snapshots", Some("snapshots"), &headers)
        .await
    {
        snapshots.extend(listed.into_iter().flatten());
    }
    let key = |v: &Value| {
        (
            v["created_at"].as_str().unwrap_or("").to_owned(),
            v["id"].as_str().unwrap_or("").to_owned(),
        )
    };
    snapshots.sort_by_key(|v| std::cmp::Reverse(key(v)));
    snapshots.dedup_by(|a, b| a["id"] == b["id"]);
    axum::Json(json!({ "snapshots": snapshots })).into_response()
}

/// Passes a call about one snapshot to each ready manager in turn, until one has it.
async fn first_found(State(gateway): State<Gateway>, request: Request) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    if leaves_its_route(&path) {
        return escaping_path(&path);
    }
    let headers = request.headers().clone();
    for member in gateway.fleet.members().into_iter().filter(|m| m.ready) {
        let empty = Payload::Whole(Bytes::new());
        match send(&gateway, &member, method.clone(), &path, &headers, empty).await {
            Ok(r) if r.status() == StatusCode::NOT_FOUND => {}
            Ok(r) => return relay(r).await,
            Err(e) => tracing::warn!(pod = %member.key(), error = %e, "manager unreachable"),
        }
    }
    error(
        StatusCode::NOT_FOUND,
        "snapshot_not_found",
        "no manager has this snapshot",
    )
}

/// The pod that owns session `id`: the part before its last `.`.
pub fn owner(id: &str) -> Option<&str> {
    id.rsplit_once('.')
        .map(|(pod, _)| pod)
        .filter(|pod| !pod.is_empty())
}

/// Whether `path` holds a segment that building the upstream URL would resolve away: `.` or
/// `..` (also percent-encoded, as URL parsers decode them), a backslash (which `http` URLs
/// read as `/`), or an encoded `/`. Such a path could leave the session it names and reach
/// another route of the manager (`/v1/drain`, `DELETE /sessions`).
fn leaves_its_route(path: &str) -> bool {
    path.split('/').any(|segment| {
        let decoded = percent_encoding::percent_decode_str(segment).collect::<Vec<u8>>();
        matches!(decoded.as_slice(), b"." | b"..")
            || decoded.iter().any(|&b| b == b'\\' || b == b'/')
    })
}

/// The answer to a path that [`leaves_its_route`].
fn escaping_path(path: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_path",
        format!("the path {path:?} has a `.` or `..` segment, a backslash or an encoded `/`"),
    )
}

/// Passes a call about one session to the manager that owns it.
async fn forward(State(gateway): State<Gateway>, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    if leaves_its_route(&path) {
        return escaping_path(&path);
    }
    let in_path = [
        "/v1/sessions/",
        "/session/",
        "/sandboxes/",
        "/v2/sandboxes/",
    ]
    .iter()
    .find_map(|route| path.strip_prefix(route))
    .map(|rest| rest.split('/').next().unwrap_or_default());
    let in_header = || {
        request
            .headers()
            .get(E2B_PASSED[0])
            .and_then(|v| v.to_str().ok())
    };
    let id = in_path.or_else(in_header).unwrap_or_default().to_owned();
    let path_and_query = request
        .uri()
        .path_and_query()
        .map_or(path.clone(), |p| p.to_string());
    let (parts, body) = request.into_parts();
    // A small body of known length goes whole, in one write with its Content-Length; others
    // (uploads) stream through.
    let payload = match body.size_hint().exact() {
        Some(n) if n <= WHOLE_BODY => match axum::body::to_bytes(body, WHOLE_BODY as usize).await {
            Ok(bytes) => Payload::Whole(bytes),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "body_unreadable",
                    format!("reading the request body: {e}"),
                );
            }
        },
        _ => Payload::Stream(body),
    };
    let call = (
        parts.method,
        path_and_query.as_str(),
        &parts.headers,
        payload,
    );
    to_owner(&gateway, &id, call).await
}

/// Passes a call (method, path and query, headers, body) to the manager that owns session `id`.
///
/// That is the pod its id names, unless a drain moved the session out through the store the
/// managers share: then the pod is gone or answers 421 `session_moved`, naming the manager
/// that holds it now (or none yet: any manager of the namespace that serves resumes it, and
/// the first asked does). The gateway follows, and remembers where it went; a gateway that
/// restarted finds it again the same way, since the store keeps who holds each session.
async fn to_owner(
    gateway: &Gateway,
    id: &str,
    (method, path_and_query, headers, payload): (Method, &str, &HeaderMap, Payload),
) -> Response {
    let Some(pod) = owner(id) else {
        return error(
            StatusCode::NOT_FOUND,
            "session_not_found",
            format!(
                "`{id}` is not a session id this gateway handed out (`<namespace>.<pod>.<hex>`)"
            ),
        );
    };
    let gone = |why: &str| {
        error(
            StatusCode::GONE,
            "session_gone",
            format!("pod {pod}, which held session {id}, {why}; its sessions are lost"),
        )
    };
    let namespace = pod.rsplit_once('.').map_or("", |(namespace, _)| namespace);
    let mut next = Some(
        gateway
            .moved()
            .get(id)
            .cloned()
            .unwrap_or_else(|| pod.to_owned()),
    );
    let mut payload = Some(payload);
    let mut tried: Vec<String> = Vec::new();
    for _ in 0..HOPS {
        // The manager named, or else one of the namespace's serving ones not asked yet.
        let member = next
            .take()
            .and_then(|key| gateway.fleet.get(&key))
            .or_else(|| gateway.fleet.next_holder(namespace, &tried));
        let Some(member) = member.filter(|m| !tried.contains(&m.key())) else {
            break;
        };
        let key = member.key();
        tried.push(key.clone());
        // A body read whole is sent again to the next manager; a streamed one only once.
        let body = match payload.take() {
            Some(Payload::Whole(bytes)) => {
                payload = Some(Payload::Whole(bytes.clone()));
                Payload::Whole(bytes)
            }
            Some(stream) => stream,
            None => break,
        };
        let response = match send(
            gateway,
            &member,
            method.clone(),
            path_and_query,
            headers,
            body,
        )
        .await
        {
            Ok(response) => response,
            Err(e) if e.is_connect() && key == pod => {
                gateway.fleet.set_load(&key, None);
                return gone("does not answer");
            }
            Err(e) if e.is_connect() => {
                gateway.fleet.set_load(&key, None);
                continue;
            }
            Err(e) => {
                return error(
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway",
                    format!("pod {key}: {e}"),
                );
            }
        };
        match response.status() {
            StatusCode::MISDIRECTED_REQUEST if payload.is_some() => {
                let moved: Value = response.json().await.unwrap_or(Value::Null);
                next = moved["error"]["reason"]
                    .as_str()
                    .filter(|owner| !owner.is_empty())
                    .map(str::to_owned);
            }
            // A manager asked in the pod's stead does not know it: no store holds it.
            StatusCode::NOT_FOUND if key != pod => {}
            _ => {
                if key != pod {
                    gateway.note_moved(id, key);
                }
                return relay(response).await;
            }
        }
    }
    gone("is gone")
}

/// MCP (`POST /mcp`, served statelessly by each manager): a tool call that names a
/// `session_id` goes to the manager that owns the session; any other message (initialize,
/// tools/list, `create_session`, `execute` without a session) to the least-utilised Python
/// manager.
async fn mcp(State(gateway): State<Gateway>, headers: HeaderMap, body: Body) -> Response {
    let Ok(body) = axum::body::to_bytes(body, IMPORT_SPOOL).await else {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("an MCP message through the gateway is at most {IMPORT_SPOOL} bytes"),
        );
    };
    let message: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let session = (message["method"] == "tools/call")
        .then(|| message["params"]["arguments"]["session_id"].as_str())
        .flatten();
    let Some(id) = session else {
        return place(&gateway, "python", None, "/mcp", &headers, body).await;
    };
    if owner(id).is_none() {
        // The tool's error result, as a manager would give it: the model reads why.
        let why = format!("`{id}` is not a session id this gateway handed out");
        let content = json!([{ "type": "text", "text": why }]);
        let result = json!({ "content": content, "isError": true });
        let answer = json!({ "jsonrpc": "2.0", "id": message["id"], "result": result });
        return axum::Json(answer).into_response();
    }
    let call = (Method::POST, "/mcp", &headers, Payload::Whole(body));
    to_owner(&gateway, id, call).await
}

/// A request body for a manager.
enum Payload {
    /// Read already: sent with its length.
    Whole(Bytes),
    /// Passed through as it arrives.
    Stream(Body),
}

async fn send(
    gateway: &Gateway,
    member: &Member,
    method: Method,
    path_and_query: &str,
    headers: &HeaderMap,
    payload: Payload,
) -> reqwest::Result<reqwest::Response> {
    let body = match payload {
        Payload::Whole(bytes) => reqwest::Body::from(bytes),
        Payload::Stream(body) => reqwest::Body::wrap_stream(body.into_data_stream()),
    };
    let mut request = gateway
        .http
        .request(method, format!("{}{path_and_query}", member.endpoint.http))
        .body(body);
    for name in PASSED {
        if let Some(value) = headers.get(&name) {
            request = request.header(name, value);
        }
    }
    for name in E2B_PASSED.into_iter().chain(MCP_PASSED) {
        if let Some(value) = headers.get(name) {
            request = request.header(name, value);
        }
    }
    if let Some(token) = &member.endpoint.token {
        request = request.bearer_auth(token);
    }
    request.send().await
}

/// The manager's response, passed back.
async fn relay(response: reqwest::Response) -> Response {
    let mut out = Response::builder().status(response.status().as_u16());
    for name in PASSED {
        if let Some(value) = response.headers().get(&name) {
            out = out.header(name, value);
        }
    }
    // A small answer of known length goes back whole; streams (SSE, downloads) as they come.
    let body = match response.content_length() {
        Some(n) if n <= WHOLE_BODY => match response.bytes().await {
            Ok(bytes) => Body::from(bytes),
            Err(e) => {
                return error(
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway",
                    format!("reading the manager's answer: {e}"),
                );
            }
        },
        _ => Body::from_stream(response.bytes_stream()),
    };
    out.body(body).unwrap_or_else(|_| {
        error(
            StatusCode::BAD_GATEWAY,
            "bad_gateway",
            "unreadable response",
        )
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::manager::Endpoint;

    /// A stand-in manager on a free port whose `GET /v1/sessions` answers `sessions` after
    /// `delay`.
    async fn fake_manager(name: &str, sessions: usize, delay: Duration) -> Member {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = json!({ "sessions": vec![json!({"id": "x".repeat(1000)}); sessions] });
        let router = Router::new().route(
            "/v1/sessions",
            get(move || {
                let body = body.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    axum::Json(body)
                }
            }),
        );
        tokio::spawn(arl_serve::serve_http(
            listener,
            router,
            std::future::pending(),
        ));
        Member {
            name: name.into(),
            namespace: String::new(),
            pool: String::new(),
            runtime: Some("python".into()),
            endpoint: Endpoint {
                http: format!("http://{addr}"),
                token: None,
            },
            grpc: None,
            ready: true,
            draining: false,
            load: None,
        }
    }

    #[tokio::test]
    async fn a_listing_too_big_or_too_slow_is_left_out_not_waited_for() {
        let fleet = Fleet::default();
        fleet.upsert(fake_manager("small", 2, Duration::ZERO).await);
        fleet.upsert(fake_manager("huge", 5_000, Duration::ZERO).await);
        fleet.upsert(fake_manager("stuck", 1, Duration::from_secs(3600)).await);
        let gateway =
            Gateway::new(fleet, None).with_listing_bounds(1 << 20, Duration::from_millis(500));
        let answer = list(State(gateway), HeaderMap::new()).await;
        let body = axum::body::to_bytes(answer.into_body(), usize::MAX)
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v["sessions"].as_array().unwrap().len(),
            2,
            "the small one's"
        );
        let mut unreachable: Vec<&str> = v["unreachable"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u.as_str().unwrap())
            .collect();
        unreachable.sort();
        assert_eq!(unreachable, ["huge", "stuck"]);
    }

    #[test]
    fn sandbox_fusion_programs_go_to_the_runtime_of_their_language() {
        for (body, runtime) in [
            (r#"{"code":"1","language":"nodejs"}"#, "javascript"),
            (r#"{"code":"1","language":"typescript"}"#, "javascript"),
            (r#"{"code":"1","language":"python"}"#, "python"),
            (r#"{"cells":["1"]}"#, "python"),
            ("not json", "python"),
        ] {
            assert_eq!(fusion_runtime(body.as_bytes()), runtime, "{body}");
        }
    }

    #[test]
    fn paths_that_climb_out_of_their_session_are_caught() {
        for bad in [
            "/v1/sessions/m1.x/../../drain",
            "/v1/sessions/m1.x/%2e%2E/%2e%2e/drain",
            "/v1/sessions/m1.x/./files",
            "/v1/sessions/m1.x/..%5c..%5cdrain",
            "/v1/sessions/m1.x/a\\b",
            "/v1/sessions/m1.x%2f..%2f..%2fdrain",
            "/v1/snapshots/..",
        ] {
            assert!(leaves_its_route(bad), "{bad}");
        }
        for good in [
            "/v1/sessions/m1.x/execute",
            "/v1/sessions/m1.x/files/a/b.txt",
            "/v1/sessions/m1.x/files/..hidden/x.y",
            "/v1/snapshots/snap-0123",
        ] {
            assert!(!leaves_its_route(good), "{good}");
        }
    }
}
