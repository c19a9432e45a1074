//! A container pool's pod on this machine: `arl-exec` (next to this binary) on a Unix socket
//! and `arl-manager serve --agent` in front of it, as in a pod. Prints a command round trip
//! (`true`) spawned directly, through the agent's gRPC, and through the manager's HTTP
//! session API, with what each layer adds; and claiming and resetting the pod.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arl_exec::Executor;
use serde_json::{Value, json};

use crate::{Bench, Figure, Figures, header};

/// Kills a child when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn p50(figures: &Figures, name: &str) -> f64 {
    figures
        .rows
        .iter()
        .find_map(|(n, f)| match f {
            Figure::Latency { p50_ms, .. } if n == name => Some(*p50_ms),
            _ => None,
        })
        .unwrap_or(f64::NAN)
}

pub async fn run(bench: &Bench, figures: &mut Figures) -> anyhow::Result<()> {
    let n = bench.iterations.min(1000);
    let dir = tempfile::tempdir()?;
    let (socket, workspace) = (dir.path().join("agent.sock"), dir.path().join("workspace"));
    let exe = std::env::current_exe()?;
    let folder = exe.parent().context("this binary has no folder")?;
    let _agent = Child(
        Command::new(folder.join("arl-exec"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--workspace")
            .arg(&workspace)
            .args(["--log", "warn"])
            .stdout(Stdio::null())
            .spawn()
            .context("starting arl-exec (build it with cargo build --release -p arl-exec)")?,
    );
    let port = bench.port + 4;
    let base = format!("http://127.0.0.1:{port}");
    let manager_bin = bench
        .manager
        .clone()
        .unwrap_or_else(|| folder.join("arl-manager"));
    let _manager = Child(
        Command::new(manager_bin)
            .arg("serve")
            .arg("--agent")
            .arg(format!("unix:{}", socket.display()))
            .arg("--workspace")
            .arg(&workspace)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--grpc-listen")
            .arg(format!("127.0.0.1:{}", port + 1))
            .args(["--log", "warn"])
            .stdout(Stdio::null())
            .spawn()
            .context("starting arl-manager --agent")?,
    );
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if Instant::now() > deadline {
            bail!("the container pod at {base} was not ready within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    header("Container runtime: arl-exec behind arl-manager --agent (a pod of a container pool)");

    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let status = tokio::process::Command::new("true")
            .process_group(0)
            .status()
            .await?;
        samples.push(t.elapsed());
        if !status.success() {
            bail!("`true` failed");
        }
    }
    figures.latency("container: spawn `true` directly", &mut samples);

    let agent = arl_exec::grpc::RemoteAgent::new(&arl_exec::Address::Unix(socket.clone()))?;
    let request = || arl_proto::sidecar::ExecRequest {
        command: vec!["true".into()],
        ..Default::default()
    };
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let log = agent.execute(request()).await?;
        let result = arl_exec::http::collect(log, false, t).await?;
        samples.push(t.elapsed());
        if result.exit_code != Some(0) {
            bail!("`true` through the agent answered {result:?}");
        }
    }
    figures.latency("container: `true` via arl-exec gRPC (socket)", &mut samples);

    let created: Value = http
        .post(format!("{base}/v1/sessions"))
        .json(&json!({"runtime": "container"}))
        .send()
        .await?
        .json()
        .await?;
    let id = created["id"].as_str().context("no session id")?.to_owned();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let v: Value = http
            .post(format!("{base}/v1/sessions/{id}/commands"))
            .json(&json!({"command": ["true"]}))
            .send()
            .await?
            .json()
            .await?;
        samples.push(t.elapsed());
        if v["exit_code"] != 0 {
            bail!("`true` through the manager answered {v}");
        }
    }
    figures.latency("container: `true` via arl-manager HTTP", &mut samples);
    http.delete(format!("{base}/v1/sessions/{id}"))
        .send()
        .await?;

    let mut samples = Vec::with_capacity(n.min(200));
    for _ in 0..n.min(200) {
        let t = Instant::now();
        let created: Value = http
            .post(format!("{base}/v1/sessions"))
            .json(&json!({}))
            .send()
            .await?
            .json()
            .await?;
        let id = created["id"].as_str().context("no session id")?;
        let deleted = http
            .delete(format!("{base}/v1/sessions/{id}"))
            .send()
            .await?;
        samples.push(t.elapsed());
        if deleted.status() != 204 {
            bail!("delete answered {}", deleted.status());
        }
    }
    figures.latency(
        "container: claim + reset the pod (create, delete)",
        &mut samples,
    );

    let direct = p50(figures, "container: spawn `true` directly");
    let agent = p50(figures, "container: `true` via arl-exec gRPC (socket)");
    let manager = p50(figures, "container: `true` via arl-manager HTTP");
    println!(
        "container: overhead over a direct spawn (p50): agent {:+.3} ms, manager in front {:+.3} ms",
        agent - direct,
        manager - direct
    );
    Ok(())
}
