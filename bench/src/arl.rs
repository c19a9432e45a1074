//! ARL's side: a real `arl-manager serve`, driven over HTTP with one keep-alive client per
//! caller, plus the figures only ARL has (streaming, gRPC, files, idle sessions per GB).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arl_proto::v1 as pb;
use arl_proto::v1::sessions_client::SessionsClient;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::{Bench, Figure, Figures, Sandboxes, common, header, private_bytes};

pub(crate) struct Manager {
    child: Child,
    base: String,
    client: reqwest::Client,
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Manager {
    /// A session created with `body`.
    pub(crate) async fn create_with(&self, body: Value) -> anyhow::Result<String> {
        let (status, v) = self
            .request(reqwest::Method::POST, "/v1/sessions", Some(body))
            .await?;
        if status != 201 {
            bail!("create answered {status}: {v}");
        }
        Ok(v["id"].as_str().context("no id")?.to_owned())
    }

    pub(crate) async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut r = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            r = r.json(&body);
        }
        let response = r.send().await?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)?
        };
        Ok((status, value))
    }
}

impl Manager {
    /// The manager process's id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Sandboxes for Manager {
    type Session = String;

    async fn create(&self) -> anyhow::Result<String> {
        self.create_with(json!({})).await
    }

    async fn execute(
        &self,
        id: &mut String,
        code: &str,
    ) -> anyhow::Result<(String, Option<String>)> {
        let path = format!("/v1/sessions/{id}/execute");
        let (status, v) = self
            .request(reqwest::Method::POST, &path, Some(json!({ "code": code })))
            .await?;
        if status != 200 || !v["error"].is_null() {
            bail!("execute {code:?} answered {status}: {v}");
        }
        let stdout = v["stdout"].as_str().unwrap_or_default().to_owned();
        Ok((stdout, v["result"].as_str().map(str::to_owned)))
    }

    async fn delete(&self, id: String) -> anyhow::Result<()> {
        let (status, v) = self
            .request(reqwest::Method::DELETE, &format!("/v1/sessions/{id}"), None)
            .await?;
        if status != 204 {
            bail!("delete answered {status}: {v}");
        }
        Ok(())
    }
}

/// `name` next to this binary.
fn sibling(name: &str) -> anyhow::Result<std::path::PathBuf> {
    Ok(std::env::current_exe()?
        .parent()
        .context("this binary has no folder")?
        .join(name))
}

/// The server at `base`, once its /readyz answers 200.
async fn ready(child: Child, base: String) -> anyhow::Result<Manager> {
    let manager = Manager {
        child,
        base,
        client: reqwest::Client::builder().tcp_nodelay(true).build()?,
    };
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let ready = manager
            .client
            .get(format!("{}/readyz", manager.base))
            .send()
            .await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            return Ok(manager);
        }
        if Instant::now() > deadline {
            bail!("{} was not ready within 15 minutes", manager.base);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start(bench: &Bench) -> anyhow::Result<Manager> {
    let binary = match &bench.manager {
        Some(path) => path.clone(),
        None => sibling("arl-manager")?,
    };
    let mut command = Command::new(&binary);
    command
        .arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", bench.port))
        .arg("--grpc-listen")
        .arg(format!("127.0.0.1:{}", bench.port + 1))
        .arg("--max-sessions")
        .arg((bench.sessions + bench.clients + 64).to_string())
        .arg("--cache-dir")
        .arg(bench.cache_dir())
        .arg("--log")
        .arg("warn")
        .args(
            bench
                .gateway
                .then_some(["--id-prefix", GATEWAY_PREFIX])
                .into_iter()
                .flatten(),
        )
        .arg("--wheelhouse")
        .arg(crate::egress::wheelhouse(
            &bench.cache_dir().join("bench-wheelhouse"),
        )?)
        .args(&bench.manager_args)
        // Sessions stay live and unsaved through the figures, unless a flag says otherwise:
        // the suspend figures suspend on demand.
        .env("ARL_SUSPEND_AFTER_SECS", "0")
        .env("ARL_CHECKPOINT_EVERY_SECS", "0")
        // As the manager image runs it (deploy/docker/manager.Dockerfile).
        .env("MALLOC_ARENA_MAX", "2")
        .env("MALLOC_TRIM_THRESHOLD_", "262144")
        .stdout(Stdio::null());
    let child = command.spawn().with_context(|| {
        format!(
            "starting {} (build it with cargo build --release -p arl-manager)",
            binary.display()
        )
    })?;
    let manager = ready(child, format!("http://127.0.0.1:{}", bench.port)).await?;
    // Let the warm pool fill, as it would have in a pod that has been up for a second.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(manager)
}

/// `arl-operator gateway` in front of the manager on `bench.port`, on the two ports after.
async fn start_gateway(bench: &Bench) -> anyhow::Result<Manager> {
    let binary = sibling("arl-operator")?;
    let backend = format!(
        "{GATEWAY_PREFIX}=http://127.0.0.1:{}+127.0.0.1:{}",
        bench.port,
        bench.port + 1
    );
    let child = Command::new(&binary)
        .args(["gateway", "--backend", &backend, "--log", "warn"])
        .arg("--gateway-listen")
        .arg(format!("127.0.0.1:{}", bench.port + 2))
        .arg("--gateway-grpc-listen")
        .arg(format!("127.0.0.1:{}", bench.port + 3))
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build it with cargo build --release -p arl-operator)",
                binary.display()
            )
        })?;
    ready(child, format!("http://127.0.0.1:{}", bench.port + 2)).await
}

