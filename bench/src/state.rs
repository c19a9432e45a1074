//! What is made of a session's state, against how much of it there is: fork, snapshot,
//! restore from a snapshot, suspend to the store and resume, and roll back a timed-out turn,
//! for a small session and for ones that hold a numpy array and a pandas frame; the disk a
//! suspended session takes; and what keeping a turn's checkpoint costs an ordinary execute.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::arl::Manager;
use crate::{Figures, Sandboxes, header};

/// A session's size, and the cell that makes it so.
const TIERS: [(&str, &str); 3] = [
    ("small", "x = 1"),
    (
        "numpy",
        "import numpy as np\na = np.random.default_rng(1).random(2_000_000)",
    ),
    (
        "pandas",
        "import numpy as np, pandas as pd\n\
         df = pd.DataFrame(np.random.default_rng(1).random((500_000, 8)), columns=list('abcdefgh'))",
    ),
];

pub async fn run(
    manager: &Manager,
    figures: &mut Figures,
    iterations: usize,
) -> anyhow::Result<()> {
    for (tier, setup) in TIERS {
        let mut id = manager.create().await?;
        manager.execute(&mut id, setup).await?;
        let (_, snap) = post(manager, &format!("/v1/sessions/{id}/snapshot"), 201).await?;
        let state_mib = mib(&snap["state_bytes"]);
        header(&format!(
            "state of a {tier} session: {state_mib:.1} MiB written over the image, snapshot {:.1} MiB on disk, memory {:.0} MiB",
            mib(&snap["size_bytes"]),
            mib(&snap["memory_bytes"]),
        ));
        let name = |what: &str| format!("{what} ({tier}, {state_mib:.1} MiB)");

        // The fork answers once its instance exists; its state is put in before its first
        // turn, as a new session's bootstrap runs after its create has answered. So: forks
        // alone, each on a quiet manager (the previous one idle, then deleted), then forks
        // with their first turn (which pays for putting the state in, reseeding `random` and
        // `numpy.random`, and faulting in the pages it reads).
        let mut samples = Vec::new();
        for _ in 0..iterations.min(200) {
            let t = Instant::now();
            let (_, fork) = post(manager, &format!("/v1/sessions/{id}/fork"), 201).await?;
            samples.push(t.elapsed());
            let fork = string(&fork["id"])?;
            wait_idle(manager, &fork).await?;
            manager.delete(fork).await?;
        }
        figures.latency(&name("fork"), &mut samples);
        let mut samples = Vec::new();
        for _ in 0..iterations.min(100) {
            let t = Instant::now();
            let (_, fork) = post(manager, &format!("/v1/sessions/{id}/fork"), 201).await?;
            let mut fork = string(&fork["id"])?;
            manager.execute(&mut fork, "1").await?;
            samples.push(t.elapsed());
            manager.delete(fork).await?;
        }
        figures.latency(&name("fork + its first execute"), &mut samples);

        let mut samples = Vec::new();
        for _ in 0..iterations.min(40) {
            let t = Instant::now();
            let (_, taken) = post(manager, &format!("/v1/sessions/{id}/snapshot"), 201).await?;
            samples.push(t.elapsed());
            delete(manager, &format!("/v1/snapshots/{}", string(&taken["id"])?)).await?;
        }
        figures.latency(&name("snapshot to disk"), &mut samples);

        let snap_id = string(&snap["id"])?;
        let mut samples = Vec::new();
        for _ in 0..iterations.min(40) {
            let t = Instant::now();
            let body = json!({ "from_snapshot": snap_id });
            let (_, restored) = manager
                .request(reqwest::Method::POST, "/v1/sessions", Some(body))
                .await?;
            samples.push(t.elapsed());
            manager
                .delete(string(&restored["id"]).context("restore")?)
                .await?;
        }
        figures.latency(&name("restore from disk"), &mut samples);
        delete(manager, &format!("/v1/snapshots/{snap_id}")).await?;

        // Suspend to the store and resume on demand; then the transparent path, an execute
        // sent to a suspended session.
        let (mut suspends, mut resumes, mut touches) = (Vec::new(), Vec::new(), Vec::new());
        let mut stored = 0.0;
        for _ in 0..iterations.min(40) {
            let t = Instant::now();
            let (_, v) = post(manager, &format!("/v1/sessions/{id}/suspend"), 200).await?;
            suspends.push(t.elapsed());
            stored = mib(&v["stored_bytes"]);
            let t = Instant::now();
            post(manager, &format!("/v1/sessions/{id}/resume"), 200).await?;
            resumes.push(t.elapsed());
            wait_idle(manager, &id).await?;
            post(manager, &format!("/v1/sessions/{id}/suspend"), 200).await?;
            let t = Instant::now();
            manager.execute(&mut id, "1").await?;
            touches.push(t.elapsed());
        }
        figures.latency(&name("suspend to the store"), &mut suspends);
        figures.latency(&name("resume"), &mut resumes);
        figures.latency(&name("execute 1 on a suspended session"), &mut touches);
        println!("  disk per suspended {tier} session: {stored:.2} MiB");

        // The answer's latency less the turn's own time (its 20 ms deadline): the rollback,
        // plus one HTTP exchange.
        let mut samples = Vec::new();
        for _ in 0..iterations.min(40) {
            let body = json!({ "code": "while True: pass", "timeout_ms": 20 });
            let path = format!("/v1/sessions/{id}/execute");
            let t = Instant::now();
            let (_, v) = manager
                .request(reqwest::Method::POST, &path, Some(body))
                .await?;
            let total = t.elapsed();
            if v["rolled_back"] != true {
                bail!("the spin was not rolled back: {v}");
            }
            let turn = Duration::from_secs_f64(v["duration_ms"].as_f64().unwrap_or(0.0) / 1e3);
            samples.push(total.saturating_sub(turn));
        }
        figures.latency(&name("rollback after a deadline"), &mut samples);

        // An execute on this session, then on one like it that does not roll back (no
        // checkpoint to keep up to date after each turn).
        let mut plain = manager.create_with(json!({ "rollback": false })).await?;
        manager.execute(&mut plain, setup).await?;
        for (what, session) in [
            ("execute 1, rollback on", &mut id),
            ("execute 1, rollback off", &mut plain),
        ] {
            let mut samples = Vec::new();
            for _ in 0..iterations.min(300) {
                let t = Instant::now();
                manager.execute(session, "1").await?;
                samples.push(t.elapsed());
            }
            figures.latency(&name(what), &mut samples);
        }
        manager.delete(plain).await?;
        manager.delete(id).await?;
    }
    checkpoint_of_writes(manager, figures, iterations).await
}

