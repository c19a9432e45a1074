//! A container pod end to end: the `arl-manager` process in front of an `arl-exec` agent on a
//! Unix socket, real processes in a real workspace, over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arl_exec::process::Limits;
use arl_exec::{Address, Listener, LocalAgent};
use arl_proto::sidecar::ExecRequest;
use arl_proto::sidecar::agent_service_client::AgentServiceClient;
use common::Manager;
use serde_json::{Value, json};

struct Pod {
    manager: Manager,
    workspace: tempfile::TempDir,
    _run: tempfile::TempDir,
    http: reqwest::Client,
}

async fn pod(extra: &[&str]) -> Pod {
    let workspace = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let socket = run.path().join("agent.sock");
    let agent =
        Arc::new(LocalAgent::new(workspace.path(), Limits::default(), "/bin/bash".into()).unwrap());
    let listener = Listener::bind(&Address::Unix(socket.clone()))
        .await
        .unwrap();
    tokio::spawn(arl_exec::serve(agent, listener, std::future::pending()));
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let manager = Manager::spawn("pod", |c| {
        c.arg("--agent")
            .arg(format!("unix:{}", socket.display()))
            .arg("--workspace")
            .arg(workspace.path())
            .args(&extra);
    });
    common::wait_ready(&manager.base).await;
    Pod {
        manager,
        workspace,
        _run: run,
        http: reqwest::Client::new(),
    }
}

