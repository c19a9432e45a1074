//! `arl-bench`: starts an `arl-manager` and prints latency, throughput and density figures,
//! measured over HTTP and gRPC on loopback the way a client sees them.
//!
//! ```text
//! cargo run --release -p arl-manager --bin arl-bench -- [--sessions 1000] [--iterations 1000]
//! ```
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arl_proto::v1 as pb;
use arl_proto::v1::sessions_client::SessionsClient;
use clap::Parser;
use serde_json::{Value, json};

/// Benchmarks a real arl-manager over HTTP on loopback.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Bench {
    /// The manager binary [default: `arl-manager` next to this binary].
    #[arg(long)]
    manager: Option<PathBuf>,
    /// HTTP port for the manager under test; gRPC listens on the next one.
    #[arg(long, default_value_t = 18080)]
    port: u16,
    /// Samples per latency figure.
    #[arg(long, default_value_t = 1000)]
    iterations: usize,
    /// Idle sessions held open for the memory figure.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Passed to the manager as --cache-dir.
    #[arg(long, env = "ARL_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

struct Manager {
    child: Child,
    base: String,
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bench = Bench::parse();
    let manager = start(&bench).await?;
    let client = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let n = bench.iterations;
    println!("arl-bench: {} on {}", machine(), manager.base);
    println!(
        "{:<34} {:>10} {:>10} {:>10}",
        "measure", "p50 ms", "p99 ms", "samples"
    );

    // Warm up the connection and the pool.
    for _ in 0..50 {
        let id = create(&client, &manager.base).await?;
        delete(&client, &manager.base, &id).await?;
    }

    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let id = create(&client, &manager.base).await?;
        samples.push(t.elapsed());
        delete(&client, &manager.base, &id).await?;
    }
    report("create", &mut samples);

    let mut samples = Vec::with_capacity(n);
    for _ in 0..n.min(500) {
        let t = Instant::now();
        let id = create(&client, &manager.base).await?;
        let v = execute(&client, &manager.base, &id, "print(1)").await?;
        samples.push(t.elapsed());
        if v["stdout"] != "1\n" {
            bail!("print(1) answered {v}");
        }
        delete(&client, &manager.base, &id).await?;
    }
    report("create + first print(1)", &mut samples);

    let id = create(&client, &manager.base).await?;
    execute(&client, &manager.base, &id, "x = 1").await?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let v = execute(&client, &manager.base, &id, "x + 1").await?;
        samples.push(t.elapsed());
        if v["result"] != "2" {
            bail!("x + 1 answered {v}");
        }
    }
    report("execute x + 1", &mut samples);

    let mut samples = Vec::with_capacity(n);
    for _ in 0..n.min(500) {
        samples.push(first_streamed_chunk(&client, &manager.base, &id, "print(1)").await?);
    }
    report("streamed print(1): first chunk", &mut samples);

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
    report("gRPC execute x + 1", &mut samples);

    let data: Vec<u8> = (0..10u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let url = format!("{}/v1/sessions/{id}/files/bench.bin", manager.base);
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let t = Instant::now();
        let status = client.put(&url).body(data.clone()).send().await?.status();
        up.push(t.elapsed());
        let t = Instant::now();
        let back = client.get(&url).send().await?.bytes().await?;
        down.push(t.elapsed());
        if !status.is_success() || back.len() != data.len() {
            bail!(
                "10 MiB upload answered {status}, download {} bytes",
                back.len()
            );
        }
    }
    for (name, samples) in [("upload 10 MiB", &mut up), ("download 10 MiB", &mut down)] {
        samples.sort();
        let p50 = samples[samples.len() / 2].as_secs_f64();
        println!(
            "{name:<34} {:>10.3} {:>10} {:>10}   {:.0} MiB/s",
            p50 * 1e3,
            "",
            samples.len(),
            10.0 / p50
        );
    }
    delete(&client, &manager.base, &id).await?;

    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = manager.child.id();
    let before = private_bytes(pid)?;
    let t = Instant::now();
    for _ in 0..bench.sessions {
        let id = create(&client, &manager.base).await?;
        execute(&client, &manager.base, &id, "x = 1").await?;
    }
    let opened = t.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = private_bytes(pid)?;
    let per = (after.saturating_sub(before)) as f64 / bench.sessions as f64;
    println!(
        "{:<34} {:>10.2} MiB private per session ({} sessions, {:.0} MiB in all, opened in {:.1} s)",
        "idle sessions",
        per / f64::from(1 << 20),
        bench.sessions,
        (after - before) as f64 / f64::from(1 << 20),
        opened.as_secs_f64()
    );
    let (_, all) = request(
        &client,
        reqwest::Method::DELETE,
        &format!("{}/sessions", manager.base),
        None,
    )
    .await?;
    if all["deleted"].as_u64() != Some(bench.sessions as u64) {
        bail!("expected {} sessions to delete, got {all}", bench.sessions);
    }
    Ok(())
}