/// What the checkpoint costs after a turn that writes 16 MiB, in a session that holds 80 MiB
/// (the pandas frame and the array written): the time of the `1` that follows it, which waits
/// for the checkpoint to be brought up to date, with rollback on and off.
async fn checkpoint_of_writes(
    manager: &Manager,
    figures: &mut Figures,
    iterations: usize,
) -> anyhow::Result<()> {
    let setup = format!("{}\nb = np.zeros(2_097_152)", TIERS[2].1);
    header("checkpoint after a turn that writes 16 MiB, in a session holding 80 MiB");
    for (what, rollback) in [("rollback on", true), ("rollback off", false)] {
        let mut id = manager.create_with(json!({ "rollback": rollback })).await?;
        manager.execute(&mut id, &setup).await?;
        let mut samples = Vec::new();
        for _ in 0..iterations.min(100) {
            manager.execute(&mut id, "b += 1").await?;
            let t = Instant::now();
            manager.execute(&mut id, "1").await?;
            samples.push(t.elapsed());
        }
        figures.latency(
            &format!("execute 1 after 16 MiB written, {what}"),
            &mut samples,
        );
        manager.delete(id).await?;
    }
    Ok(())
}

/// Waits until session `id` has started: its state is in and it is at rest.
async fn wait_idle(manager: &Manager, id: &str) -> anyhow::Result<()> {
    let path = format!("/v1/sessions/{id}");
    for _ in 0..10_000 {
        let (_, v) = manager.request(reqwest::Method::GET, &path, None).await?;
        if v["state"] == "idle" {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    bail!("{id} did not start")
}

async fn post(manager: &Manager, path: &str, expect: u16) -> anyhow::Result<(u16, Value)> {
    let (status, v) = manager.request(reqwest::Method::POST, path, None).await?;
    if status != expect {
        bail!("POST {path} answered {status}: {v}");
    }
    Ok((status, v))
}

async fn delete(manager: &Manager, path: &str) -> anyhow::Result<()> {
    let (status, v) = manager.request(reqwest::Method::DELETE, path, None).await?;
    if status != 204 {
        bail!("DELETE {path} answered {status}: {v}");
    }
    Ok(())
}

fn string(v: &Value) -> anyhow::Result<String> {
    Ok(v.as_str()
        .with_context(|| format!("not a string: {v}"))?
        .to_owned())
}

fn mib(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0) / f64::from(1 << 20)
}
