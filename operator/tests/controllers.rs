//! The WarmPool and Sandbox reconcilers against a mocked API server, the way kube-rs tests
//! controllers: a `tower_test` service pair and one scenario per behaviour, each asserting
//! the exact calls (method, path, body) the reconcile makes and answering them. Managers are
//! real: an in-process `arl-manager` serving the `counter` guest on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arl_e2e::{Runtimes, TestManager, guests};
use arl_operator::crd::{Sandbox, WarmPool};
use arl_operator::fleet::{Fleet, Member};
use arl_operator::manager::{Endpoint, Load, Managers};
use arl_operator::token::TokenKey;
use arl_operator::{Context, pool, rfc3339, sandbox};
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle, SendResponse};

const NS: &str = "agents";
const KEY: &[u8] = b"a key of at least sixteen bytes";

/// The mocked API server's side: every request the reconcile sends, in order.
struct ApiServer(Handle<Request<Body>, Response<Body>>);

/// One request the reconcile made, and the way to answer it.
struct Call {
    method: Method,
    path: String,
    query: String,
    body: Value,
    reply: SendResponse<Response<Body>>,
}

impl Call {
    fn ok(self, body: Value) {
        self.status(StatusCode::OK, body);
    }

    fn status(self, status: StatusCode, body: Value) {
        let response = Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap();
        self.reply.send_response(response);
    }

    fn not_found(self, kind: &str, name: &str) {
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
            "message": format!("{kind} \"{name}\" not found"), "code": 404,
        });
        self.status(StatusCode::NOT_FOUND, status);
    }
}

impl ApiServer {
    /// The next request, which must be `method` on `path` (query aside).
    async fn expect(&mut self, method: Method, path: &str) -> Call {
        let (request, reply) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("no {method} {path} within 5 s"))
            .unwrap_or_else(|| panic!("the client went away before {method} {path}"));
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        let call = Call {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or_default().to_owned(),
            body,
            reply,
        };
        assert_eq!(
            (&call.method, call.path.as_str()),
            (&method, path),
            "unexpected call ({})",
            call.body
        );
        call
    }

    /// Asserts that the reconcile made no further call.
    async fn done(mut self) {
        let next = tokio::time::timeout(Duration::from_millis(200), self.0.next_request()).await;
        if let Ok(Some((request, _))) = next {
            panic!("unexpected call: {} {}", request.method(), request.uri());
        }
    }
}

fn context(fleet: Fleet) -> (Arc<Context>, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let ctx = Context {
        client: kube::Client::new(service, NS),
        fleet,
        managers: Managers::new(),
        tokens: TokenKey::new(KEY).unwrap(),
        manager_image: "arl-manager:test".into(),
        interval: Duration::from_secs(3),
        system_namespace: "arl-system".into(),
    };
    (ctx.shared(), ApiServer(handle))
}

/// Runs `reconcile` beside the scenario that answers its calls; both must finish.
async fn run<R, S>(reconcile: R, scenario: S) -> Action
where
    R: Future<Output = arl_operator::Result<Action>>,
    S: Future<Output = ()> + Send + 'static,
{
    let scenario = tokio::spawn(scenario);
    let action = tokio::time::timeout(Duration::from_secs(10), reconcile)
        .await
        .expect("reconcile timed out");
    scenario.await.expect("scenario");
    action.expect("reconcile")
}

/// An in-process manager serving the `counter` guest, prefixing its ids with `agents.<pod>`
/// as the pod it stands for does. Each test has its own, since one drains it.
fn manager(pod: &str) -> Arc<TestManager> {
    let mut config = arl_e2e::config();
    config.id_prefix = format!("{NS}.{pod}");
    TestManager::start(
        config,
        Runtimes {
            guests: vec![("counter", guests::COUNTER)],
            ..Runtimes::default()
        },
    )
}

fn warm_pool(spec: Value, status: Option<Value>) -> WarmPool {
    let mut pool = json!({
        "apiVersion": "arl.infra.io/v1alpha1",
        "kind": "WarmPool",
        "metadata": { "name": "counter", "namespace": NS, "uid": "pool-uid", "generation": 3 },
        "spec": spec,
    });
    if let Some(status) = status {
        pool["status"] = status;
    }
    serde_json::from_value(pool).unwrap()
}

/// A Running, Ready pod of the pool, created `age` ago, draining since `draining` if set.
fn pod(name: &str, age: Duration, draining: Option<SystemTime>) -> Value {
    let mut annotations = json!({ "arl.infra.io/runtime": "counter" });
    if let Some(since) = draining {
        annotations["arl.infra.io/draining-since"] = json!(rfc3339(since));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name, "namespace": NS,
            "labels": { "arl.infra.io/pool": "counter" },
            "annotations": annotations,
            "creationTimestamp": rfc3339(SystemTime::now() - age),
        },
        "spec": { "containers": [{ "name": "manager", "image": "arl-manager:test" }] },
        "status": {
            "phase": "Running", "podIP": "127.0.0.1",
            "conditions": [{ "type": "Ready", "status": "True" }],
        },
    })
}

fn pod_list(pods: Vec<Value>) -> Value {
    json!({ "apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods })
}

/// A fleet member for `name` at `url`, with `sessions` of `capacity` live.
fn member(name: &str, url: &str, sessions: u64, capacity: u64) -> Member {
    Member {
        name: name.into(),
        namespace: NS.into(),
        pool: "counter".into(),
        runtime: Some("counter".into()),
        endpoint: Endpoint {
            http: url.into(),
            token: None,
        },
        grpc: None,
        ready: true,
        draining: false,
        load: Some((
            Load {
                sessions,
                capacity,
                memory_bytes: 0,
                draining: false,
            },
            std::time::Instant::now(),
        )),
    }
}

const HOUR: Duration = Duration::from_secs(3600);
const SECRET: &str = "/api/v1/namespaces/agents/secrets/counter-manager-token";
const PODS: &str = "/api/v1/namespaces/agents/pods";
const POOL_STATUS: &str = "/apis/arl.infra.io/v1alpha1/namespaces/agents/warmpools/counter/status";

/// The token write every pool reconcile starts with: a JSON patch of the pool's Secret that
/// first tests the Secret's owner is the pool, then sets the token (base64, as `data` is).
async fn expect_token_patch(server: &mut ApiServer) -> Call {
    use base64::Engine as _;
    let call = server.expect(Method::PATCH, SECRET).await;
    assert!(
        call.query.contains("fieldManager=arl-operator") && !call.query.contains("force"),
        "{}",
        call.query
    );
    let token = TokenKey::new(KEY).unwrap().pool_token(NS, "counter");
    let token = base64::engine::general_purpose::STANDARD.encode(token);
    assert_eq!(
        call.body,
        json!([
            { "op": "test", "path": "/metadata/ownerReferences/0/uid", "value": "pool-uid" },
            { "op": "add", "path": "/data/token", "value": token },
        ])
    );
    call
}

/// The pool's own Secret, as the API server answers a write of it.
fn own_secret() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": "counter-manager-token", "namespace": NS,
            "ownerReferences": [{ "apiVersion": "arl.infra.io/v1alpha1", "kind": "WarmPool",
                                   "name": "counter", "uid": "pool-uid", "controller": true }],
        },
        "type": "Opaque",
    })
}

