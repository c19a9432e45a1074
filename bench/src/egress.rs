//! What leaving the sandbox costs: a GET brokered by the manager for the guest's
//! `urllib.request`, beside the same GET made by the host itself, and `%pip install` of a
//! small wheel from a wheelhouse.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;

use crate::arl::Manager;
use crate::{Figures, Sandboxes};

/// The wheel `%pip install` takes, written into `dir` (the manager's `--wheelhouse`).
pub fn wheelhouse(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut bytes);
        let options = zip::write::SimpleFileOptions::default();
        for (path, content) in [
            ("benchpkg/__init__.py", "def add(a, b):\n    return a + b\n"),
            (
                "benchpkg-1.0.dist-info/METADATA",
                "Metadata-Version: 2.1\nName: benchpkg\nVersion: 1.0\n",
            ),
            (
                "benchpkg-1.0.dist-info/WHEEL",
                "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n",
            ),
            ("benchpkg-1.0.dist-info/RECORD", ""),
        ] {
            zip.start_file(path, options)?;
            zip.write_all(content.as_bytes())?;
        }
        zip.finish()?;
    }
    std::fs::write(
        dir.join("benchpkg-1.0-py3-none-any.whl"),
        bytes.into_inner(),
    )?;
    Ok(dir.to_owned())
}

/// A local server for the GETs: `/hello` answers 13 bytes.
async fn serve() -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let app =
        axum::Router::new().route("/hello", axum::routing::get(|| async { "hello, world\n" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(port)
}

pub async fn run(manager: &Manager, figures: &mut Figures, n: usize) -> anyhow::Result<()> {
    // Within a session's default budget of 1,000 requests: n timed, n in the guest's loop.
    let n = n.min(450);
    let port = serve().await?;
    let url = format!("http://127.0.0.1:{port}/hello");

    let host = reqwest::Client::new();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let body = host.get(&url).send().await?.bytes().await?;
        samples.push(t.elapsed());
        if body.len() != 13 {
            bail!("the host's GET read {} bytes", body.len());
        }
    }
    figures.latency("GET from the host (reqwest, kept alive)", &mut samples);

    let mut id = manager
        .create_with(json!({"network": {"allow": [format!("127.0.0.1:{port}")]}}))
        .await?;
    let get = format!("import urllib.request\nlen(urllib.request.urlopen({url:?}).read())");
    manager.execute(&mut id, &get).await?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let (_, result) = manager.execute(&mut id, &get).await?;
        samples.push(t.elapsed());
        if result.as_deref() != Some("13") {
            bail!("the brokered GET answered {result:?}");
        }
    }
    figures.latency("brokered GET (urllib in the guest), execute", &mut samples);
    // The guest's own view: the GET alone, without the execute around it.
    let timed = format!(
        "import time, urllib.request\nt = time.perf_counter()\nfor _ in range({n}):\n    urllib.request.urlopen({url:?}).read()\n(time.perf_counter() - t) / {n}"
    );
    let (_, per) = manager.execute(&mut id, &timed).await?;
    let per: f64 = per.unwrap_or_default().parse().unwrap_or(f64::NAN);
    println!(
        "{:<48} {:>10.3} {:>10} {:>10}",
        "brokered GET inside the guest (mean)",
        per * 1e3,
        "",
        n
    );
    manager.delete(id).await?;

    let mut samples = Vec::new();
    for _ in 0..n.min(50) {
        let mut id = manager.create().await?;
        let t = Instant::now();
        let (stdout, _) = manager
            .execute(&mut id, "%pip install benchpkg\nimport benchpkg")
            .await?;
        samples.push(t.elapsed());
        if !stdout.starts_with("Successfully installed benchpkg-1.0") {
            bail!("%pip install answered {stdout:?}");
        }
        manager.delete(id).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    figures.latency("%pip install of a small wheel (wheelhouse)", &mut samples);
    Ok(())
}
