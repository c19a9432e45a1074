//! `arl-bench`: starts a real `arl-manager` and prints latency, throughput and density
//! figures, measured over HTTP (and gRPC) on loopback the way a client sees them. With
//! `--jupyter` it runs the same measurements against Jupyter Kernel Gateway on this machine
//! and prints the ratios; with `--gateway`, again through `arl-operator gateway` in front of
//! the same manager, to show what the cluster's extra hop costs. Fork, snapshot, restore and
//! rollback are measured against session size (small, numpy, pandas) unless `--skip-state`.
//!
//! ```text
//! cargo build --release -p arl-manager -p arl-operator -p arl-bench
//! ./target/release/arl-bench [--jupyter] [--gateway]
//! ```
#![forbid(unsafe_code)]

mod arl;
mod container;
mod egress;
mod javascript;
mod jupyter;
mod python_client;
mod state;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;

/// Benchmarks a real arl-manager over loopback, optionally beside Jupyter Kernel Gateway.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Bench {
    /// The manager binary [default: `arl-manager` next to this binary].
    #[arg(long)]
    manager: Option<PathBuf>,
    /// HTTP port for the manager under test; gRPC listens on the next one.
    #[arg(long, default_value_t = 18080)]
    port: u16,
    /// Samples per latency figure (fewer for the slow ones).
    #[arg(long, default_value_t = 1000)]
    iterations: usize,
    /// Idle sessions held open for the memory figure.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Concurrent clients for the throughput figure.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds the throughput figure runs for.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Also measure Jupyter Kernel Gateway (installed with pip into the cache on first use).
    #[arg(long)]
    jupyter: bool,
    /// Also measure through the gateway (`arl-operator gateway` next to this binary, in
    /// front of the same manager; build it with `cargo build --release -p arl-operator`).
    #[arg(long)]
    gateway: bool,
    /// Leave out fork, snapshot, restore and rollback against session size.
    #[arg(long, conflicts_with = "state_only")]
    skip_state: bool,
    /// Measure only fork, snapshot, restore and rollback against session size.
    #[arg(long)]
    state_only: bool,
    /// Measure only a container pod (arl-exec behind arl-manager --agent).
    #[arg(long, conflicts_with = "state_only")]
    container_only: bool,
    /// Also measure what ARL's Python client (`clients/python`) adds to an execute, beside a
    /// raw httpx POST (httpx installed with pip into the cache on first use).
    #[arg(long)]
    python_client: bool,
    /// Kernels held open for Jupyter's memory figure.
    #[arg(long, default_value_t = 20)]
    kernels: usize,
    /// More flags for `arl-manager serve`, e.g. `--manager-arg=--warm-sessions=0`.
    #[arg(long = "manager-arg", allow_hyphen_values = true)]
    manager_args: Vec<String>,
    /// Passed to the manager as --cache-dir; also where Jupyter is installed.
    #[arg(long, env = "ARL_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

/// Installs `packages` with pip into `cache/pytools` once; the folder for `PYTHONPATH`.
fn pytools(cache: &Path, python: &str, packages: &[&str]) -> anyhow::Result<PathBuf> {
    eprintln!(
        "arl-bench: {} (installed with pip on first use)",
        packages.join(" ")
    );
    arl_build_support::pytools(cache, python, packages).map_err(anyhow::Error::msg)
}

impl Bench {
    fn cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .or_else(|| dirs::cache_dir().map(|d| d.join("arl")))
            .unwrap_or_else(|| std::env::temp_dir().join("arl-cache"))
    }
}

/// What a measured system offers the benchmark: sessions that run Python cells.
pub(crate) trait Sandboxes {
    type Session: Send;
    async fn create(&self) -> anyhow::Result<Self::Session>;
    /// Runs `code`; answers its stdout and the repr of its result.
    async fn execute(
        &self,
        session: &mut Self::Session,
        code: &str,
    ) -> anyhow::Result<(String, Option<String>)>;
    async fn delete(&self, session: Self::Session) -> anyhow::Result<()>;
}

/// The figures measured on every system, by name, as (p50, p99) or a rate.
#[derive(Debug, Default)]
pub struct Figures {
    pub rows: Vec<(String, Figure)>,
}

#[derive(Debug, Clone, Copy)]
pub enum Figure {
    Latency { p50_ms: f64, p99_ms: f64 },
    PerSecond(f64),
    MiBPerSession(f64),
}

impl Figures {
    fn latency(&mut self, name: &str, samples: &mut [Duration]) {
        samples.sort();
        let at = |q: f64| {
            let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples[i].as_secs_f64() * 1e3
        };
        let (p50_ms, p99_ms) = (at(0.50), at(0.99));
        println!(
            "{name:<48} {p50_ms:>10.3} {p99_ms:>10.3} {:>10}",
            samples.len()
        );
        self.rows
            .push((name.to_owned(), Figure::Latency { p50_ms, p99_ms }));
    }