async fn expect_token_secret(server: &mut ApiServer) {
    expect_token_patch(server).await.ok(own_secret());
}

const POLICY: &str =
    "/apis/networking.k8s.io/v1/namespaces/agents/networkpolicies/counter-arl-manager";

/// The NetworkPolicy apply after the token: the pool's pods take connections on the manager's
/// ports only from the control plane's pods, and open none.
async fn expect_network_policy(server: &mut ApiServer) {
    let call = server.expect(Method::PATCH, POLICY).await;
    assert!(
        call.query.contains("fieldManager=arl-operator"),
        "{}",
        call.query
    );
    let spec = &call.body["spec"];
    assert_eq!(
        spec["podSelector"]["matchLabels"]["arl.infra.io/pool"],
        "counter"
    );
    assert_eq!(spec["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(spec["egress"], json!([]), "no egress at all");
    let ingress = &spec["ingress"];
    assert_eq!(ingress.as_array().unwrap().len(), 1, "{ingress}");
    let from = &ingress[0]["from"];
    assert_eq!(from.as_array().unwrap().len(), 1, "{from}");
    assert_eq!(
        from[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "arl-system"
    );
    assert_eq!(
        from[0]["podSelector"]["matchExpressions"][0]["values"],
        json!(["arl-operator", "arl-gateway"])
    );
    let ports: Vec<_> = ingress[0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_i64().unwrap())
        .collect();
    assert_eq!(ports, [8080, 50051]);
    assert_eq!(
        call.body["metadata"]["ownerReferences"][0]["uid"],
        "pool-uid"
    );
    let body = call.body.clone();
    call.ok(body);
}

/// What every pool reconcile starts with: the token Secret written and the NetworkPolicy
/// applied, then the pool's pods listed (answered with `pods`).
async fn expect_pool_read(server: &mut ApiServer, pods: Vec<Value>) {
    expect_token_secret(server).await;
    expect_network_policy(server).await;
    expect_pod_list(server, pods).await;
}

/// Running, Ready pods of the pool, an hour old and serving.
fn ready_pods(names: &[&str]) -> Vec<Value> {
    names.iter().map(|name| pod(name, HOUR, None)).collect()
}

async fn expect_pod_list(server: &mut ApiServer, pods: Vec<Value>) {
    let call = server.expect(Method::GET, PODS).await;
    assert!(
        call.query
            .contains("labelSelector=arl.infra.io%2Fpool%3Dcounter"),
        "{}",
        call.query
    );
    call.ok(pod_list(pods));
}

/// The status apply; returns the status it wrote.
async fn expect_pool_status(server: &mut ApiServer) -> Value {
    let call = server.expect(Method::PATCH, POOL_STATUS).await;
    assert!(
        call.query.contains("fieldManager=arl-operator"),
        "{}",
        call.query
    );
    let status = call.body["status"].clone();
    call.ok(json!({
        "apiVersion": "arl.infra.io/v1alpha1", "kind": "WarmPool",
        "metadata": { "name": "counter", "namespace": NS },
        "spec": { "runtime": { "wasm": "counter" } },
        "status": status,
    }));
    status
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap()
}

#[tokio::test]
async fn a_missing_token_secret_is_created_owned_by_the_pool() {
    let pool = warm_pool(
        json!({ "runtime": { "wasm": "counter" }, "replicas": 1 }),
        None,
    );
    let (ctx, mut server) = context(Fleet::default());
    run(pool::reconcile(Arc::new(pool), ctx), async move {
        expect_token_patch(&mut server)
            .await
            .not_found("secrets", "counter-manager-token");
        let call = server
            .expect(Method::POST, "/api/v1/namespaces/agents/secrets")
            .await;
        let token = TokenKey::new(KEY).unwrap().pool_token(NS, "counter");
        assert_eq!(call.body["metadata"]["name"], "counter-manager-token");
        assert_eq!(call.body["stringData"]["token"], token);
        assert_eq!(
            call.body["metadata"]["ownerReferences"][0]["uid"],
            "pool-uid"
        );
        assert_eq!(
            call.body["metadata"]["ownerReferences"][0]["controller"],
            true
        );
        call.status(StatusCode::CREATED, own_secret());
        expect_network_policy(&mut server).await;
        expect_pod_list(&mut server, vec![]).await;
        let call = server.expect(Method::POST, PODS).await;
        let mut created = call.body.clone();
        created["metadata"]["name"] = json!("counter-0");
        call.status(StatusCode::CREATED, created);
        expect_pool_status(&mut server).await;
        server.done().await;
    })
    .await;
}

/// A Secret of the token's name that the pool does not own (a user's, or one planted to hand
/// the managers a known token) is neither overwritten nor used: no pod is made.
#[tokio::test]
async fn a_secret_the_pool_does_not_own_is_never_adopted() {
    let pool = warm_pool(
        json!({ "runtime": { "wasm": "counter" }, "replicas": 2 }),
        None,
    );
    let (ctx, mut server) = context(Fleet::default());
    let scenario = tokio::spawn(async move {
        let refused = json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 422,
            "reason": "Invalid",
            "message": "the server rejected our request due to an error in our request",
        });
        expect_token_patch(&mut server)
            .await
            .status(StatusCode::UNPROCESSABLE_ENTITY, refused);
        server.done().await;
    });
    let result = pool::reconcile(Arc::new(pool), ctx).await;
    scenario.await.unwrap();
    let error = result.expect_err("the reconcile stops at the Secret");
    assert!(
        matches!(&error, arl_operator::Error::ForeignSecret(name) if name == "counter-manager-token"),
        "{error}"
    );
}

#[tokio::test]
async fn an_empty_pool_gets_its_token_and_its_minimum_of_pods() {
    let pool = warm_pool(
        json!({ "runtime": { "wasm": "counter" }, "replicas": 2, "sessionsPerPod": 32 }),
        None,
    );
    let (ctx, mut server) = context(Fleet::default());
    let action = run(pool::reconcile(Arc::new(pool), ctx), async move {
        expect_pool_read(&mut server, vec![]).await;
        for n in 0..2 {
            let call = server.expect(Method::POST, PODS).await;
            let pod = &call.body;
            assert_eq!(pod["metadata"]["generateName"], "counter-");
            assert_eq!(pod["metadata"]["labels"]["arl.infra.io/pool"], "counter");
            assert_eq!(pod["metadata"]["ownerReferences"][0]["controller"], true);
            let manager = &pod["spec"]["containers"][0];
            assert_eq!(manager["name"], "manager");
            assert_eq!(manager["image"], "arl-manager:test");
            let env = |name: &str| {
                manager["env"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|e| e["name"] == name)
                    .cloned()
                    .unwrap()
            };
            assert_eq!(env("ARL_MAX_SESSIONS")["value"], "32");
            assert_eq!(
                env("POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"],
                "metadata.namespace"
            );
            assert_eq!(
                env("POD_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
                "metadata.name"
            );
            assert_eq!(
                env("ARL_ID_PREFIX")["value"],
                "$(POD_NAMESPACE).$(POD_NAME)",
                "ids carry the pod's namespace and name, the fleet's key"
            );
            assert_eq!(
                env("ARL_AUTH_TOKEN")["valueFrom"]["secretKeyRef"]["name"],
                "counter-manager-token"
            );
            assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
            let mut created = call.body.clone();
            created["metadata"]["name"] = json!(format!("counter-{n}"));
            call.status(StatusCode::CREATED, created);
        }
        let status = expect_pool_status(&mut server).await;
        assert_eq!(status["replicas"], 2);
        assert_eq!(status["desiredReplicas"], 2);
        assert_eq!(status["readyReplicas"], 0);
        assert_eq!(status["selector"], "arl.infra.io/pool=counter");
        assert_eq!(status["observedGeneration"], 3);
        assert_eq!(condition(&status, "Ready")["status"], "False");
        assert_eq!(condition(&status, "Scaling")["status"], "False");
        server.done().await;
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(3)));
}

#[tokio::test]
async fn status_reports_sessions_and_capacity_from_the_pods_loads() {
    let pool = warm_pool(
        json!({ "runtime": { "wasm": "counter" }, "replicas": 2, "sessionsPerPod": 100 }),
        None,
    );
    let fleet = Fleet::default();
    fleet.upsert(member("counter-a", "http://127.0.0.1:1", 30, 100));
    fleet.upsert(member("counter-b", "http://127.0.0.1:1", 12, 100));
    let (ctx, mut server) = context(fleet);
    run(pool::reconcile(Arc::new(pool), ctx), async move {
        expect_pool_read(&mut server, ready_pods(&["counter-a", "counter-b"])).await;
        let status = expect_pool_status(&mut server).await;
        assert_eq!(status["replicas"], 2);
        assert_eq!(status["readyReplicas"], 2);
        assert_eq!(status["sessions"], 42);
        assert_eq!(status["capacity"], 200);
        assert_eq!(status["utilization"], "0.21");
        assert_eq!(condition(&status, "Ready")["status"], "True");
        assert!(status["lastScaleUpNeed"].is_string());
        server.done().await;
    })
    .await;
}

#[tokio::test]
async fn a_steady_pool_writes_no_status() {
    let spec = json!({ "runtime": { "wasm": "counter" }, "replicas": 2, "sessionsPerPod": 100 });
    let fleet = Fleet::default();
    fleet.upsert(member("counter-a", "http://127.0.0.1:1", 30, 100));
    fleet.upsert(member("counter-b", "http://127.0.0.1:1", 12, 100));
    let pods = || ready_pods(&["counter-a", "counter-b"]);
    // The first reconcile writes the status...
    let (ctx, mut server) = context(fleet.clone());
    let (written_tx, written_rx) = tokio::sync::oneshot::channel();
    let first = warm_pool(spec.clone(), None);
    run(pool::reconcile(Arc::new(first), ctx), async move {
        expect_pool_read(&mut server, pods()).await;
        written_tx
            .send(expect_pool_status(&mut server).await)
            .unwrap();
        server.done().await;
    })
    .await;
    // ...and the next, seeing the same pods and loads, has nothing to write.
    let steady = warm_pool(spec, Some(written_rx.await.unwrap()));
    let (ctx, mut server) = context(fleet);
    run(pool::reconcile(Arc::new(steady), ctx), async move {
        expect_pool_read(&mut server, pods()).await;
        server.done().await;
    })
    .await;
}

#[tokio::test]
async fn load_beyond_the_pods_scales_up_at_once() {
    // 150 sessions + 16 headroom over 100 * 0.7 per pod: 3 pods.
    let pool = warm_pool(
        json!({ "runtime": { "wasm": "counter" }, "replicas": 1, "sessionsPerPod": 100 }),
        None,
    );
    let fleet = Fleet::default();
    fleet.upsert(member("counter-a", "http://127.0.0.1:1", 80, 100));
    fleet.upsert(member("counter-b", "http://127.0.0.1:1", 70, 100));
    let (ctx, mut server) = context(fleet);
    run(pool::reconcile(Arc::new(pool), ctx), async move {
        expect_pool_read(&mut server, ready_pods(&["counter-a", "counter-b"])).await;
        let call = server.expect(Method::POST, PODS).await;
        let mut created = call.body.clone();
        created["metadata"]["name"] = json!("counter-c");
        call.status(StatusCode::CREATED, created);
        let status = expect_pool_status(&mut server).await;
        assert_eq!(
            (
                status["desiredReplicas"].as_i64(),
                status["replicas"].as_i64()
            ),
            (Some(3), Some(3))
        );
        assert_eq!(condition(&status, "Scaling")["status"], "False");
        server.done().await;
    })
    .await;
}

#[tokio::test]
async fn scale_down_drains_the_emptiest_pod_through_its_manager_before_marking_it() {
    let manager = manager("pod-idle");
    // Its load, read now: the fleet records what the poller would.
    let load: Load = serde_json::from_value(manager.get("/v1/load").await.1).unwrap();
    assert!(!load.draining);
    let spec = json!({
        "runtime": { "wasm": "counter" }, "replicas": 1, "sessionsPerPod": 10,
        "targetUtilization": 1.0, "headroomSessions": 0, "scaleDownDelaySeconds": 300,
    });
    // The load has been low for an hour: past the scale-down delay.
    let status = json!({
        "replicas": 2, "readyReplicas": 2, "desiredReplicas": 2, "sessions": 5, "capacity": 20,
        "utilization": "0.25", "selector": "arl.infra.io/pool=counter",
        "lastScaleUpNeed": rfc3339(SystemTime::now() - Duration::from_secs(3600)),
    });
    let pool = warm_pool(spec, Some(status));
    let fleet = Fleet::default();
    fleet.upsert(member("counter-busy", "http://127.0.0.1:1", 5, 10));
    fleet.upsert(member("pod-idle", &manager.base, 0, 10));
    let (ctx, mut server) = context(fleet);
    let watched = manager.clone();
    run(pool::reconcile(Arc::new(pool), ctx), async move {
        expect_pool_read(&mut server, ready_pods(&["counter-busy", "pod-idle"])).await;
        let call = server
            .expect(Method::PATCH, &format!("{PODS}/pod-idle"))
            .await;
        // The manager was told first, so that no session lands on it from now on.
        let (_, load) = watched.get("/v1/load").await;
        assert_eq!(
            load["draining"], true,
            "the manager was not drained before the pod was marked"
        );
        let since = call.body["metadata"]["annotations"]["arl.infra.io/draining-since"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            since.parse::<k8s_openapi::jiff::Timestamp>().is_ok(),
            "{since}"
        );
        call.ok(pod("pod-idle", HOUR, Some(SystemTime::now())));
        // Nothing is deleted while it drains.
        let status = expect_pool_status(&mut server).await;
        assert_eq!(status["draining"], json!(["pod-idle"]));
        assert_eq!(status["replicas"], 1);
        assert_eq!(condition(&status, "Scaling")["status"], "True");
        server.done().await;
    })
    .await;
}

#[tokio::test]
async fn a_drained_pod_is_deleted_once_empty_and_a_busy_one_is_kept() {
    let spec = json!({ "runtime": { "wasm": "counter" }, "replicas": 1, "sessionsPerPod": 10, "headroomSessions": 0 });
    let pool = warm_pool(spec, None);
    let fleet = Fleet::default();
    fleet.upsert(member("counter-a", "http://127.0.0.1:1", 1, 10));
    fleet.upsert(member("counter-empty", "http://127.0.0.1:1", 0, 10));
    fleet.upsert(member("counter-busy", "http://127.0.0.1:1", 2, 10));
    let (ctx, mut server) = context(fleet);
    run(pool::reconcile(Arc::new(pool), ctx), async move {
        let now = SystemTime::now();
        let pods = vec![
            pod("counter-a", HOUR, None),
            pod("counter-empty", HOUR, Some(now - Duration::from_secs(60))),
            pod("counter-busy", HOUR, Some(now - Duration::from_secs(60))),
        ];
        expect_pool_read(&mut server, pods).await;
        let call = server
            .expect(Method::DELETE, &format!("{PODS}/counter-empty"))
            .await;
        call.ok(pod("counter-empty", HOUR, Some(now)));
        let status = expect_pool_status(&mut server).await;
        assert_eq!(status["draining"], json!(["counter-busy"]));
        assert_eq!(
            status["sessions"], 3,
            "the draining pod's sessions still count"
        );
        server.done().await;
    })
    .await;
}

#[tokio::test]
async fn a_failed_pod_is_replaced() {
    let pool = warm_pool(
        json!({ "runtime": { "wasm": "counter" }, "replicas": 1 }),
        None,
    );
    let (ctx, mut server) = context(Fleet::default());
    run(pool::reconcile(Arc::new(pool), ctx), async move {
        let mut failed = pod("counter-old", Duration::from_secs(60), None);
        failed["status"] = json!({ "phase": "Failed", "reason": "Evicted" });
        expect_pool_read(&mut server, vec![failed.clone()]).await;
        let call = server.expect(Method::POST, PODS).await;
        let mut created = call.body.clone();
        created["metadata"]["name"] = json!("counter-new");
        call.status(StatusCode::CREATED, created);
        server
            .expect(Method::DELETE, &format!("{PODS}/counter-old"))
            .await
            .ok(failed);
        let status = expect_pool_status(&mut server).await;
        assert_eq!(status["replicas"], 1);
        server.done().await;
    })
    .await;
}

const SANDBOX: &str = "/apis/arl.infra.io/v1alpha1/namespaces/agents/sandboxes/box";

fn a_sandbox(finalizers: &[&str], status: Option<Value>, deleting: bool) -> Sandbox {
    let mut object = json!({
        "apiVersion": "arl.infra.io/v1alpha1",
        "kind": "Sandbox",
        "metadata": { "name": "box", "namespace": NS, "uid": "box-uid", "generation": 1, "finalizers": finalizers },
        "spec": { "poolRef": "counter", "keepAlive": false, "timeouts": { "idleSeconds": 120 }, "env": { "TASK": "t1" },
                  "network": { "allow": ["api.example.com", "10.0.0.5:9000"], "maxRequests": 7 } },
    });
    if let Some(status) = status {
        object["status"] = status;
    }
    if deleting {
        object["metadata"]["deletionTimestamp"] = json!(rfc3339(SystemTime::now()));
    }
    serde_json::from_value(object).unwrap()
}

#[tokio::test]
async fn a_new_sandbox_gets_the_session_finalizer_first() {
    let (ctx, mut server) = context(Fleet::default());
    let sandbox = a_sandbox(&[], None, false);
    let reply = sandbox.clone();
    run(sandbox::reconcile(Arc::new(sandbox), ctx), async move {
        let call = server.expect(Method::PATCH, SANDBOX).await;
        let ops = call.body.to_string();
        assert!(
            ops.contains("/metadata/finalizers") && ops.contains("arl.infra.io/session"),
            "{ops}"
        );
        call.ok(serde_json::to_value(&reply).unwrap());
        server.done().await;
    })
    .await;
}

#[tokio::test]
async fn a_sandbox_is_placed_on_the_least_loaded_ready_pod_of_its_pool() {
    let manager = manager("pod-idle");
    let fleet = Fleet::default();
    // Busier, and unreachable: placing there would fail the test.
    fleet.upsert(member("counter-busy", "http://127.0.0.1:1", 8, 10));
    fleet.upsert(member("pod-idle", &manager.base, 0, 10));
    // Another pool's empty pod is not a candidate.
    let mut other = member("other-pod", "http://127.0.0.1:1", 0, 10);
    other.pool = "other".into();
    fleet.upsert(other);
    let (ctx, mut server) = context(fleet.clone());
    let sandbox = a_sandbox(&["arl.infra.io/session"], None, false);
    let reply = sandbox.clone();
    let (status_tx, status_rx) = tokio::sync::oneshot::channel();
    run(sandbox::reconcile(Arc::new(sandbox), ctx), async move {
        let pool = warm_pool(json!({ "runtime": { "wasm": "counter" } }), None);
        server
            .expect(
                Method::GET,
                "/apis/arl.infra.io/v1alpha1/namespaces/agents/warmpools/counter",
            )
            .await
            .ok(serde_json::to_value(&pool).unwrap());
        let call = server
            .expect(Method::PATCH, &format!("{SANDBOX}/status"))
            .await;
        let status = call.body["status"].clone();
        let mut patched = serde_json::to_value(&reply).unwrap();
        patched["status"] = status.clone();
        call.ok(patched);
        status_tx.send(status).unwrap();
        server.done().await;
    })
    .await;
    let status = status_rx.await.unwrap();
    assert_eq!(status["phase"], "Ready");
    assert_eq!(status["podName"], "pod-idle");
    assert_eq!(status["podIP"], "127.0.0.1");
    let id = status["sessionID"].as_str().unwrap();
    assert!(id.starts_with("agents.pod-idle."), "{id}");
    assert_eq!(
        status["endpoint"],
        format!("{}/v1/sessions/{id}", manager.base)
    );
    assert_eq!(status["conditions"][0]["type"], "Ready");
    assert_eq!(status["conditions"][0]["status"], "True");
    // The session is real, with the Sandbox's settings.
    let (code, session) = manager.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(code, 200, "{session}");
    assert_eq!(session["runtime"], "counter");
    assert_eq!(
        (
            &session["network"]["allow"],
            &session["network"]["max_requests"]
        ),
        (&json!(["api.example.com", "10.0.0.5:9000"]), &json!(7)),
        "the Sandbox's network is its session's: {session}"
    );
    // And counted at once, so that the next placement spreads.
    assert_eq!(
        fleet.pod(NS, "pod-idle").unwrap().load.unwrap().0.sessions,
        1
    );
    manager.delete(&format!("/v1/sessions/{id}")).await;
}

#[tokio::test]
async fn a_sandbox_waits_pending_while_no_pod_has_room() {
    let fleet = Fleet::default();
    fleet.upsert(member("counter-full", "http://127.0.0.1:1", 10, 10));
    let (ctx, mut server) = context(fleet);
    let sandbox = a_sandbox(&["arl.infra.io/session"], None, false);
    let reply = serde_json::to_value(&sandbox).unwrap();
    let action = run(sandbox::reconcile(Arc::new(sandbox), ctx), async move {
        let pool = warm_pool(json!({ "runtime": { "wasm": "counter" } }), None);
        server
            .expect(
                Method::GET,
                "/apis/arl.infra.io/v1alpha1/namespaces/agents/warmpools/counter",
            )
            .await
            .ok(serde_json::to_value(&pool).unwrap());
        let call = server
            .expect(Method::PATCH, &format!("{SANDBOX}/status"))
            .await;
        assert_eq!(call.body["status"]["phase"], "Pending");
        assert_eq!(call.body["status"]["reason"], "NoCapacity");
        call.ok(reply);
        server.done().await;
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
}

#[tokio::test]
async fn deleting_a_sandbox_ends_its_session_then_releases_the_finalizer() {
    let manager = manager("pod-idle");
    let id = manager.create(json!({ "runtime": "counter" })).await;
    let fleet = Fleet::default();
    fleet.upsert(member("pod-idle", &manager.base, 1, 10));
    let (ctx, mut server) = context(fleet);
    let status = json!({ "phase": "Ready", "podName": "pod-idle", "sessionID": id });
    let sandbox = a_sandbox(&["arl.infra.io/session"], Some(status), true);
    let reply = serde_json::to_value(&sandbox).unwrap();
    let watched = manager.clone();
    let ended = id.clone();
    run(sandbox::reconcile(Arc::new(sandbox), ctx), async move {
        let call = server.expect(Method::PATCH, SANDBOX).await;
        // By the time the finalizer goes, the session has ended.
        let (code, _) = watched.get(&format!("/v1/sessions/{ended}")).await;
        assert!(
            code == 404 || code == 410,
            "the session is still there ({code})"
        );
        let ops = call.body.to_string();
        assert!(
            ops.contains("remove") && ops.contains("/metadata/finalizers"),
            "{ops}"
        );
        call.ok(reply);
        server.done().await;
    })
    .await;
}

#[tokio::test]
async fn a_sandbox_whose_pod_disappears_fails_with_a_reason() {
    let (ctx, mut server) = context(Fleet::default());
    let status =
        json!({ "phase": "Ready", "podName": "counter-gone", "sessionID": "counter-gone.ab12" });
    let sandbox = a_sandbox(&["arl.infra.io/session"], Some(status), false);
    let reply = serde_json::to_value(&sandbox).unwrap();
    let action = run(sandbox::reconcile(Arc::new(sandbox), ctx), async move {
        server
            .expect(Method::GET, &format!("{PODS}/counter-gone"))
            .await
            .not_found("pods", "counter-gone");
        let call = server
            .expect(Method::PATCH, &format!("{SANDBOX}/status"))
            .await;
        let status = &call.body["status"];
        assert_eq!(status["phase"], "Failed");
        assert_eq!(status["reason"], "PodGone");
        assert_eq!(
            status["sessionID"], "counter-gone.ab12",
            "the lost session stays named"
        );
        assert_eq!(status["conditions"][0]["status"], "False");
        assert_eq!(status["conditions"][0]["reason"], "PodGone");
        call.ok(reply);
        server.done().await;
    })
    .await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_sandbox_whose_session_ended_on_its_own_is_terminated() {
    let manager = manager("pod-idle");
    // Its idle timeout ends it, on the manager's own.
    let id = manager
        .create(json!({ "runtime": "counter", "idle_ttl_secs": 1 }))
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while manager.get(&format!("/v1/sessions/{id}")).await.0 != 410 {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle session never ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fleet = Fleet::default();
    fleet.upsert(member("pod-idle", &manager.base, 0, 10));
    let (ctx, mut server) = context(fleet);
    let status = json!({ "phase": "Ready", "podName": "pod-idle", "sessionID": id });
    let sandbox = a_sandbox(&["arl.infra.io/session"], Some(status), false);
    let reply = serde_json::to_value(&sandbox).unwrap();
    let action = run(sandbox::reconcile(Arc::new(sandbox), ctx), async move {
        server
            .expect(Method::GET, &format!("{PODS}/pod-idle"))
            .await
            .ok(pod("pod-idle", HOUR, None));
        let call = server
            .expect(Method::PATCH, &format!("{SANDBOX}/status"))
            .await;
        let status = &call.body["status"];
        assert_eq!(status["phase"], "Terminated");
        assert_eq!(status["reason"], "SessionEnded");
        assert_eq!(status["podName"], "pod-idle");
        assert_eq!(status["conditions"][0]["status"], "False");
        call.ok(reply);
        server.done().await;
    })
    .await;
    assert_eq!(action, Action::await_change());
}

/// The pod is there, but its manager no longer knows the session (it restarted, and a
/// manager's sessions live in its process): the Sandbox fails with `SessionLost`, naming the
/// session it lost.
#[tokio::test]
async fn a_sandbox_whose_manager_forgot_its_session_is_lost() {
    let manager = manager("pod-restarted");
    let fleet = Fleet::default();
    fleet.upsert(member("pod-restarted", &manager.base, 0, 10));
    let (ctx, mut server) = context(fleet);
    // An id of this pod's form that its (new) manager never handed out.
    let id = "agents.pod-restarted.00000000000000000000000000000000";
    let status = json!({ "phase": "Ready", "podName": "pod-restarted", "sessionID": id });
    let sandbox = a_sandbox(&["arl.infra.io/session"], Some(status), false);
    let reply = serde_json::to_value(&sandbox).unwrap();
    let action = run(sandbox::reconcile(Arc::new(sandbox), ctx), async move {
        server
            .expect(Method::GET, &format!("{PODS}/pod-restarted"))
            .await
            .ok(pod("pod-restarted", HOUR, None));
        let call = server
            .expect(Method::PATCH, &format!("{SANDBOX}/status"))
            .await;
        let status = &call.body["status"];
        assert_eq!(status["phase"], "Failed");
        assert_eq!(status["reason"], "SessionLost");
        assert_eq!(status["sessionID"], id, "the lost session stays named");
        assert!(
            status["message"].as_str().unwrap().contains("restarted"),
            "{status}"
        );
        assert_eq!(status["conditions"][0]["status"], "False");
        assert_eq!(status["conditions"][0]["reason"], "SessionLost");
        call.ok(reply);
        server.done().await;
    })
    .await;
    assert_eq!(action, Action::await_change());
}

/// A drain moved the Sandbox's session through the store its pool's managers share: the
/// controller follows it (its old manager answers 421, the next one resumes it) and records
/// the pod that holds it now, under the same session id.
#[tokio::test]
async fn a_sandbox_whose_session_moved_follows_it_to_its_new_pod() {
    let store = tempfile::tempdir().unwrap();
    let sharing = |pod: &str| {
        let mut config = arl_e2e::config();
        config.id_prefix = format!("{NS}.{pod}");
        config.store = Some(store.path().display().to_string());
        TestManager::start(
            config,
            Runtimes {
                guests: vec![("counter", guests::COUNTER)],
                ..Runtimes::default()
            },
        )
    };
    let (a, b) = (sharing("pod-a"), sharing("pod-b"));
    let id = a.create(json!({ "runtime": "counter" })).await;
    a.exec(&id, "1").await;
    let (code, _) = a.post("/v1/drain?move_sessions=true", json!(null)).await;
    assert_eq!(code, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while a.get(&format!("/v1/sessions/{id}")).await.0 != 421 {
        assert!(
            std::time::Instant::now() < deadline,
            "the session never moved out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fleet = Fleet::default();
    fleet.upsert(member("pod-a", &a.base, 0, 10));
    fleet.upsert(member("pod-b", &b.base, 0, 10));
    let (ctx, mut server) = context(fleet);
    let status = json!({ "phase": "Ready", "podName": "pod-a", "sessionID": id });
    let sandbox = a_sandbox(&["arl.infra.io/session"], Some(status), false);
    let reply = serde_json::to_value(&sandbox).unwrap();
    let held = id.clone();
    let action = run(sandbox::reconcile(Arc::new(sandbox), ctx), async move {
        server
            .expect(Method::GET, &format!("{PODS}/pod-a"))
            .await
            .ok(pod("pod-a", HOUR, None));
        let call = server
            .expect(Method::PATCH, &format!("{SANDBOX}/status"))
            .await;
        let status = &call.body["status"];
        assert_eq!(status["phase"], "Ready", "{status}");
        assert_eq!(status["podName"], "pod-b", "{status}");
        assert_eq!(status["sessionID"], held, "the same session, moved");
        call.ok(reply);
        server.done().await;
    })
    .await;
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(3)),
        "watched as before"
    );
    assert_eq!(b.get(&format!("/v1/sessions/{id}")).await.0, 200);
}

// ---- Tasks ----------------------------------------------------------------------------

const TASK: &str = "/apis/arl.infra.io/v1alpha1/namespaces/agents/tasks/t";
const TASK_SANDBOX: &str = "/apis/arl.infra.io/v1alpha1/namespaces/agents/sandboxes/box";
const COUNTER_POOL: &str = "/apis/arl.infra.io/v1alpha1/namespaces/agents/warmpools/counter";

/// A container pod: an `arl-exec` agent on a Unix socket and the manager fronting it, on
/// loopback; with one session claimed.
struct ContainerPod {
    base: String,
    session: String,
    workspace: tempfile::TempDir,
    _run: tempfile::TempDir,
}

async fn container_pod() -> ContainerPod {
    use arl_exec::{Address, Listener, LocalAgent};
    let workspace = tempfile::tempdir().unwrap();
    let run_dir = tempfile::tempdir().unwrap();
    let socket = run_dir.path().join("agent.sock");
    let agent = Arc::new(
        LocalAgent::new(workspace.path(), Default::default(), "/bin/bash".into()).unwrap(),
    );
    let listener = Listener::bind(&Address::Unix(socket.clone()))
        .await
        .unwrap();
    tokio::spawn(arl_exec::serve(agent, listener, std::future::pending()));
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", http.local_addr().unwrap());
    let options = arl_manager::container::ContainerOptions {
        agent: Address::Unix(socket),
        workspace: workspace.path().to_owned(),
        idle_ttl: HOUR,
        lifetime: HOUR,
        id_prefix: format!("{NS}.pod-c"),
        body_limit: 1 << 20,
        auth_token: None,
    };
    tokio::spawn(arl_manager::container::serve(
        options,
        http,
        grpc,
        std::future::pending(),
    ));
    let created = reqwest::Client::new()
        .post(format!("{base}/v1/sessions"))
        .json(&json!({"runtime": "container"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let session = created.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    ContainerPod {
        base,
        session,
        workspace,
        _run: run_dir,
    }
}

fn a_task(
    steps: Value,
    retries: i32,
    ttl: Option<i64>,
    status: Option<Value>,
) -> arl_operator::crd::Task {
    let mut object = json!({
        "apiVersion": "arl.infra.io/v1alpha1",
        "kind": "Task",
        "metadata": { "name": "t", "namespace": NS, "uid": "t-uid", "generation": 1 },
        "spec": { "sandboxRef": "box", "timeout": "30s", "steps": steps, "retries": retries },
    });
    if let Some(ttl) = ttl {
        object["spec"]["ttlSecondsAfterFinished"] = json!(ttl);
    }
    if let Some(status) = status {
        object["status"] = status;
    }
    serde_json::from_value(object).unwrap()
}

/// A Ready Sandbox of the `counter` pool holding `session` on `pod`.
fn ready_sandbox(pod: &str, session: &str) -> Value {
    let mut sandbox =
        serde_json::to_value(a_sandbox(&["arl.infra.io/session"], None, false)).unwrap();
    sandbox["status"] = json!({ "phase": "Ready", "podName": pod, "sessionID": session });
    sandbox
}

/// Answers the Sandbox and pool reads a Task's run starts with.
async fn expect_task_sandbox(server: &mut ApiServer, pod: &str, session: &str, runtime: Value) {
    server
        .expect(Method::GET, TASK_SANDBOX)
        .await
        .ok(ready_sandbox(pod, session));
    let pool = warm_pool(json!({ "runtime": runtime }), None);
    server
        .expect(Method::GET, COUNTER_POOL)
        .await
        .ok(serde_json::to_value(&pool).unwrap());
}

/// Answers a status patch of the Task; the status written.
async fn expect_task_status(server: &mut ApiServer, task: &arl_operator::crd::Task) -> Value {
    let call = server
        .expect(Method::PATCH, &format!("{TASK}/status"))
        .await;
    let status = call.body["status"].clone();
    let mut patched = serde_json::to_value(task).unwrap();
    patched["status"] = status.clone();
    call.ok(patched);
    status
}

fn container_fleet(pod: &ContainerPod) -> Fleet {
    let fleet = Fleet::default();
    fleet.upsert(member("pod-c", &pod.base, 1, 1));
    fleet
}

/// Reconciles `task` on `pod`'s session, answering the Sandbox and pool reads and `patches`
/// status writes; the statuses written, in order, and the reconcile's action.
async fn run_container_task(
    pod: &ContainerPod,
    task: arl_operator::crd::Task,
    patches: usize,
) -> (Vec<Value>, Action) {
    let (ctx, mut server) = context(container_fleet(pod));
    let reply = task.clone();
    let session = pod.session.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let action = run(
        arl_operator::task::reconcile(Arc::new(task), ctx),
        async move {
            expect_task_sandbox(
                &mut server,
                "pod-c",
                &session,
                json!({ "container": { "image": "python:3.12" } }),
            )
            .await;
            let mut written = Vec::new();
            for _ in 0..patches {
                written.push(expect_task_status(&mut server, &reply).await);
            }
            tx.send(written).unwrap();
            server.done().await;
        },
    )
    .await;
    (rx.await.unwrap(), action)
}

#[tokio::test]
async fn a_three_step_task_in_a_container_sandbox_succeeds_with_each_steps_exit_code() {
    let pod = container_pod().await;
    let task = a_task(
        json!([
            { "name": "write", "type": "FilePatch", "path": "app.py", "content": "print('v1')\n" },
            { "name": "patch", "type": "FilePatch",
              "patch": "--- a/app.py\n+++ b/app.py\n@@ -1 +1 @@\n-print('v1')\n+print('v2')\n" },
            { "name": "run", "type": "Command", "command": ["python3", "app.py"], "env": { "X": "1" } },
        ]),
        0,
        Some(600),
        None,
    );
    let (written, action) = run_container_task(&pod, task, 2).await;
    let (running, done) = (&written[0], &written[1]);
    assert_eq!(
        (running["state"].as_str(), running["attempts"].as_i64()),
        (Some("Running"), Some(1))
    );
    assert_eq!(done["state"], "Succeeded", "{done}");
    let codes: Vec<i64> = done["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["exitCode"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, [0, 0, 0]);
    assert_eq!(done["steps"][2]["stdout"], "v2\n");
    assert_eq!(
        (done["exitCode"].as_i64(), done["stdout"].as_str()),
        (Some(0), Some("v2\n"))
    );
    assert!(done["startTime"].is_string() && done["completionTime"].is_string());
    assert_eq!(done["conditions"][0]["type"], "Complete");
    assert_eq!(done["conditions"][0]["status"], "True");
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(600)),
        "back for its TTL"
    );
    assert_eq!(
        std::fs::read_to_string(pod.workspace.path().join("app.py")).unwrap(),
        "print('v2')\n"
    );
}

#[tokio::test]
async fn a_failing_step_fails_the_task_with_its_stderr_and_later_steps_do_not_run() {
    let pod = container_pod().await;
    let task = a_task(
        json!([
            { "name": "ok", "type": "Command", "command": ["true"] },
            { "name": "boom", "type": "Command", "command": ["bash", "-c", "echo broke >&2; exit 2"] },
            { "name": "never", "type": "Command", "command": ["touch", "ran"] },
        ]),
        0,
        None,
        None,
    );
    let (written, _) = run_container_task(&pod, task, 2).await;
    let done = &written[1];
    assert_eq!(done["state"], "Failed", "{done}");
    assert_eq!(
        (done["exitCode"].as_i64(), done["stderr"].as_str()),
        (Some(2), Some("broke\n"))
    );
    assert_eq!(done["steps"].as_array().unwrap().len(), 2);
    assert!(done["message"].as_str().unwrap().contains("boom"), "{done}");
    assert!(!pod.workspace.path().join("ran").exists());
}

#[tokio::test]
async fn a_failed_attempt_is_retried_from_the_first_step() {
    let pod = container_pod().await;
    let flaky = "test -f tried || { touch tried; exit 1; }";
    let task = a_task(
        json!([
            { "name": "count", "type": "Command", "command": ["bash", "-c", "echo x >> attempts"] },
            { "name": "flaky", "type": "Command", "command": ["bash", "-c", flaky] },
        ]),
        2,
        None,
        None,
    );
    let (written, _) = run_container_task(&pod, task, 3).await;
    let (first, second, done) = (&written[0], &written[1], &written[2]);
    assert_eq!(
        (first["attempts"].as_i64(), second["attempts"].as_i64()),
        (Some(1), Some(2))
    );
    assert_eq!(
        (done["state"].as_str(), done["attempts"].as_i64()),
        (Some("Succeeded"), Some(2))
    );
    let attempts = std::fs::read_to_string(pod.workspace.path().join("attempts")).unwrap();
    assert_eq!(attempts, "x\nx\n", "each attempt starts at the first step");
}

#[tokio::test]
async fn code_and_file_steps_run_in_a_wasm_sandbox_and_commands_are_refused_there() {
    let manager = TestManager::start(arl_e2e::config(), Runtimes::python());
    let session = manager.create(json!({"runtime": "python"})).await;
    let fleet = Fleet::default();
    fleet.upsert(member("pod-w", &manager.base, 1, 10));
    let (ctx, mut server) = context(fleet);
    let task = a_task(
        json!([
            { "name": "data", "type": "FilePatch", "path": "data.txt", "content": "41" },
            { "name": "bump", "type": "FilePatch",
              "patch": "--- a/data.txt\n+++ b/data.txt\n@@ -1 +1 @@\n-41\n\\ No newline at end of file\n+40\n\\ No newline at end of file\n" },
            { "name": "answer", "type": "Code", "code": "n = int(open('/workspace/data.txt').read()) + 2\nprint(n)" },
            { "name": "raise", "type": "Code", "code": "1/0" },
        ]),
        0,
        None,
        None,
    );
    let reply = task.clone();
    let id = session.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    run(
        arl_operator::task::reconcile(Arc::new(task), ctx.clone()),
        async move {
            expect_task_sandbox(&mut server, "pod-w", &id, json!({ "wasm": "python" })).await;
            expect_task_status(&mut server, &reply).await;
            tx.send(expect_task_status(&mut server, &reply).await)
                .unwrap();
            server.done().await;
        },
    )
    .await;
    let done = rx.await.unwrap();
    assert_eq!(done["state"], "Failed", "{done}");
    let steps = done["steps"].as_array().unwrap();
    assert_eq!(steps[2]["stdout"], "42\n", "{done}");
    assert_eq!(steps[3]["exitCode"], 1);
    assert!(
        steps[3]["stderr"]
            .as_str()
            .unwrap()
            .contains("ZeroDivisionError"),
        "{done}"
    );
    // The cell raised; the session lives on with its variables.
    let (_, after) = manager
        .post(
            &format!("/v1/sessions/{session}/execute"),
            json!({"code": "n"}),
        )
        .await;
    assert_eq!(after["result"], "42");

    // A Command step needs a container: refused before anything runs.
    let (ctx, mut server) = {
        let fleet = Fleet::default();
        fleet.upsert(member("pod-w", &manager.base, 1, 10));
        context(fleet)
    };
    let task = a_task(
        json!([{ "name": "sh", "type": "Command", "command": ["ls"] }]),
        0,
        None,
        None,
    );
    let reply = task.clone();
    let id = session.clone();
    run(
        arl_operator::task::reconcile(Arc::new(task), ctx),
        async move {
            expect_task_sandbox(&mut server, "pod-w", &id, json!({ "wasm": "python" })).await;
            let failed = expect_task_status(&mut server, &reply).await;
            assert_eq!(failed["state"], "Failed");
            assert!(
                failed["message"].as_str().unwrap().contains("container"),
                "{failed}"
            );
            server.done().await;
        },
    )
    .await;
}

#[tokio::test]
async fn a_finished_task_is_deleted_after_its_ttl_and_kept_before() {
    let finished = |ago: Duration| {
        json!({
            "state": "Succeeded", "attempts": 1,
            "completionTime": rfc3339(SystemTime::now() - ago),
        })
    };
    let (ctx, mut server) = context(Fleet::default());
    let task = a_task(
        json!([{ "name": "x", "type": "Code", "code": "1" }]),
        0,
        Some(60),
        Some(finished(HOUR)),
    );
    run(
        arl_operator::task::reconcile(Arc::new(task), ctx),
        async move {
            let call = server.expect(Method::DELETE, TASK).await;
            call.ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}));
            server.done().await;
        },
    )
    .await;
    let (ctx, server) = context(Fleet::default());
    let task = a_task(
        json!([{ "name": "x", "type": "Code", "code": "1" }]),
        0,
        Some(3600),
        Some(finished(Duration::ZERO)),
    );
    let action = run(
        arl_operator::task::reconcile(Arc::new(task), ctx),
        server.done(),
    )
    .await;
    assert_ne!(
        action,
        Action::await_change(),
        "it comes back when the TTL is due"
    );
}
