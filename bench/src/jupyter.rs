//! Jupyter's side: Jupyter Kernel Gateway with ipykernel (from PyPI, installed with pip into
//! the cache on first use), driven the way Jupyter clients drive it: REST for kernels, the
//! kernel's WebSocket channels for `execute_request`, done at `execute_reply` plus the iopub
//! `idle` status.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::{Bench, Figure, Figures, Sandboxes, common, header, private_bytes};

/// What pip installs, pinned. numpy so that `import numpy` measures the same thing.
const PACKAGES: [&str; 3] = [
    "jupyter-kernel-gateway==3.0.1",
    "ipykernel==7.4.0",
    "numpy==2.2.6",
];

/// Samples per latency figure: a kernel is a process, so a create costs about a second.
const ITERATIONS: usize = 30;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Gateway {
    child: Child,
    base: String,
    ws_base: String,
    client: reqwest::Client,
    _dirs: tempdir::TempDirs,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Kernel {
    id: String,
    session: String,
    socket: Socket,
}

/// Private folders for Jupyter's runtime, data and config, removed at the end.
mod tempdir {
    pub struct TempDirs(pub std::path::PathBuf);
    impl Drop for TempDirs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn start(bench: &Bench) -> anyhow::Result<Gateway> {
    let python = std::env::var("ARL_PYTHON").unwrap_or_else(|_| "python3".into());
    let site = crate::pytools(&bench.cache_dir(), &python, &PACKAGES)?;
    let port = bench.port + 10;
    let dirs = std::env::temp_dir().join(format!("arl-bench-jupyter-{}", std::process::id()));
    std::fs::create_dir_all(&dirs)?;
    let child = Command::new(&python)
        .args(["-m", "kernel_gateway"])
        .arg(format!("--KernelGatewayApp.port={port}"))
        .arg("--KernelGatewayApp.ip=127.0.0.1")
        .arg("--KernelGatewayApp.log_level=WARN")
        .env("PYTHONPATH", &site)
        .env("JUPYTER_RUNTIME_DIR", dirs.join("runtime"))
        .env("JUPYTER_DATA_DIR", dirs.join("data"))
        .env("JUPYTER_CONFIG_DIR", dirs.join("config"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting Jupyter Kernel Gateway")?;
    let gateway = Gateway {
        child,
        base: format!("http://127.0.0.1:{port}"),
        ws_base: format!("ws://127.0.0.1:{port}"),
        client: reqwest::Client::builder().tcp_nodelay(true).build()?,
        _dirs: tempdir::TempDirs(dirs),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = gateway
            .client
            .get(format!("{}/api", gateway.base))
            .send()
            .await;
        if up.is_ok_and(|r| r.status().is_success()) {
            return Ok(gateway);
        }
        if Instant::now() > deadline {
            bail!("Jupyter Kernel Gateway did not answer within a minute");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn message(session: &str, msg_type: &str, content: Value) -> (String, Message) {
    let id = uuid::Uuid::new_v4().to_string();
    let frame = json!({
        "header": {
            "msg_id": id, "username": "arl-bench", "session": session,
            "msg_type": msg_type, "version": "5.3", "date": "",
        },
        "parent_header": {}, "metadata": {}, "content": content, "channel": "shell",
    });
    (id, Message::text(frame.to_string()))
}

impl Gateway {
    /// Sends a shell request and reads until its reply and the kernel's `idle` after it.
    async fn call(
        &self,
        kernel: &mut Kernel,
        msg_type: &str,
        content: Value,
    ) -> anyhow::Result<(String, Option<String>)> {
        let (id, frame) = message(&kernel.session, msg_type, content);
        kernel.socket.send(frame).await?;
        let (mut stdout, mut result) = (String::new(), None);
        let (mut replied, mut idle) = (false, false);
        while !(replied && idle) {
            let Some(frame) = kernel.socket.next().await else {
                bail!("the kernel's socket closed");
            };
            let Message::Text(text) = frame? else {
                continue;
            };
            let m: Value = serde_json::from_str(&text)?;
            if m["parent_header"]["msg_id"] != id.as_str() {
                continue;
            }
            let content = &m["content"];
            match m["header"]["msg_type"].as_str().unwrap_or_default() {
                "stream" if content["name"] == "stdout" => {
                    stdout.push_str(content["text"].as_str().unwrap_or_default());
                }
                "execute_result" => {
                    result = content["data"]["text/plain"].as_str().map(str::to_owned);
                }
                "error" => bail!(
                    "the kernel raised {}: {}",
                    content["ename"],
                    content["evalue"]
                ),
                "status" => idle |= content["execution_state"] == "idle",
                t if t.ends_with("_reply") => replied = true,
                _ => {}
            }
        }
        Ok((stdout, result))
    }
}

impl Sandboxes for Gateway {
    type Session = Kernel;

    /// A kernel that answers: started, connected, and through `kernel_info`, as a client
    /// waits for one before its first cell.
    async fn create(&self) -> anyhow::Result<Kernel> {
        let r = self
            .client
            .post(format!("{}/api/kernels", self.base))
            .json(&json!({ "name": "python3" }))
            .send()
            .await?;
        let v: Value = r.json().await?;
        let id = v["id"].as_str().context("no kernel id")?.to_owned();
        let url = format!("{}/api/kernels/{id}/channels", self.ws_base);
        let (socket, _) = tokio_tungstenite::connect_async(url).await?;
        let mut kernel = Kernel {
            id,
            session: uuid::Uuid::new_v4().to_string(),
            socket,
        };
        self.call(&mut kernel, "kernel_info_request", json!({}))
            .await?;
        Ok(kernel)
    }

    async fn execute(
        &self,
        kernel: &mut Kernel,
        code: &str,
    ) -> anyhow::Result<(String, Option<String>)> {
        let content = json!({
            "code": code, "silent": false, "store_history": true,
            "user_expressions": {}, "allow_stdin": false, "stop_on_error": true,
        });
        self.call(kernel, "execute_request", content).await
    }

    async fn delete(&self, mut kernel: Kernel) -> anyhow::Result<()> {
        let _ = kernel.socket.close(None).await;
        let r = self
            .client
            .delete(format!("{}/api/kernels/{}", self.base, kernel.id))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("deleting a kernel answered {}", r.status());
        }
        Ok(())
    }
}

/// Private memory of every ipykernel process on the machine.
fn kernels_private_bytes() -> u64 {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("ipykernel_launcher"))
        })
        .filter_map(|pid| private_bytes(pid).ok())
        .sum()
}

pub async fn run(bench: &Bench) -> anyhow::Result<Figures> {
    let gateway = start(bench).await?;
    header(&format!(
        "Jupyter Kernel Gateway 3.0.1 + ipykernel on {}",
        gateway.base
    ));
    let mut figures = common(&gateway, ITERATIONS, bench.clients, bench.seconds).await?;
    let before = kernels_private_bytes();
    let mut open = Vec::new();
    for _ in 0..bench.kernels {
        let mut kernel = gateway.create().await?;
        gateway.execute(&mut kernel, "x = 1").await?;
        open.push(kernel);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = kernels_private_bytes().saturating_sub(before);
    let per = total as f64 / bench.kernels as f64 / f64::from(1 << 20);
    let detail = format!(
        "({} idle kernels, {:.0} per GiB)",
        bench.kernels,
        1024.0 / per
    );
    figures.add(
        "private memory per idle session",
        Figure::MiBPerSession(per),
        &detail,
    );
    for kernel in open {
        gateway.delete(kernel).await?;
    }
    Ok(figures)
}