/// The manager's id prefix with `--gateway`: the gateway routes by it.
const GATEWAY_PREFIX: &str = "bench";

/// The common figures and a gRPC execute, through the gateway.
async fn through_gateway(bench: &Bench) -> anyhow::Result<Figures> {
    let gateway = start_gateway(bench).await?;
    header(&format!(
        "ARL through arl-operator gateway on {}",
        gateway.base
    ));
    let mut figures = common(&gateway, bench.iterations, bench.clients, bench.seconds).await?;
    let mut id = gateway.create().await?;
    gateway.execute(&mut id, "x = 1").await?;
    let grpc_url = format!("http://127.0.0.1:{}", bench.port + 3);
    let mut grpc = SessionsClient::connect(grpc_url).await?;
    let mut samples = Vec::with_capacity(bench.iterations);
    for _ in 0..bench.iterations {
        let t = Instant::now();
        let result = grpc_execute(&mut grpc, &id, "x + 1").await?;
        samples.push(t.elapsed());
        if result.as_deref() != Some("2") {
            bail!("gRPC x + 1 through the gateway answered {result:?}");
        }
    }
    figures.latency("gRPC execute x + 1", &mut samples);
    gateway.delete(id).await?;
    Ok(figures)
}

/// What the gateway adds to each figure both runs have.
fn gateway_cost(direct: &Figures, gateway: &Figures) {
    println!(
        "
The gateway's extra hop (p50 through it minus p50 direct)"
    );
    for (name, through) in &gateway.rows {
        let Some((_, direct)) = direct.rows.iter().find(|(n, _)| n == name) else {
            continue;
        };
        match (direct, through) {
            (Figure::Latency { p50_ms: d, .. }, Figure::Latency { p50_ms: g, .. }) => {
                println!("{name:<40} {:>+10.3} ms", g - d);
            }
            (Figure::PerSecond(d), Figure::PerSecond(g)) => {
                println!("{name:<40} {:>10.0} /s of {d:.0} /s", g);
            }
            _ => {}
        }
    }
}

