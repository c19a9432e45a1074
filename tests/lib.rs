//! Helpers for the end-to-end tests: real managers on real loopback sockets.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers fail loudly"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arl_manager::runtime::RuntimeSpec;
use arl_manager::server::{self, Listeners};
use arl_manager::{ManagerConfig, Registry, ServeOptions};
use arl_runtimes::Protocol;
use serde_json::Value;

/// The guests of `wasm-guests/`, built by `build.rs`.
pub mod guests {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));
}

/// The cache the tests share with each other and with `arl-manager serve` (the same default).
pub fn cache_dir() -> PathBuf {
    arl_build_support::cache_dir()
}

/// The Python interpreter tools run with (`ARL_PYTHON`, else `python3`).
pub fn python() -> String {
    std::env::var("ARL_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A folder holding the PyPI `packages` (pinned `name==version`), installed with pip into
/// the shared cache on first use; put it on `sys.path` to import them.
pub fn pytools(packages: &[&str]) -> PathBuf {
    arl_build_support::pytools(&cache_dir(), &python(), packages).unwrap_or_else(|e| panic!("{e}"))
}

/// A default configuration for tests, with the shared cache.
/// A new data folder for a test manager, `$TMPDIR/arl-e2e-<pid>-*`. A test binary's shared
/// managers live as long as the process and are never dropped, so the first call also removes
/// the folders of test processes that are gone: they never pile up.
pub fn data_dir() -> PathBuf {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    let tmp = std::env::temp_dir();
    SWEPT.call_once(|| {
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("arl-e2e-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            if let Some(pid) = pid
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
    tempfile::Builder::new()
        .prefix(&format!("arl-e2e-{}-", std::process::id()))
        .tempdir_in(&tmp)
        .expect("a test data folder")
        .keep()
}

/// Runs `tests/clients/<script> <args>...` with the pinned PyPI `packages` importable, off the
/// async threads; panics with its output unless it exits 0 and prints `ok` last.
pub async fn run_client(script: &str, args: &[&str], packages: &[&str]) {
    let tools = pytools(packages);
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join(script);
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python())
            .arg(&script)
            .args(&args)
            .env("PYTHONPATH", &tools)
            .output()
            .expect("running a client script")
    })
    .await
    .expect("the client script's thread");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "the client failed:\n{stdout}\n{stderr}"
    );
    assert_eq!(stdout.lines().last(), Some("ok"), "{stdout}\n{stderr}");
}

pub fn config() -> ManagerConfig {
    let mut config = ManagerConfig::new(cache_dir());
    config.max_sessions = 64;
    config.max_memory_bytes = 1 << 30;
    config.reap_interval = Duration::from_millis(100);
    // No eviction under memory pressure unless a test asks for it: on a busy machine the
    // reaper would otherwise end sessions that tests still use.
    config.min_free_bytes = 0;
    config
}

/// The configuration the CPython test binaries share: roomy deadlines, 256 MiB sessions.
pub fn python_config() -> ManagerConfig {
    let mut c = config();
    c.defaults.timeout = Duration::from_secs(20);
    c.defaults.memory_bytes = 256 << 20;
    c.defaults.output_bytes = 64 << 10;
    c
}

/// What a test manager runs: ARL's runtimes (Python, JavaScript), guests by name, or some of
/// each.
#[derive(Debug, Clone, Default)]
pub struct Runtimes {
    pub python: bool,
    /// `javascript` and `typescript`.
    pub javascript: bool,
    pub guests: Vec<(&'static str, &'static str)>,
}

impl Runtimes {
    pub fn python() -> Self {
        Self {
            python: true,
            ..Self::default()
        }
    }

    pub fn javascript() -> Self {
        Self {
            javascript: true,
            ..Self::default()
        }
    }

    /// Python and JavaScript.
    pub fn ours() -> Self {
        Self {
            python: true,
            javascript: true,
            ..Self::default()
        }
    }

    /// Every guest, each as a runtime named after it.
    pub fn guests() -> Self {
        Self {
            guests: vec![
                ("counter", guests::COUNTER),
                ("spinner", guests::SPINNER),
                ("hog", guests::HOG),
                ("prober", guests::PROBER),
            ],
            ..Self::default()
        }
    }
}

impl Drop for TestManager {
    fn drop(&mut self) {
        self.stop_and_wait();
    }
}

/// A manager serving HTTP and gRPC on `127.0.0.1:<random ports>` from a thread with its own
/// tokio runtime, so that one manager can serve every test of a binary.
pub struct TestManager {
    /// `http://127.0.0.1:<port>` of the HTTP API.
    pub base: String,
    /// `http://127.0.0.1:<port>` of the gRPC API.
    pub grpc: String,
    pub registry: Registry,
    /// The data folder made for it (see [`data_dir`]), removed once it stops.
    data_dir: Option<PathBuf>,
    stop: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<std::io::Result<()>>>>,
}

impl TestManager {
    pub fn start(config: ManagerConfig, runtimes: Runtimes) -> Arc<TestManager> {
        Self::start_with(config, runtimes, ServeOptions::default())
    }

    pub fn start_with(
        config: ManagerConfig,
        runtimes: Runtimes,
        options: ServeOptions,
    ) -> Arc<TestManager> {
        let mut config = config;
        let data_dir = match &config.data_dir {
            Some(_) => None,
            None => {
                let dir = data_dir();
                config.data_dir = Some(dir.clone());
                Some(dir)
            }
        };
        let registry = Registry::new(config).expect("registry");
        let progress = |step: &str| eprintln!("test manager: {step}");
        if runtimes.javascript {
            registry
                .load_javascript(&progress)
                .expect("loading javascript");
        }
        if runtimes.python {
            registry.load_python(&progress).expect("loading python");
        }
        for (name, wasm) in runtimes.guests {
            registry
                .load_runtime(
                    RuntimeSpec {
                        name: name.into(),
                        wasm: wasm.into(),
                        digest: None,
                        protocol: Protocol::Raw,
                        mounts: vec![],
                        base_env: vec![("HOME".into(), "/workspace".into())],
                    },
                    &progress,
                )
                .expect("loading a guest");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = registry.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
                let (http, grpc) = (bind().await?, bind().await?);
                tx.send((http.local_addr()?, grpc.local_addr()?))
                    .expect("send");
                served.spawn_reaper();
                let listeners = Listeners {
                    http,
                    grpc: Some(grpc),
                };
                server::run(served, listeners, options, async {
                    let _ = stopped.await;
                })
                .await
            })
        });
        let (http, grpc) = rx.recv().expect("the manager's addresses");
        Arc::new(TestManager {
            base: format!("http://{http}"),
            grpc: format!("http://{grpc}"),
            registry,
            data_dir,
            stop: std::sync::Mutex::new(Some(stop)),
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Stops the manager and waits a moment for its thread, so that its sessions end and its
    /// data folder is removed (a test's own manager; the shared ones live as long as the
    /// binary). A client connection still open would hold the stop for the grace period: the
    /// wait ends after a few seconds whatever happens.
    fn stop_and_wait(&self) {
        self.stop();
        let thread = self.thread.lock().unwrap().take();
        if let Some(thread) = thread {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
            while !thread.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
                if let Some(dir) = &self.data_dir {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
        }
    }

    /// Starts a graceful stop, as SIGTERM does; `join` waits for it to finish.
    pub fn stop(&self) {
        if let Some(stop) = self.stop.lock().unwrap().take() {
            let _ = stop.send(());
        }
    }

    /// Waits (on a blocking thread) until the manager has stopped.
    pub async fn join(&self) -> std::io::Result<()> {
        let thread = self.thread.lock().unwrap().take().expect("joined once");
        tokio::task::spawn_blocking(move || thread.join().expect("the manager thread"))
            .await
            .expect("join")
    }

    /// A gRPC client of this manager.
    pub async fn grpc_client(
        &self,
    ) -> arl_proto::v1::sessions_client::SessionsClient<tonic::transport::Channel> {
        arl_proto::v1::sessions_client::SessionsClient::connect(self.grpc.clone())
            .await
            .expect("gRPC connect")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Creates a session with `body` and returns its id; panics unless 201.
    pub async fn create(&self, body: Value) -> String {
        let (status, v) = self.post("/v1/sessions", body).await;
        assert_eq!(status, 201, "create: {v}");
        v["id"].as_str().expect("id").to_owned()
    }

    /// Executes `code` in `id` and returns the body of the whole stream of events
    /// (`text/event-stream`).
    pub async fn exec_streamed(&self, id: &str, code: &str) -> String {
        let r = client()
            .post(self.url(&format!("/v1/sessions/{id}/execute")))
            .header("accept", "text/event-stream")
            .json(&serde_json::json!({ "code": code }))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 200);
        r.text().await.expect("body")
    }

    /// Executes `code` in `id`; panics unless 200.
    pub async fn exec(&self, id: &str, code: &str) -> Value {
        let (status, v) = self
            .post(
                &format!("/v1/sessions/{id}/execute"),
                serde_json::json!({ "code": code }),
            )
            .await;
        assert_eq!(status, 200, "execute {code:?}: {v}");
        v
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = client()
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("post");
        decode(r).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        decode(client().get(self.url(path)).send().await.expect("get")).await
    }

    /// Status and body text of a GET.
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let r = client().get(self.url(path)).send().await.expect("get");
        (r.status().as_u16(), r.text().await.expect("body"))
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        decode(
            client()
                .delete(self.url(path))
                .send()
                .await
                .expect("delete"),
        )
        .await
    }
}

/// A fresh HTTP client: a pooled connection belongs to the tokio runtime that opened it, and
/// each `#[tokio::test]` has its own runtime.
pub fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// Status and JSON body (`null` for an empty one) of a response.
pub async fn decode(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let bytes = r.bytes().await.expect("body");
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)))
    };
    (status, value)
}
