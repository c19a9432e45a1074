//! The `arl-exec` binary as a pod runs it: `--install` into a shared folder, a service after
//! `--`, and, as PID 1 of its own PID namespace (`unshare`, as a container entrypoint is),
//! every orphan reaped.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_arl-exec");

/// A process and everything under it, killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let mut tree = vec![self.0.id() as i32];
        let all = processes();
        let mut i = 0;
        while i < tree.len() {
            let parent = tree[i];
            tree.extend(
                all.iter()
                    .filter(|(_, ppid, _)| *ppid == parent)
                    .map(|(pid, _, _)| *pid),
            );
            i += 1;
        }
        for pid in tree.iter().rev() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = self.0.wait();
    }
}

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn healthy(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reqwest::get(format!("{base}/health"))
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(Instant::now() < deadline, "{base} not healthy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `POST /execute` with `body`; the answer.
async fn execute(base: &str, body: Value) -> Value {
    reqwest::Client::new()
        .post(format!("{base}/execute"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `(pid, ppid, state)` of every process on the host.
fn processes() -> Vec<(i32, i32, char)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let after = &stat[stat.rfind(')')? + 2..];
            let mut fields = after.split_whitespace();
            let state = fields.next()?.chars().next()?;
            let ppid = fields.next()?.parse().ok()?;
            Some((pid, ppid, state))
        })
        .collect()
}

#[tokio::test]
async fn install_copies_the_agent_into_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("bin");
    let out = Command::new(BIN)
        .arg("--install")
        .arg(&to)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let installed = to.join("arl-exec");
    let help = Command::new(&installed).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--workspace"));
}

#[tokio::test]
async fn the_binary_serves_and_starts_its_service() {
    let workspace = tempfile::tempdir().unwrap();
    let base = format!("http://127.0.0.1:{}", port());
    let _agent = Running(
        Command::new(BIN)
            .arg("--listen")
            .arg(base.trim_start_matches("http://"))
            .arg("--workspace")
            .arg(workspace.path())
            .args([
                "--log",
                "warn",
                "--",
                "sh",
                "-c",
                "echo up > service.txt; exec sleep 60",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    healthy(&base).await;
    let answer = execute(
        &base,
        json!({"command": ["bash", "-lc", "echo hi; exit 3"]}),
    )
    .await;
    assert_eq!(
        (answer["stdout"].as_str(), answer["exit_code"].as_i64()),
        (Some("hi\n"), Some(3))
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !workspace.path().join("service.txt").exists() {
        assert!(Instant::now() < deadline, "the service never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A reset does not stop it: it is the pod's, not a session's.
    let reset = reqwest::Client::new()
        .post(format!("{base}/reset"))
        .json(&json!({"preserve_files": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 200);
    assert!(
        processes()
            .iter()
            .any(|(_, ppid, s)| *ppid == _agent.0.id() as i32 && *s != 'Z')
    );
}

#[tokio::test]
async fn as_pid_1_the_agent_reaps_what_its_commands_orphan() {
    let workspace = tempfile::tempdir().unwrap();
    let base = format!("http://127.0.0.1:{}", port());
    let unshare = Running(
        Command::new("unshare")
            .args(["--pid", "--fork"])
            .arg(BIN)
            .arg("--listen")
            .arg(base.trim_start_matches("http://"))
            .arg("--workspace")
            .arg(workspace.path())
            .args(["--log", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("unshare (util-linux) runs the agent in its own PID namespace"),
    );
    healthy(&base).await;
    // unshare's child is PID 1 of the namespace: the init; its child, the agent.
    let all = processes();
    let init = all
        .iter()
        .find(|(_, ppid, _)| *ppid == unshare.0.id() as i32)
        .unwrap()
        .0;
    assert!(
        all.iter().any(|(_, ppid, _)| *ppid == init),
        "the agent runs under the init"
    );
    // Each command leaves an orphan, killed with the command's group when the command ends:
    // each is reparented to PID 1, which must reap it.
    for _ in 0..5 {
        let answer = execute(
            &base,
            json!({"command": ["bash", "-c", "sleep 30 & disown; echo left one"]}),
        )
        .await;
        assert_eq!(answer["stdout"], "left one\n");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let zombies: Vec<_> = processes()
            .into_iter()
            .filter(|(_, ppid, state)| *ppid == init && *state == 'Z')
            .collect();
        if zombies.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "zombies left under PID 1: {zombies:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
