//! JavaScript beside Python, each in ARL over loopback HTTP, and beside Node's own `vm`
//! contexts in one Node process (no HTTP, no isolation between contexts beyond the realm):
//! create, create + first output, `x + 1`, fork of a small session, idle memory per session.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::arl::Manager;
use crate::{Figure, Figures, Sandboxes, header, private_bytes};

/// One runtime's cells for the measures.
struct Cells {
    runtime: &'static str,
    print: &'static str,
    set: &'static str,
}

const RUNTIMES: [Cells; 2] = [
    Cells {
        runtime: "javascript",
        print: "console.log(1)",
        set: "let x = 1",
    },
    Cells {
        runtime: "python",
        print: "print(1)",
        set: "x = 1",
    },
];

const MEASURES: [&str; 5] = [
    "create",
    "create + first output",
    "execute x + 1",
    "fork, small session",
    "private memory per idle session",
];

/// Measures both runtimes and Node, prints them side by side, and adds the JavaScript rows to
/// `figures` (as `javascript: <measure>`).
pub async fn run(
    manager: &Manager,
    figures: &mut Figures,
    n: usize,
    sessions: usize,
) -> anyhow::Result<()> {
    let mut columns = Vec::new();
    for cells in &RUNTIMES {
        header(&format!("ARL {} sessions", cells.runtime));
        let mut mine = Figures::default();
        measure(manager, cells, &mut mine, n, sessions).await?;
        if cells.runtime == "javascript" {
            for (name, figure) in &mine.rows {
                figures.rows.push((format!("javascript: {name}"), *figure));
            }
        }
        columns.push((format!("ARL {}", cells.runtime), mine));
    }
    match node_vm(n, sessions) {
        Ok(node) => columns.push(("Node vm".to_owned(), node)),
        Err(e) => println!("\n(Node's vm anchor skipped: {e:#})"),
    }
    println!("\nJavaScript beside Python and Node's vm (p50; memory in MiB per session)");
    print!("{:<34}", "measure");
    for (name, _) in &columns {
        print!(" {name:>16}");
    }
    println!();
    for measure in MEASURES {
        print!("{measure:<34}");
        for (_, figures) in &columns {
            let shown = match figures.rows.iter().find(|(n, _)| n == measure) {
                Some((_, Figure::Latency { p50_ms, .. })) => format!("{p50_ms:.3} ms"),
                Some((_, Figure::MiBPerSession(m))) => format!("{m:.2} MiB"),
                Some((_, Figure::PerSecond(r))) => format!("{r:.0} /s"),
                None => "n/a".to_owned(),
            };
            print!(" {shown:>16}");
        }
        println!();
    }
    println!(
        "(ARL's figures include a loopback HTTP round trip, about 0.1 ms; Node's are calls in \
         one process. Node has no fork of a context.)"
    );
    Ok(())
}

async fn measure(
    manager: &Manager,
    cells: &Cells,
    figures: &mut Figures,
    n: usize,
    sessions: usize,
) -> anyhow::Result<()> {
    let body = json!({ "runtime": cells.runtime });
    for _ in 0..20 {
        let id = manager.create_with(body.clone()).await?;
        manager.delete(id).await?; // warm up
    }
    let mut samples = Vec::new();
    for _ in 0..n.min(300) {
        // Apart, so that the warm pool refills between creates, as for Python's row.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t = Instant::now();
        let id = manager.create_with(body.clone()).await?;
        samples.push(t.elapsed());
        manager.delete(id).await?;
    }
    figures.latency("create", &mut samples);

    let mut samples = Vec::new();
    for _ in 0..n.min(300) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t = Instant::now();
        let mut id = manager.create_with(body.clone()).await?;
        let (stdout, _) = manager.execute(&mut id, cells.print).await?;
        samples.push(t.elapsed());
        if stdout != "1\n" {
            bail!("{} printed {stdout:?}", cells.print);
        }
        manager.delete(id).await?;
    }
    figures.latency("create + first output", &mut samples);

    let mut id = manager.create_with(body.clone()).await?;
    manager.execute(&mut id, cells.set).await?;
    let mut samples = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let (_, result) = manager.execute(&mut id, "x + 1").await?;
        samples.push(t.elapsed());
        if result.as_deref() != Some("2") {
            bail!("x + 1 answered {result:?}");
        }
    }
    figures.latency("execute x + 1", &mut samples);

    let mut samples = Vec::new();
    for _ in 0..n.min(300) {
        let t = Instant::now();
        let (status, fork) = manager
            .request(
                reqwest::Method::POST,
                &format!("/v1/sessions/{id}/fork"),
                Some(json!({})),
            )
            .await?;
        samples.push(t.elapsed());
        let fork = fork["id"].as_str().filter(|_| status == 201);
        let fork = fork.with_context(|| format!("fork answered {status}"))?;
        manager.delete(fork.to_owned()).await?;
    }
    figures.latency("fork, small session", &mut samples);
    manager.delete(id).await?;

    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = manager.pid();
    let before = private_bytes(pid)?;
    let mut ids = Vec::with_capacity(sessions);
    for _ in 0..sessions {
        let mut id = manager.create_with(body.clone()).await?;
        manager.execute(&mut id, cells.set).await?;
        ids.push(id);
    }
    // Past the second after which an idle session lets go of its rollback checkpoint.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = private_bytes(pid)?;
    let per = after.saturating_sub(before) as f64 / sessions as f64 / f64::from(1 << 20);
    figures.add(
        "private memory per idle session",
        Figure::MiBPerSession(per),
        &format!("({sessions} idle sessions)"),
    );
    for id in ids {
        manager.delete(id).await?;
    }
    Ok(())
}