    fn add(&mut self, name: &str, figure: Figure, detail: &str) {
        match figure {
            Figure::PerSecond(n) => println!("{name:<40} {n:>10.0} /s {detail}"),
            Figure::MiBPerSession(m) => println!("{name:<40} {m:>10.2} MiB per session {detail}"),
            Figure::Latency { .. } => {}
        }
        self.rows.push((name.to_owned(), figure));
    }
}

fn header(what: &str) {
    println!("\n{what}");
    println!(
        "{:<48} {:>10} {:>10} {:>10}",
        "measure", "p50 ms", "p99 ms", "samples"
    );
}

/// The measurements both systems get.
async fn common<S: Sandboxes + Sync>(
    s: &S,
    iterations: usize,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<Figures> {
    let mut figures = Figures::default();
    for _ in 0..iterations.min(20) {
        let session = s.create().await?;
        s.delete(session).await?; // warm up
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        let session = s.create().await?;
        samples.push(t.elapsed());
        s.delete(session).await?;
    }
    figures.latency("create", &mut samples);

    let mut samples = Vec::new();
    for _ in 0..iterations.min(500) {
        let t = Instant::now();
        let mut session = s.create().await?;
        let (stdout, _) = s.execute(&mut session, "print(1)").await?;
        samples.push(t.elapsed());
        if stdout != "1\n" {
            bail!("print(1) printed {stdout:?}");
        }
        s.delete(session).await?;
    }
    figures.latency("create + first print(1)", &mut samples);

    let mut samples = Vec::new();
    for _ in 0..iterations.min(200) {
        let mut session = s.create().await?;
        s.execute(&mut session, "pass").await?;
        let t = Instant::now();
        s.execute(&mut session, "import numpy").await?;
        samples.push(t.elapsed());
        s.delete(session).await?;
    }
    figures.latency("import numpy, fresh session", &mut samples);

    let mut session = s.create().await?;
    s.execute(&mut session, "x = 1").await?;
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        let (_, result) = s.execute(&mut session, "x + 1").await?;
        samples.push(t.elapsed());
        if result.as_deref() != Some("2") {
            bail!("x + 1 answered {result:?}");
        }
    }
    figures.latency("execute x + 1", &mut samples);
    s.delete(session).await?;

    let rate = throughput(s, clients, Duration::from_secs(seconds)).await?;
    figures.add(
        &format!("execute x + 1, {clients} concurrent clients"),
        Figure::PerSecond(rate),
        "",
    );
    Ok(figures)
}

/// Executes per second with `clients` clients, each looping on its own session.
async fn throughput<S: Sandboxes + Sync>(
    s: &S,
    clients: usize,
    run: Duration,
) -> anyhow::Result<f64> {
    let mut sessions = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut session = s.create().await?;
        s.execute(&mut session, "x = 1").await?;
        sessions.push(session);
    }
    let started = Instant::now();
    let loops = sessions.iter_mut().map(|session| async move {
        let mut n = 0u64;
        while started.elapsed() < run {
            s.execute(session, "x + 1").await?;
            n += 1;
        }
        anyhow::Ok(n)
    });
    let counts = futures_util::future::try_join_all(loops).await?;
    let rate = counts.iter().sum::<u64>() as f64 / started.elapsed().as_secs_f64();
    for session in sessions {
        s.delete(session).await?;
    }
    Ok(rate)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bench = Bench::parse();
    println!("arl-bench: {}", machine());
    if bench.container_only {
        return container::run(&bench, &mut Figures::default()).await;
    }
    let mut ours = arl::run(&bench).await?;
    if !bench.state_only {
        container::run(&bench, &mut ours).await?;
    }
    if bench.jupyter {
        let theirs = jupyter::run(&bench).await?;
        ratios(&ours, &theirs);
    }
    Ok(())
}

fn ratios(ours: &Figures, theirs: &Figures) {
    println!("\nARL beside Jupyter Kernel Gateway (p50; ratio = how many times better ARL is)");
    println!(
        "{:<40} {:>14} {:>14} {:>10}",
        "measure", "ARL", "Jupyter", "ratio"
    );
    for (name, theirs) in &theirs.rows {
        let Some((_, ours)) = ours.rows.iter().find(|(n, _)| n == name) else {
            continue;
        };
        let (a, b, unit, ratio) = match (ours, theirs) {
            (Figure::Latency { p50_ms: a, .. }, Figure::Latency { p50_ms: b, .. }) => {
                (*a, *b, "ms", b / a)
            }
            (Figure::PerSecond(a), Figure::PerSecond(b)) => (*a, *b, "/s", a / b),
            (Figure::MiBPerSession(a), Figure::MiBPerSession(b)) => (*a, *b, "MiB", b / a),
            _ => continue,
        };
        println!("{name:<40} {a:>11.2} {unit:<2} {b:>11.2} {unit:<2} {ratio:>9.1}x");
    }
}

/// Private memory (clean + dirty, resident) of a process, from /proc/PID/smaps_rollup.
pub fn private_bytes(pid: u32) -> anyhow::Result<u64> {
    use anyhow::Context;
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
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or_else(String::new, |kib| format!(", {} GiB RAM", kib >> 20));
    format!("{cpus} CPUs ({model}){mem}")
}