pub async fn run(bench: &Bench) -> anyhow::Result<Figures> {
    let manager = start(bench).await?;
    if bench.state_only {
        let mut figures = Figures::default();
        crate::state::run(&manager, &mut figures, bench.iterations).await?;
        return Ok(figures);
    }
    header(&format!("ARL: arl-manager on {}", manager.base));
    let mut figures = common(&manager, bench.iterations, bench.clients, bench.seconds).await?;
    let n = bench.iterations;

    let mut samples = guest_part(&manager, n).await?;
    figures.latency("guest part of x + 1 (its duration_ms)", &mut samples);
    match wrk_rate(&manager, bench.clients, bench.seconds).await? {
        Some(rate) => figures.add(
            &format!("execute x + 1, {} clients (wrk)", bench.clients),
            Figure::PerSecond(rate),
            "(wrk, 2 threads, one connection per client)",
        ),
        None => println!(
            "  (wrk not found: `apt-get install wrk` for the load figure measured with it)"
        ),
    }

    // SandboxFusion's /run_code: a fresh session per program, as verl's reward loop sends.
    let mut samples = Vec::new();
    for _ in 0..n.min(200) {
        let t = Instant::now();
        run_code(&manager).await?;
        samples.push(t.elapsed());
    }
    figures.latency("run_code (HumanEval-style), one client", &mut samples);
    let rate = run_code_rate(&manager, bench.clients, Duration::from_secs(bench.seconds)).await?;
    figures.add(
        &format!("run_code (HumanEval-style), {} clients", bench.clients),
        Figure::PerSecond(rate),
        "(a fresh session per program)",
    );

    // Creates arriving 100 ms apart, so that the warm pool keeps up (back to back, as above,
    // the pool's refills compete with the creates for the same two cores).
    let (mut create, mut first) = (Vec::new(), Vec::new());
    for _ in 0..n.min(200) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        let mut id = manager.create().await?;
        create.push(t.elapsed());
        manager.execute(&mut id, "print(1)").await?;
        first.push(t.elapsed());
        manager.delete(id).await?;
    }
    figures.latency("create, 100 ms apart", &mut create);
    figures.latency("create + first print(1), 100 ms apart", &mut first);

    // E2B's SDK: `Sandbox.create()` then `run_code("1+1")`, as its requests go.
    let (mut create, mut first) = (Vec::new(), Vec::new());
    for _ in 0..n.min(200) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (created, ran) = e2b_create_and_run(&manager).await?;
        create.push(created);
        first.push(ran);
    }
    figures.latency("E2B Sandbox.create, 100 ms apart", &mut create);
    figures.latency("E2B create + first run_code(\"1+1\")", &mut first);

    let mut id = manager.create().await?;
    manager.execute(&mut id, "x = 1").await?;
    let mut samples = Vec::new();
    for _ in 0..n.min(500) {
        samples.push(first_streamed_chunk(&manager, &id, "print(1)").await?);
    }
    figures.latency("streamed print(1): first chunk", &mut samples);

    if bench.python_client {
        crate::python_client::run(bench, &manager.base, &mut figures)?;
    }

    crate::egress::run(&manager, &mut figures, n.min(500)).await?;
    crate::javascript::run(&manager, &mut figures, n.min(1000), bench.sessions.min(200)).await?;

    let grpc_url = format!("http://127.0.0.1:{}", bench.port + 1);
    let mut grpc = SessionsClient::connect(grpc_url).await?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let result = grpc_execute(&mut grpc, &id, "x + 1").await?;
        samples.push(t.elapsed());
        if result.as_deref() != Some("2") {
            bail!("gRPC x + 1 answered {result:?}");
        }
    }
    figures.latency("gRPC execute x + 1", &mut samples);

    let data: Vec<u8> = (0..10u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let url = format!("{}/v1/sessions/{id}/files/bench.bin", manager.base);
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let t = Instant::now();
        let status = manager
            .client
            .put(&url)
            .body(data.clone())
            .send()
            .await?
            .status();
        up.push(t.elapsed());
        let t = Instant::now();
        let back = manager.client.get(&url).send().await?.bytes().await?;
        down.push(t.elapsed());
        if !status.is_success() || back.len() != data.len() {
            bail!(
                "10 MiB upload answered {status}, download {} bytes",
                back.len()
            );
        }
    }
    figures.latency("upload 10 MiB", &mut up);
    figures.latency("download 10 MiB", &mut down);
    manager.delete(id).await?;

    if !bench.skip_state {
        crate::state::run(&manager, &mut figures, n).await?;
    }

    if bench.gateway {
        let through = through_gateway(bench).await?;
        gateway_cost(&figures, &through);
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = manager.child.id();
    let before = private_bytes(pid)?;
    let t = Instant::now();
    for _ in 0..bench.sessions {
        let mut id = manager.create().await?;
        manager.execute(&mut id, "x = 1").await?;
    }
    let opened = t.elapsed();
    // Past the second after which an idle session lets go of its rollback checkpoint.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = private_bytes(pid)?;
    let per = after.saturating_sub(before) as f64 / bench.sessions as f64 / f64::from(1 << 20);
    let detail = format!(
        "({} idle sessions, {:.0} MiB in all, {:.0} per GiB, opened in {:.1} s)",
        bench.sessions,
        after.saturating_sub(before) as f64 / f64::from(1 << 20),
        1024.0 / per,
        opened.as_secs_f64()
    );
    figures.add(
        "private memory per idle session",
        Figure::MiBPerSession(per),
        &detail,
    );
    let mut samples = trainer(&manager, RL_CLIENTS, Duration::from_secs(bench.seconds * 3)).await?;
    figures.latency(
        &format!(
            "x + 1, {RL_CLIENTS} clients each 1/s over {} sessions",
            bench.sessions
        ),
        &mut samples,
    );
    let (_, all) = manager
        .request(reqwest::Method::DELETE, "/sessions", None)
        .await?;
    if all["deleted"].as_u64() != Some(bench.sessions as u64) {
        bail!("expected {} sessions to delete, got {all}", bench.sessions);
    }
    Ok(figures)
}