/// Node's `vm` module as a REPL host would use it, measured inside one `node` process.
/// Memory is measured in a `node` of its own ([`NODE_VM_MEMORY`]): here the timing loops'
/// garbage would hide it.
const NODE_VM: &str = r#"
const vm = require('vm');
const [n, sessions] = process.argv.slice(1).map(Number);
const ms = (t) => Number(process.hrtime.bigint() - t) / 1e6;
const stats = (xs) => { xs.sort((a, b) => a - b); const at = (q) => xs[Math.round((xs.length - 1) * q)]; return [at(0.5), at(0.99)]; };
const out = {};
let xs = [];
for (let i = 0; i < Math.min(n, 300); i++) { const t = process.hrtime.bigint(); vm.createContext({}); xs.push(ms(t)); }
out['create'] = stats(xs);
xs = [];
for (let i = 0; i < Math.min(n, 300); i++) {
  const t = process.hrtime.bigint();
  let printed = '';
  const c = vm.createContext({ console: { log: (...a) => { printed += a.join(' ') + '\n'; } } });
  vm.runInContext('console.log(1)', c);
  xs.push(ms(t));
  if (printed !== '1\n') throw new Error('printed ' + printed);
}
out['create + first output'] = stats(xs);
const c = vm.createContext({});
vm.runInContext('let x = 1', c);
xs = [];
for (let i = 0; i < n; i++) { const t = process.hrtime.bigint(); const r = vm.runInContext('x + 1', c); xs.push(ms(t)); if (r !== 2) throw new Error(String(r)); }
out['execute x + 1'] = stats(xs);
console.log(JSON.stringify(out));
"#;

/// Private memory per idle context: RSS before and after `sessions` contexts each holding a
/// global, in a fresh process, collected before each reading.
const NODE_VM_MEMORY: &str = r#"
const vm = require('vm');
const sessions = Number(process.argv[1]);
const settle = () => { for (let i = 0; i < 3; i++) global.gc(); };
vm.runInContext('let x = 1', vm.createContext({}));
settle();
const before = process.memoryUsage().rss;
const held = [];
for (let i = 0; i < sessions; i++) { const k = vm.createContext({}); vm.runInContext('let x = 1', k); held.push(k); }
settle();
console.log(JSON.stringify({ 'private memory per idle session': (process.memoryUsage().rss - before) / sessions / 1048576, held: held.length }));
"#;

fn node(script: &str, args: &[String]) -> anyhow::Result<Value> {
    let out = std::process::Command::new("node")
        .args(["--expose-gc", "-e", script])
        .args(args)
        .output()
        .context("running node (install Node.js for the anchor)")?;
    if !out.status.success() {
        bail!("node failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn node_vm(n: usize, sessions: usize) -> anyhow::Result<Figures> {
    let mut v = node(NODE_VM, &[n.to_string(), sessions.to_string()])?;
    let memory = node(NODE_VM_MEMORY, &[sessions.to_string()])?;
    if let (Some(v), Some(memory)) = (v.as_object_mut(), memory.as_object()) {
        v.extend(memory.clone());
    }
    let version = std::process::Command::new("node")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    header(&format!("Node {version} vm contexts, in one process"));
    let mut figures = Figures::default();
    for measure in MEASURES {
        match &v[measure] {
            Value::Array(pair) => {
                let p50_ms = pair[0].as_f64().unwrap_or_default();
                let p99_ms = pair[1].as_f64().unwrap_or_default();
                println!("{measure:<48} {p50_ms:>10.3} {p99_ms:>10.3}");
                figures
                    .rows
                    .push((measure.to_owned(), Figure::Latency { p50_ms, p99_ms }));
            }
            Value::Number(mib) => {
                figures.add(
                    measure,
                    Figure::MiBPerSession(mib.as_f64().unwrap_or_default()),
                    &format!("({sessions} contexts, RSS)"),
                );
            }
            _ => {}
        }
    }
    Ok(figures)
}
