//! The `arl-manager` binary as a user runs it: flags, their env twins, and `serve` end to end.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_arl-manager");

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
        ("--max-sessions", "ARL_MAX_SESSIONS"),
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
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
        assert!(
            help.contains(&format!("env: {env}")),
            "{env} missing from --help"
        );
    }
    assert_eq!(
        help.matches("[env: ARL_").count(),
        14,
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
}

/// `arl-manager serve` from the README: it binds, becomes ready, and serves a Python session.
#[test]
fn serve_answers_over_a_real_socket() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(BIN)
        .args(["serve", "--log", "warn"])
        .env("ARL_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = rt.block_on(async {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            if let Ok(r) = client.get(format!("{base}/readyz")).send().await
                && r.status() == 200
            {
                break;
            }
            assert!(Instant::now() < deadline, "not ready in 15 minutes");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let created: serde_json::Value = client
            .post(format!("{base}/v1/sessions"))
            .send()
            .await?
            .json()
            .await?;
        let id = created["id"].as_str().unwrap().to_owned();
        let url = format!("{base}/v1/sessions/{id}/execute");
        client
            .post(&url)
            .json(&serde_json::json!({"code": "x = 41"}))
            .send()
            .await?;
        let v: serde_json::Value = client
            .post(&url)
            .json(&serde_json::json!({"code": "x + 1"}))
            .send()
            .await?
            .json()
            .await?;
        Ok::<_, reqwest::Error>(v)
    });
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    let v = result.unwrap();
    assert_eq!(v["result"], "42", "{v}");
    assert!(status.success(), "SIGTERM is a clean stop: {status}");
}