/// The guest's own part of a trivial turn: the `duration_ms` the manager reports for `x + 1`
/// (the call into the instance, the cell and the driver's report through the door), without
/// HTTP, JSON or the hand-off to the session's task.
async fn guest_part(manager: &Manager, iterations: usize) -> anyhow::Result<Vec<Duration>> {
    let mut id = manager.create().await?;
    manager.execute(&mut id, "x = 1").await?;
    let path = format!("/v1/sessions/{id}/execute");
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let (status, v) = manager
            .request(
                reqwest::Method::POST,
                &path,
                Some(json!({ "code": "x + 1" })),
            )
            .await?;
        let ms = v["duration_ms"].as_f64().filter(|_| v["result"] == "2");
        let Some(ms) = ms.filter(|_| status == 200) else {
            bail!("x + 1 answered {status}: {v}");
        };
        samples.push(Duration::from_secs_f64(ms / 1e3));
    }
    manager.delete(id).await?;
    Ok(samples)
}

/// Executes of `x + 1` per second from `wrk` (a C load generator, far lighter on two cores
/// than this process's own client): `clients` connections over as many sessions, for
/// `seconds`. `None` when `wrk` is not installed.
async fn wrk_rate(manager: &Manager, clients: usize, seconds: u64) -> anyhow::Result<Option<f64>> {
    if Command::new("wrk").arg("--version").output().is_err() {
        return Ok(None);
    }
    let mut ids = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut id = manager.create().await?;
        manager.execute(&mut id, "x = 1").await?;
        ids.push(id);
    }
    // Each connection keeps to one session: wrk numbers its connections' requests per thread,
    // so a thread's requests go round its share of the sessions.
    let quoted: Vec<String> = ids.iter().map(|id| format!("\"{id}\"")).collect();
    let script = format!(
        r#"local ids = {{{}}}
local threads = 0
function setup(thread) thread:set("first", threads); threads = threads + 1 end
local n = 0
function request()
  n = n + 1
  local id = ids[((first + n * 2) % #ids) + 1]
  return wrk.format("POST", "/v1/sessions/" .. id .. "/execute",
    {{["Content-Type"] = "application/json"}}, '{{"code": "x + 1"}}')
end
"#,
        quoted.join(", ")
    );
    let file = std::env::temp_dir().join(format!("arl-bench-{}.lua", std::process::id()));
    std::fs::write(&file, script)?;
    let output = tokio::process::Command::new("wrk")
        .args([
            "-t",
            "2",
            "-c",
            &clients.to_string(),
            "-d",
            &format!("{seconds}s"),
            "-s",
        ])
        .arg(&file)
        .arg(&manager.base)
        .output()
        .await?;
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&output.stdout);
    if let Some(line) = text.lines().find(|l| l.contains("Non-2xx")) {
        bail!("wrk saw failures: {line}\n{text}");
    }
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no rate in wrk's output: {text}"))?;
    for id in ids {
        manager.delete(id).await?;
    }
    Ok(Some(rate))
}

/// Clients of an RL trainer: each steps one session a second with `x + 1`, round the sessions
/// open on the manager (a thousand, from the memory figure), for `run`; every step's latency.
const RL_CLIENTS: usize = 64;

async fn trainer(
    manager: &Manager,
    clients: usize,
    run: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let (_, v) = manager
        .request(reqwest::Method::GET, "/v1/sessions", None)
        .await?;
    let ids: Vec<String> = v["sessions"]
        .as_array()
        .context("GET /v1/sessions lists no sessions")?
        .iter()
        .filter_map(|s| s["id"].as_str().map(str::to_owned))
        .collect();
    if ids.is_empty() {
        bail!("no sessions to step");
    }
    let started = tokio::time::Instant::now();
    let ids = &ids;
    let loops = (0..clients).map(|c| async move {
        let mut samples = Vec::new();
        // Spread over the second, as independent trainers' steps are.
        let phase = Duration::from_secs(1).mul_f64(c as f64 / clients as f64);
        let mut tick = tokio::time::interval_at(started + phase, Duration::from_secs(1));
        let mut step = c;
        while started.elapsed() < run {
            tick.tick().await;
            let mut id = ids[step % ids.len()].clone();
            step += clients;
            let t = Instant::now();
            let (_, result) = manager.execute(&mut id, "x + 1").await?;
            samples.push(t.elapsed());
            if result.as_deref() != Some("2") {
                bail!("x + 1 answered {result:?}");
            }
        }
        anyhow::Ok(samples)
    });
    let all = futures_util::future::try_join_all(loops).await?;
    Ok(all.into_iter().flatten().collect())
}

