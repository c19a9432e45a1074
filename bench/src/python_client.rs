//! What ARL's Python client (`clients/python`) adds to an execute: `bench/python_client.py`
//! times `x + 1` alternately through a raw httpx POST and through `arl.Client`, on one
//! session of the manager under test.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::{Bench, Figure, Figures};

/// The client's one dependency, pinned as its tests pin it.
const PACKAGES: [&str; 1] = ["httpx==0.29.0"];

pub fn run(bench: &Bench, base: &str, figures: &mut Figures) -> anyhow::Result<()> {
    let python = std::env::var("ARL_PYTHON").unwrap_or_else(|_| "python3".into());
    let tools = crate::pytools(&bench.cache_dir(), &python, &PACKAGES)?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let client = repo.join("clients").join("python").join("src");
    let path = format!("{}:{}", client.display(), tools.display());
    let out = Command::new(&python)
        .arg(repo.join("bench").join("python_client.py"))
        .arg(base)
        .arg(bench.iterations.to_string())
        .env("PYTHONPATH", path)
        .output()
        .with_context(|| format!("running {python}"))?;
    if !out.status.success() {
        bail!(
            "bench/python_client.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("its answer")?;
    let figure = |name: &str| -> anyhow::Result<(f64, f64)> {
        match (v[name][0].as_f64(), v[name][1].as_f64()) {
            (Some(p50), Some(p99)) => Ok((p50, p99)),
            _ => bail!("no {name} figures in {v}"),
        }
    };
    let (raw, ours) = (figure("raw")?, figure("client")?);
    for (name, (p50_ms, p99_ms)) in [
        ("execute x + 1, Python: raw httpx POST", raw),
        ("execute x + 1, Python: arl.Client", ours),
    ] {
        println!(
            "{name:<48} {p50_ms:>10.3} {p99_ms:>10.3} {:>10}",
            bench.iterations
        );
        figures.add(name, Figure::Latency { p50_ms, p99_ms }, "");
    }
    println!(
        "{:<48} {:>+10.3} ms p50",
        "what arl.Client adds",
        ours.0 - raw.0
    );
    Ok(())
}
