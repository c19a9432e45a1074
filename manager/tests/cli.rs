//! The `arl-manager` binary as a user runs it: flags, their env twins, and `serve` end to end.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{BIN, port, runtime, wait_ready};

#[test]
fn every_serve_flag_has_an_env_twin_in_help() {
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for (flag, env) in [
        ("--listen", "ARL_LISTEN"),
        ("--grpc-listen", "ARL_GRPC_LISTEN"),
        ("--auth-token", "ARL_AUTH_TOKEN"),
        ("--insecure", "ARL_INSECURE"),
        ("--workspace-mib", "ARL_WORKSPACE_MIB"),
        ("--max-sessions", "ARL_MAX_SESSIONS"),
        ("--warm-sessions", "ARL_WARM_SESSIONS"),
        ("--min-free-mib", "ARL_MIN_FREE_MIB"),
        ("--timeout-ms", "ARL_TIMEOUT_MS"),
        ("--max-timeout-ms", "ARL_MAX_TIMEOUT_MS"),
        ("--memory-mib", "ARL_MEMORY_MIB"),
        ("--max-memory-mib", "ARL_MAX_MEMORY_MIB"),
        ("--output-bytes", "ARL_OUTPUT_BYTES"),
        ("--idle-ttl-secs", "ARL_IDLE_TTL_SECS"),
        ("--lifetime-secs", "ARL_LIFETIME_SECS"),
        ("--body-limit-bytes", "ARL_BODY_LIMIT_BYTES"),
        ("--cache-dir", "ARL_CACHE_DIR"),
        ("--data-dir", "ARL_DATA_DIR"),
        ("--shutdown-grace-secs", "ARL_SHUTDOWN_GRACE_SECS"),
        ("--log", "ARL_LOG"),
        ("--id-prefix", "ARL_ID_PREFIX"),
        ("--store", "ARL_STORE"),
        ("--suspend-after-secs", "ARL_SUSPEND_AFTER_SECS"),
        ("--suspended-ttl-secs", "ARL_SUSPENDED_TTL_SECS"),
        ("--checkpoint-every-secs", "ARL_CHECKPOINT_EVERY_SECS"),
        ("--no-rollback", "ARL_NO_ROLLBACK"),
        ("--network-allow", "ARL_NETWORK_ALLOW"),
        ("--network-max-bytes", "ARL_NETWORK_MAX_BYTES"),
        ("--network-max-requests", "ARL_NETWORK_MAX_REQUESTS"),
        ("--wheelhouse", "ARL_WHEELHOUSE"),
        ("--pip-index", "ARL_PIP_INDEX"),
        ("--runtimes", "ARL_RUNTIMES"),
        ("--agent", "ARL_AGENT"),
        ("--workspace", "ARL_WORKSPACE"),
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
        assert!(
            help.contains(&format!("env: {env}")),
            "{env} missing from --help"
        );
    }
    assert_eq!(
        help.matches("[env: ARL_").count(),
        34,
        "a flag without a documented twin:\n{help}"
    );
}

#[test]
fn bad_settings_are_refused_before_binding() {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--memory-mib",
            "9000",
            "--max-memory-mib",
            "1024",
            "--listen",
            "127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--memory-mib"), "{stderr}");
    let out = Command::new(BIN)
        .args(["serve"])
        .env("ARL_MAX_SESSIONS", "lots")
        .output()
        .unwrap();
    assert!(!out.status.success(), "an env twin is parsed like its flag");
    for (flag, value) in [
        ("--network-allow", "ok.example.com,*.com"),
        ("--pip-index", "not a url"),
    ] {
        let out = Command::new(BIN)
            .args(["serve", flag, value, "--listen", "127.0.0.1:1"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "{stderr}");
    }
}