/// A HumanEval-style program: a function and the asserts that check it.
const HUMANEVAL: &str = "\
from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    for idx, elem in enumerate(numbers):
        for idx2, elem2 in enumerate(numbers):
            if idx != idx2 and abs(elem - elem2) < threshold:
                return True
    return False


def check(candidate):
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False
    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True
    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.8) == False
    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True


check(has_close_elements)
print('passed')
";

/// One `/run_code` of [`HUMANEVAL`], checked.
async fn run_code(manager: &Manager) -> anyhow::Result<()> {
    let body = json!({
        "code": HUMANEVAL, "language": "python", "run_timeout": 10, "compile_timeout": 10,
        "stdin": null, "files": {}, "fetch_files": [],
    });
    let (_, v) = manager
        .request(reqwest::Method::POST, "/run_code", Some(body))
        .await?;
    if v["status"] != "Success" || v["run_result"]["stdout"] != "passed\n" {
        bail!("run_code answered {v}");
    }
    Ok(())
}

/// One E2B sandbox made as the SDK makes it, then its first `run_code("1+1")` (the NDJSON read
/// to its end and checked), then killed: the time to the create's answer, and to the run's end.
async fn e2b_create_and_run(manager: &Manager) -> anyhow::Result<(Duration, Duration)> {
    let t = Instant::now();
    let body = json!({
        "templateID": "code-interpreter-v1", "timeout": 300, "metadata": {}, "envVars": {},
    });
    let (status, v) = manager
        .request(reqwest::Method::POST, "/v2/sandboxes", Some(body))
        .await?;
    let created = t.elapsed();
    let Some(id) = v["sandboxID"].as_str().filter(|_| status == 201) else {
        bail!("POST /v2/sandboxes answered {status} {v}");
    };
    let lines = manager
        .client
        .post(format!("{}/execute", manager.base))
        .header("e2b-sandbox-id", id)
        .json(&json!({ "code": "1+1", "context_id": null, "language": null, "env_vars": null }))
        .send()
        .await?
        .text()
        .await?;
    let ran = t.elapsed();
    let main = lines
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| line["is_main_result"] == true);
    if main.as_ref().map(|m| &m["text"]) != Some(&json!("2")) {
        bail!("run_code(\"1+1\") answered {lines}");
    }
    manager
        .request(reqwest::Method::DELETE, &format!("/sandboxes/{id}"), None)
        .await?;
    Ok((created, ran))
}

/// `/run_code`s per second with `clients` clients, each sending one after another.
async fn run_code_rate(manager: &Manager, clients: usize, run: Duration) -> anyhow::Result<f64> {
    let started = Instant::now();
    let loops = (0..clients).map(|_| async move {
        let mut n = 0u64;
        while started.elapsed() < run {
            run_code(manager).await?;
            n += 1;
        }
        anyhow::Ok(n)
    });
    let counts = futures_util::future::try_join_all(loops).await?;
    Ok(counts.iter().sum::<u64>() as f64 / started.elapsed().as_secs_f64())
}

/// How long a streamed execute takes to deliver its first `stdout` event.
async fn first_streamed_chunk(manager: &Manager, id: &str, code: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let response = manager
        .client
        .post(format!("{}/v1/sessions/{id}/execute", manager.base))
        .header("accept", "text/event-stream")
        .json(&json!({ "code": code }))
        .send()
        .await?;
    let mut body = response.bytes_stream();
    let (mut seen, mut first) = (String::new(), None);
    while let Some(chunk) = body.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk?));
        if first.is_none() && seen.contains("event: stdout") {
            first = Some(t.elapsed());
        }
        if seen.contains("event: result") {
            break;
        }
    }
    first.with_context(|| format!("no stdout event in {seen}"))
}

async fn grpc_execute(
    grpc: &mut SessionsClient<tonic::transport::Channel>,
    id: &str,
    code: &str,
) -> anyhow::Result<Option<String>> {
    let mut events = grpc
        .execute(pb::ExecuteRequest {
            session_id: id.to_owned(),
            code: code.to_owned(),
            timeout_ms: None,
        })
        .await?
        .into_inner();
    while let Some(event) = events.message().await? {
        if let Some(pb::execute_event::Event::Result(r)) = event.event {
            return Ok(r.result);
        }
    }
    bail!("the gRPC stream ended without a result")
}