async fn start(bench: &Bench) -> anyhow::Result<Manager> {
    let binary = match &bench.manager {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this binary has no folder")?
            .join("arl-manager"),
    };
    let mut command = Command::new(&binary);
    command
        .arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", bench.port))
        .arg("--grpc-listen")
        .arg(format!("127.0.0.1:{}", bench.port + 1))
        .arg("--max-sessions")
        .arg((bench.sessions + 64).to_string())
        .arg("--log")
        .arg("warn")
        .stdout(Stdio::null());
    if let Some(dir) = &bench.cache_dir {
        command.arg("--cache-dir").arg(dir);
    }
    let child = command.spawn().with_context(|| {
        format!(
            "starting {} (build it with cargo build --release)",
            binary.display()
        )
    })?;
    let manager = Manager {
        child,
        base: format!("http://127.0.0.1:{}", bench.port),
    };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let ready = client.get(format!("{}/readyz", manager.base)).send().await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            return Ok(manager);
        }
        if Instant::now() > deadline {
            bail!("the manager was not ready within 15 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn request(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut r = client.request(method, url);
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

async fn create(client: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let (status, v) = request(
        client,
        reqwest::Method::POST,
        &format!("{base}/v1/sessions"),
        Some(json!({})),
    )
    .await?;
    if status != 201 {
        bail!("create answered {status}: {v}");
    }
    Ok(v["id"].as_str().context("no id")?.to_owned())
}

async fn execute(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    code: &str,
) -> anyhow::Result<Value> {
    let url = format!("{base}/v1/sessions/{id}/execute");
    let (status, v) = request(
        client,
        reqwest::Method::POST,
        &url,
        Some(json!({ "code": code })),
    )
    .await?;
    if status != 200 {
        bail!("execute answered {status}: {v}");
    }
    Ok(v)
}

/// How long a streamed execute takes to deliver its first `stdout` event.
async fn first_streamed_chunk(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    code: &str,
) -> anyhow::Result<Duration> {
    use futures_util::StreamExt;
    let t = Instant::now();
    let response = client
        .post(format!("{base}/v1/sessions/{id}/execute"))
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

async fn delete(client: &reqwest::Client, base: &str, id: &str) -> anyhow::Result<()> {
    let (status, v) = request(
        client,
        reqwest::Method::DELETE,
        &format!("{base}/v1/sessions/{id}"),
        None,
    )
    .await?;
    if status != 204 {
        bail!("delete answered {status}: {v}");
    }
    Ok(())
}

fn report(name: &str, samples: &mut [Duration]) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1e3
    };
    println!(
        "{:<34} {:>10.3} {:>10.3} {:>10}",
        name,
        at(0.50),
        at(0.99),
        samples.len()
    );
}

/// Private memory (clean + dirty, resident) of a process, from /proc/PID/smaps_rollup.
fn private_bytes(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .context("reading smaps_rollup (Linux only)")?;
    let mut kib = 0;
    for line in text.lines() {
        if line.starts_with("Private_Clean:") || line.starts_with("Private_Dirty:") {
            kib += line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(kib * 1024)
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} CPUs ({model})")
}
