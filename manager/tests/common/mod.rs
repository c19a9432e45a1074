//! What the tests that run `arl-manager serve` processes share.
#![allow(dead_code, reason = "each test binary uses its own part")]

use std::process::{Child, Command, Stdio};

use serde_json::Value;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_arl-manager");

/// A free loopback port.
pub fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `url`'s `/readyz` answers 200 (the first start may build the runtime's cache).
pub async fn wait_ready(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        if let Ok(r) = reqwest::get(format!("{url}/readyz")).await
            && r.status() == 200
        {
            return;
        }
        assert!(Instant::now() < deadline, "{url} not ready in 15 minutes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A manager process named `name` (its id prefix) on free ports, killed when dropped.
pub struct Manager {
    pub name: String,
    pub base: String,
    /// `127.0.0.1:<port>` of its gRPC API.
    pub grpc: String,
    child: Child,
}

impl Manager {
    /// Starts `arl-manager serve` with one warm session; `configure` adds flags and env.
    pub fn spawn(name: &str, configure: impl FnOnce(&mut Command)) -> Self {
        let (http, grpc) = (port(), format!("127.0.0.1:{}", port()));
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--log", "warn", "--warm-sessions", "1"])
            .args(["--grpc-listen", &grpc, "--id-prefix", name])
            .env("ARL_LISTEN", format!("127.0.0.1:{http}"))
            .stdout(Stdio::null());
        configure(&mut command);
        Self {
            name: name.into(),
            base: format!("http://127.0.0.1:{http}"),
            grpc,
            child: command.spawn().unwrap(),
        }
    }
}

impl Manager {
    /// Kills the manager as a crash would (SIGKILL): nothing of it runs after.
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// This manager as a member of a gateway's fleet, ready, reached with `token`.
    pub fn member(&self, token: Option<&str>) -> arl_operator::fleet::Member {
        arl_operator::fleet::Member {
            name: self.name.clone(),
            namespace: String::new(),
            pool: String::new(),
            runtime: None,
            endpoint: arl_operator::manager::Endpoint {
                http: self.base.clone(),
                token: token.map(str::to_owned),
            },
            grpc: Some(self.grpc.clone()),
            ready: true,
            draining: false,
            load: None,
        }
    }
}

impl Drop for Manager {
    /// Stops the manager as Kubernetes does (SIGTERM, then SIGKILL past a grace), so that it
    /// removes its data folder as a stopped manager must.
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return; // crashed already
        }
        let term = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while term.is_ok() && Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tokio runtime for a test: two workers, as the machine has two cores.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `method url` with `body` as JSON; the status and the JSON answer (`null` when none).
pub async fn call(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

pub async fn post(url: String, body: Value) -> (u16, Value) {
    call(reqwest::Method::POST, url, Some(body)).await
}

pub async fn get(url: String) -> (u16, Value) {
    call(reqwest::Method::GET, url, None).await
}

/// Runs `code` in session `id` at `base`; the repr of its result, after checking that it
/// raised nothing.
pub async fn result(base: &str, id: &str, code: &str) -> String {
    let (status, v) = post(
        format!("{base}/v1/sessions/{id}/execute"),
        serde_json::json!({ "code": code }),
    )
    .await;
    assert_eq!((status, &v["error"]), (200, &Value::Null), "{code}: {v}");
    v["result"].as_str().unwrap_or_default().to_owned()
}