impl Pod {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.manager.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn create(&self) -> String {
        let (status, body) = self
            .post("/v1/sessions", json!({"runtime": "container"}))
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    async fn run(&self, id: &str, body: Value) -> Value {
        let (status, body) = self
            .post(&format!("/v1/sessions/{id}/commands"), body)
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_container_pod_is_one_sandbox_that_runs_commands_and_comes_back_clean() {
    let pod = pod(&[]).await;
    let (_, load) = pod.get("/v1/load").await;
    assert_eq!(
        (load["capacity"].as_u64(), load["sessions"].as_u64()),
        (Some(1), Some(0))
    );

    let id = pod.create().await;
    assert!(id.starts_with("pod."), "{id}");
    let (status, body) = pod.post("/v1/sessions", json!({})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("capacity_exhausted"))
    );
    let (_, load) = pod.get("/v1/load").await;
    assert_eq!(load["sessions"].as_u64(), Some(1));

    // The example: output and exit code.
    let result = pod
        .run(&id, json!({"command": ["bash", "-lc", "echo hi; exit 3"]}))
        .await;
    assert_eq!(
        (result["stdout"].as_str(), result["exit_code"].as_i64()),
        (Some("hi\n"), Some(3))
    );

    // A service keeps running between calls and stops on a signal.
    let script =
        "trap 'echo bye > stopped; exit 0' TERM; touch started; while true; do sleep 0.05; done";
    let service = pod
        .run(
            &id,
            json!({"command": ["bash", "-c", script], "background": true}),
        )
        .await;
    let pid = service["pid"].as_i64().unwrap();
    assert!(service["exit_code"].is_null());
    let ws = pod.workspace.path().to_owned();
    eventually("the service to start", || ws.join("started").exists()).await;
    let between = pod.run(&id, json!({"command": "ls started"})).await;
    assert_eq!(between["stdout"].as_str(), Some("started\n"));
    let (status, body) = pod
        .post(
            &format!("/v1/sessions/{id}/signal"),
            json!({"pid": pid, "signal": "SIGTERM"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    eventually("the service to stop", || ws.join("stopped").exists()).await;

    // Files: written whole, read back, listed, patched all or nothing, confined.
    let put = pod
        .http
        .put(format!(
            "{}/v1/sessions/{id}/files/src/app.py",
            pod.manager.base
        ))
        .body("x = 1\ny = 2\n")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    let patch = "--- a/app.py\n+++ b/app.py\n@@ -1,2 +1,2 @@\n x = 1\n-y = 2\n+y = 3\n";
    let (status, body) = pod
        .post(
            &format!("/v1/sessions/{id}/files"),
            json!({"base_path": "src", "patch": patch}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let read = pod
        .http
        .get(format!(
            "{}/v1/sessions/{id}/files/src/app.py",
            pod.manager.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(read.text().await.unwrap(), "x = 1\ny = 3\n");
    let (status, body) = pod
        .post(
            &format!("/v1/sessions/{id}/files"),
            json!({"base_path": "src", "patch": patch}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("patch_failed"))
    );
    let (_, listing) = pod.get(&format!("/v1/sessions/{id}/files?path=src")).await;
    assert_eq!(listing["entries"][0]["path"].as_str(), Some("src/app.py"));
    let escape = pod
        .http
        .put(format!(
            "{}/v1/sessions/{id}/files/..%2Fescape.txt",
            pod.manager.base
        ))
        .body("no")
        .send()
        .await
        .unwrap();
    assert_eq!(escape.status(), 400);
    assert!(!ws.parent().unwrap().join("escape.txt").exists());
    let ran = pod
        .run(&id, json!({"command": ["python3", "app.py"], "cwd": "src"}))
        .await;
    assert_eq!(ran["exit_code"].as_i64(), Some(0), "{ran}");

    // The seeds' routes and gRPC service reach the agent while the pod is claimed.
    let (status, body) = pod
        .post("/sidecar/execute", json!({"command": ["echo", "seeds"]}))
        .await;
    assert_eq!(
        (status, body["stdout"].as_str()),
        (200, Some("seeds\n")),
        "{body}"
    );
    let mut grpc = AgentServiceClient::connect(format!("http://{}", pod.manager.grpc))
        .await
        .unwrap();
    let mut log = grpc
        .execute(ExecRequest {
            command: vec!["sh".into(), "-c".into(), "echo over grpc; exit 7".into()],
            ..ExecRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut stdout, mut exit) = (String::new(), None);
    while let Some(message) = log.message().await.unwrap() {
        stdout.push_str(&message.stdout);
        if message.done {
            exit = Some(message.exit_code);
        }
    }
    assert_eq!((stdout.as_str(), exit), ("over grpc\n", Some(7)));

    // Delete kills what runs and empties the workspace; the pod takes a new session.
    let sleeper = pod
        .run(&id, json!({"command": ["sleep", "60"], "background": true}))
        .await;
    let sleeper = sleeper["pid"].as_i64().unwrap();
    let (status, _) = pod
        .call(reqwest::Method::DELETE, &format!("/v1/sessions/{id}"), None)
        .await;
    assert_eq!(status, 204);
    assert!(
        !std::path::Path::new(&format!("/proc/{sleeper}")).exists() || {
            tokio::time::sleep(Duration::from_millis(200)).await;
            !std::path::Path::new(&format!("/proc/{sleeper}")).exists()
        }
    );
    assert_eq!(std::fs::read_dir(&ws).unwrap().count(), 0);
    let (status, body) = pod.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(
        (status, body["error"]["reason"].as_str()),
        (410, Some("deleted"))
    );
    let (status, body) = pod
        .post("/sidecar/execute", json!({"command": ["true"]}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("no_session"))
    );
    let (_, load) = pod.get("/v1/load").await;
    assert_eq!(load["sessions"].as_u64(), Some(0));
    let again = pod.create().await;
    assert_ne!(again, id);
}

#[tokio::test]
async fn bad_input_to_a_container_pod_is_refused_clearly() {
    let pod = pod(&[]).await;
    let (status, body) = pod.post("/v1/sessions", json!({"runtime": "python"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("unknown_runtime"))
    );
    let (status, _) = pod
        .post("/v1/sessions/nope/commands", json!({"command": ["true"]}))
        .await;
    assert_eq!(status, 404);
    let id = pod.create().await;
    let path = format!("/v1/sessions/{id}");
    for (route, body, status, code) in [
        (
            "signal",
            json!({"pid": 1, "signal": "SIGNOPE"}),
            400,
            "invalid_signal",
        ),
        (
            "signal",
            json!({"pid": 1, "signal": "SIGTERM"}),
            404,
            "process_not_found",
        ),
        (
            "commands",
            json!({"command": ["true"], "timeout_seconds": -3}),
            400,
            "invalid_timeout",
        ),
        (
            "commands",
            json!({"command": ["true"], "cwd": "../.."}),
            400,
            "invalid_path",
        ),
        ("commands", json!({"command": []}), 400, "invalid_command"),
        ("commands", json!({"nope": 1}), 422, "invalid_request"),
        (
            "files",
            json!({"files": {"/etc/x": "no"}}),
            400,
            "invalid_path",
        ),
        ("files", json!({"patch": "garbage"}), 400, "invalid_patch"),
    ] {
        let (got, answer) = pod.post(&format!("{path}/{route}"), body.clone()).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{route} {body}: {answer}"
        );
    }
    // A flood is capped and the pod keeps serving.
    let flood = pod
        .run(&id, json!({"command": ["yes"], "timeout_seconds": 30}))
        .await;
    assert_eq!(flood["truncated"].as_bool(), Some(true));
    let after = pod.run(&id, json!({"command": ["echo", "ok"]})).await;
    assert_eq!(after["stdout"].as_str(), Some("ok\n"));
}

#[tokio::test]
async fn an_idle_container_session_is_reset_and_released() {
    let pod = pod(&["--idle-ttl-secs", "1"]).await;
    let id = pod.create().await;
    std::fs::write(pod.workspace.path().join("left.txt"), "x").unwrap();
    let ws = pod.workspace.path().to_owned();
    eventually("the idle session to be released", || {
        std::fs::read_dir(&ws).unwrap().count() == 0
    })
    .await;
    let (status, body) = pod.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(
        (status, body["error"]["reason"].as_str()),
        (410, Some("idle"))
    );
}

#[tokio::test]
async fn a_command_running_past_the_idle_ttl_keeps_its_session() {
    let pod = pod(&["--idle-ttl-secs", "1"]).await;
    let id = pod.create().await;
    let ran = pod.run(&id, json!({"command": ["sleep", "2.5"]})).await;
    assert_eq!(ran["exit_code"].as_i64(), Some(0), "{ran}");
    let (status, body) = pod.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(
        status, 200,
        "idle is counted from the command's end: {body}"
    );
}

#[tokio::test]
async fn the_gateway_routes_container_sessions_like_wasm_ones() {
    use arl_operator::fleet::Fleet;
    use arl_operator::gateway::{self, Gateway};
    let pod = pod(&[]).await;
    let wasm = Manager::spawn("js", |c| {
        c.args(["--runtimes", "javascript"]);
    });
    common::wait_ready(&wasm.base).await;
    let fleet = Fleet::default();
    let mut container = pod.manager.member(None);
    container.runtime = Some("container".into());
    let mut javascript = wasm.member(None);
    javascript.runtime = Some("javascript".into());
    fleet.upsert(container);
    fleet.upsert(javascript);
    fleet.poll(&arl_operator::manager::Managers::new()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = gateway::router(Gateway::new(fleet, None));
    tokio::spawn(arl_serve::serve_http(
        listener,
        router,
        std::future::pending(),
    ));
    let http = reqwest::Client::new();
    let post = |path: String, body: Value| {
        let http = http.clone();
        async move {
            let r = http.post(path).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };

    // A container create takes the pod; a JavaScript one never lands there.
    let (status, created) = post(
        format!("{base}/v1/sessions"),
        json!({"runtime": "container"}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("pod."), "{id}");
    let (status, js) = post(
        format!("{base}/v1/sessions"),
        json!({"runtime": "javascript"}),
    )
    .await;
    assert_eq!(status, 201, "{js}");
    assert!(js["id"].as_str().unwrap().starts_with("js."), "{js}");
    // The pod is taken: no second container session anywhere.
    let (status, full) = post(
        format!("{base}/v1/sessions"),
        json!({"runtime": "container"}),
    )
    .await;
    assert!(status == 429 || status == 503, "{status} {full}");
    // Later calls reach the pod by the id alone.
    let (status, ran) = post(
        format!("{base}/v1/sessions/{id}/commands"),
        json!({"command": ["bash", "-lc", "echo via gateway; exit 3"]}),
    )
    .await;
    assert_eq!(
        (status, ran["stdout"].as_str(), ran["exit_code"].as_i64()),
        (200, Some("via gateway\n"), Some(3))
    );
    let deleted = http
        .delete(format!("{base}/v1/sessions/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
}
