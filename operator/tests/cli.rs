//! The `arl-operator` binary as an operator runs it: its flags, the refusals that keep it
//! safe, and `arl-operator gateway` serving a real manager until SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arl_e2e::{Runtimes, TestManager, guests};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_arl-operator");

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn output(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("ARL_AUTH_TOKEN")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn help_names_every_flag_and_its_environment_variable() {
    let (ok, run) = output(&["run", "--help"]);
    assert!(ok, "{run}");
    for flag in [
        "--gateway-listen",
        "ARL_GATEWAY_LISTEN",
        "--gateway-grpc-listen",
        "ARL_GATEWAY_GRPC_LISTEN",
        "--auth-token",
        "--namespace",
        "ARL_NAMESPACE",
        "--manager-image",
        "--token-key",
        "ARL_TOKEN_KEY",
        "--load-interval-secs",
        "--shutdown-grace-secs",
    ] {
        assert!(run.contains(flag), "`run --help` lacks {flag}:\n{run}");
    }
    let (ok, gateway) = output(&["gateway", "--help"]);
    assert!(
        ok && gateway.contains("--backend") && gateway.contains("ARL_BACKENDS"),
        "{gateway}"
    );
}

#[test]
fn unsafe_or_malformed_settings_are_refused_with_a_reason() {
    let backend = "m1=http://127.0.0.1:1";
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "gateway",
                "--backend",
                backend,
                "--gateway-listen",
                "0.0.0.0:0",
            ],
            "without --auth-token",
        ),
        (
            &[
                "gateway",
                "--backend",
                backend,
                "--gateway-grpc-listen",
                "0.0.0.0:0",
            ],
            "without --auth-token",
        ),
        (&["gateway", "--backend", "m1"], "expected NAME=URL"),
        (
            &["gateway", "--backend", "m1=127.0.0.1:8080"],
            "must start with http://",
        ),
    ];
    for (args, reason) in cases {
        let (ok, text) = output(args);
        assert!(!ok, "{args:?} was accepted");
        assert!(text.contains(reason), "{args:?}: {text}");
    }
    let (ok, text) = output(&["gateway", "--backend", "m1=http://127.0.0.1:1+nowhere"]);
    assert!(!ok && text.contains("IP:PORT"), "{text}");
}

#[test]
fn the_standalone_gateway_serves_a_manager_and_stops_on_sigterm() {
    let mut config = arl_e2e::config();
    config.id_prefix = "m1".into();
    let manager = TestManager::start(
        config,
        Runtimes {
            guests: vec![("counter", guests::COUNTER)],
            ..Runtimes::default()
        },
    );
    let (http, grpc) = (port(), port());
    let backend = format!(
        "m1={}+{}",
        manager.base,
        manager.grpc.trim_start_matches("http://")
    );
    let mut child = Command::new(BIN)
        .args([
            "gateway",
            "--backend",
            &backend,
            "--load-interval-secs",
            "1",
            "--log",
            "warn",
        ])
        .args(["--gateway-listen", &format!("127.0.0.1:{http}")])
        .args(["--gateway-grpc-listen", &format!("127.0.0.1:{grpc}")])
        // The test's idle connections stay open (its runtime is not driven after block_on):
        // the grace period must end the wait for them.
        .args(["--shutdown-grace-secs", "1"])
        .env("ARL_AUTH_TOKEN", "gateway-token")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{http}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reqwest::get(format!("{base}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            assert!(Instant::now() < deadline, "the gateway never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let created: Value = client
            .post(format!("{base}/v1/sessions"))
            .bearer_auth("gateway-token")
            .json(&json!({ "runtime": "counter" }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = created["id"].as_str().unwrap();
        assert!(id.starts_with("m1."), "{created}");
        assert_eq!(manager.get(&format!("/v1/sessions/{id}")).await.0, 200);
        // The gRPC port answers health checks.
        let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "arl.v1.Sessions".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    });
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}