#[test]
fn an_open_address_needs_a_token_or_insecure() {
    for args in [
        &["--listen", "0.0.0.0:0"][..],
        &["--grpc-listen", "0.0.0.0:0"],
    ] {
        let out = Command::new(BIN)
            .arg("serve")
            .args(args)
            .env_remove("ARL_AUTH_TOKEN")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("without --auth-token") && stderr.contains("--insecure"),
            "the refusal says why and what to do: {stderr}"
        );
    }
}

#[test]
fn the_capacity_is_what_the_open_files_limit_holds() {
    let http = port();
    // `ulimit -n` sets the hard limit too: the manager cannot raise it past 1,500.
    let script = format!(
        "ulimit -n 1500 && exec {BIN} serve --log error --max-sessions 6000 --warm-sessions 0 \
         --listen 127.0.0.1:{http} --grpc-listen 127.0.0.1:0"
    );
    let tmp = tempfile::tempdir().unwrap(); // killed below: its data folder goes with `tmp`
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rt = runtime();
    let load = rt.block_on(async {
        let url = format!("http://127.0.0.1:{http}/v1/load");
        loop {
            if let Ok(r) = reqwest::get(&url).await {
                break r.json::<serde_json::Value>().await.unwrap();
            }
            assert!(child.try_wait().unwrap().is_none(), "the manager exited");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        load["capacity"], 119,
        "(1,500 - 1,024 reserved) / 4 descriptors a session: {load}"
    );
}

/// `arl-manager serve` on a free port with `args`, once /readyz answers 200. Its temporary
/// files (its data folder among them) go to `tmp`.
fn serve(
    args: &[&str],
    tmp: &std::path::Path,
    rt: &tokio::runtime::Runtime,
) -> (std::process::Child, String) {
    let http = port();
    let child = Command::new(BIN)
        .args(["serve", "--log", "warn", "--grpc-listen", "127.0.0.1:0"])
        .args(args)
        .env("ARL_LISTEN", format!("127.0.0.1:{http}"))
        .env("TMPDIR", tmp)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{http}");
    rt.block_on(wait_ready(&base));
    (child, base)
}

/// Waits until session `id` is running a turn.
async fn wait_running(client: &reqwest::Client, base: &str, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info: serde_json::Value = client
            .get(format!("{base}/v1/sessions/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if info["state"] == "running" {
            return;
        }
        assert!(Instant::now() < deadline, "never running: {info}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What is left in `dir`.
fn left_in(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

fn sigterm(child: &std::process::Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

async fn session(client: &reqwest::Client, base: &str) -> String {
    let created: serde_json::Value = client
        .post(format!("{base}/v1/sessions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["id"].as_str().unwrap().to_owned()
}

async fn execute(client: &reqwest::Client, base: &str, id: &str, code: &str) -> serde_json::Value {
    client
        .post(format!("{base}/v1/sessions/{id}/execute"))
        .json(&serde_json::json!({ "code": code }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `arl-manager serve` from the README: it binds, becomes ready, and serves a Python session;
/// on SIGTERM it stops taking connections but lets a running execution finish, then removes
/// its data folder.
#[test]
fn serve_answers_and_sigterm_lets_running_executions_finish() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, base) = serve(&["--shutdown-grace-secs", "60"], tmp.path(), &rt);
    assert_eq!(left_in(tmp.path()).len(), 1, "the manager's data folder");
    let client = reqwest::Client::new();
    let (v, refused_while_running) = rt.block_on(async {
        let id = session(&client, &base).await;
        execute(&client, &base, &id, "x = 41").await;
        assert_eq!(execute(&client, &base, &id, "x + 1").await["result"], "42");
        let slow = tokio::spawn({
            let (client, base, id) = (client.clone(), base.clone(), id.clone());
            async move {
                execute(
                    &client,
                    &base,
                    &id,
                    "import time; time.sleep(8); 'finished'",
                )
                .await
            }
        });
        wait_running(&client, &base, &id).await;
        sigterm(&child);
        // New connections are refused from now on, while the execution still runs.
        let deadline = Instant::now() + Duration::from_secs(30);
        let refused = loop {
            let late = reqwest::Client::new()
                .get(format!("{base}/healthz"))
                .send()
                .await;
            if late.is_err() {
                break !slow.is_finished();
            }
            assert!(Instant::now() < deadline, "still taking connections");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        (slow.await.unwrap(), refused)
    });
    let status = child.wait().unwrap();
    assert_eq!(
        v["result"], "'finished'",
        "the running execution finished: {v}"
    );
    assert_eq!(v["session_ended"], false);
    assert!(
        refused_while_running,
        "no new connections once stopping, while the execution ran"
    );
    assert!(status.success(), "SIGTERM is a clean stop: {status}");
    assert_eq!(left_in(tmp.path()), Vec::<std::path::PathBuf>::new());
}

/// Past the grace period, what still runs is stopped with the reason `shutdown`.
#[test]
fn sigterm_ends_what_outlasts_the_grace_period() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, base) = serve(&["--shutdown-grace-secs", "1"], tmp.path(), &rt);
    let client = reqwest::Client::new();
    let started = Instant::now();
    let v = rt.block_on(async {
        let id = session(&client, &base).await;
        let slow = tokio::spawn({
            let (client, base, id) = (client.clone(), base.clone(), id.clone());
            async move { execute(&client, &base, &id, "import time; time.sleep(600)").await }
        });
        wait_running(&client, &base, &id).await;
        sigterm(&child);
        slow.await.unwrap()
    });
    let status = child.wait().unwrap();
    assert_eq!(v["session_ended"], true, "{v}");
    assert_eq!(v["end_reason"], "shutdown", "{v}");
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(300),
        "the stop did not wait for the 600 s sleep"
    );
    assert_eq!(left_in(tmp.path()), Vec::<std::path::PathBuf>::new());
}

/// `--runtimes javascript` serves JavaScript alone, and a snapshot one manager process takes
/// is restored by another on the same snapshot folder, its globals and files with it.
#[test]
fn a_javascript_snapshot_is_restored_by_a_second_process() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let snapshots = tmp.path().join("snapshots");
    let args = [
        "--runtimes",
        "javascript",
        "--store",
        snapshots.to_str().unwrap(),
    ];
    let (mut first, base) = serve(&args, tmp.path(), &rt);
    let client = reqwest::Client::new();
    let post = |url: String, body: serde_json::Value| {
        let client = client.clone();
        async move {
            let r = client.post(url).json(&body).send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let snap = rt.block_on(async {
        let (status, v) = post(format!("{base}/v1/sessions"), serde_json::json!({})).await;
        assert_eq!(status, 422, "python is not served here: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("javascript"),
            "{v}"
        );
        let (_, v) = post(
            format!("{base}/v1/sessions"),
            serde_json::json!({ "runtime": "javascript" }),
        )
        .await;
        let id = v["id"].as_str().unwrap().to_owned();
        let cell = "let x = 41; require('fs').writeFileSync('kept.txt', 'yes')";
        execute(&client, &base, &id, cell).await;
        let (status, v) = post(
            format!("{base}/v1/sessions/{id}/snapshot"),
            serde_json::json!({}),
        )
        .await;
        assert_eq!(status, 201, "{v}");
        v["id"].as_str().unwrap().to_owned()
    });
    sigterm(&first);
    assert!(first.wait().unwrap().success());

    let (mut second, base) = serve(&args, tmp.path(), &rt);
    let v = rt.block_on(async {
        let (status, v) = post(
            format!("{base}/v1/sessions"),
            serde_json::json!({ "from_snapshot": snap }),
        )
        .await;
        assert_eq!(status, 201, "{v}");
        let id = v["id"].as_str().unwrap().to_owned();
        execute(
            &client,
            &base,
            &id,
            "[x + 1, require('fs').readFileSync('kept.txt', 'utf8')]",
        )
        .await
    });
    assert_eq!(v["result"], "[ 42, 'yes' ]", "{v}");
    sigterm(&second);
    assert!(second.wait().unwrap().success());
}
