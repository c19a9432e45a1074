//! The agent with real processes, over real sockets: HTTP on TCP as a seeds client calls it,
//! gRPC on a Unix socket as the manager in front of it does.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arl_exec::grpc::RemoteAgent;
use arl_exec::http::ExecResult;
use arl_exec::process::Limits;
use arl_exec::{Address, Executor, Listener, LocalAgent};
use arl_proto::sidecar::{ExecRequest, FileRequest, ShellInput};
use futures_util::StreamExt;
use serde_json::{Value, json};

struct Agent {
    url: String,
    socket: PathBuf,
    workspace: tempfile::TempDir,
    _run: tempfile::TempDir,
}

/// An agent on a TCP port and, for gRPC, the same agent on a Unix socket.
async fn agent(limits: Limits) -> Agent {
    let workspace = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let local = Arc::new(LocalAgent::new(workspace.path(), limits, "/bin/bash".into()).unwrap());
    let tcp = Listener::bind(&"127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let Listener::Tcp(ref inner) = tcp else {
        unreachable!()
    };
    let url = format!("http://{}", inner.local_addr().unwrap());
    let socket = run.path().join("agent.sock");
    let unix = Listener::bind(&Address::Unix(socket.clone()))
        .await
        .unwrap();
    tokio::spawn(arl_exec::serve(local.clone(), tcp, std::future::pending()));
    tokio::spawn(arl_exec::serve(local, unix, std::future::pending()));
    Agent {
        url,
        socket,
        workspace,
        _run: run,
    }
}

impl Agent {
    async fn post(&self, route: &str, body: Value) -> (u16, Value) {
        let response = reqwest::Client::new()
            .post(format!("{}{route}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    async fn run(&self, body: Value) -> ExecResult {
        let (status, body) = self.post("/execute", body).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_value(body).unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.workspace.path().join(name)
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a process with `pid` still exists (not yet reaped).
fn exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The processes whose group is `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // pid (comm) state ppid pgrp ...: comm may hold spaces, so read after ')'.
                let after = &stat[stat.rfind(')').unwrap_or(0) + 1..];
                let fields: Vec<&str> = after.split_whitespace().collect();
                fields.get(1).and_then(|s| s.parse::<char>().ok()) != Some('Z')
                    && fields.get(2) == Some(&pgid.to_string().as_str())
            })
        })
        .collect()
}

#[tokio::test]
async fn a_command_answers_its_output_and_exit_code() {
    let agent = agent(Limits::default()).await;
    let result = agent
        .run(json!({"command": ["bash", "-lc", "echo hi; echo oops >&2; exit 3"]}))
        .await;
    assert_eq!(
        (result.stdout.as_str(), result.stderr.as_str()),
        ("hi\n", "oops\n")
    );
    assert_eq!(result.exit_code, Some(3));
    assert!(result.pid > 0 && !result.timed_out && !result.truncated);
    // A shell line, env, and a working folder made by an earlier file update.
    let (status, _) = agent
        .post("/files", json!({"files": {"sub/a.txt": "A"}}))
        .await;
    assert_eq!(status, 200);
    let result = agent
        .run(json!({"command": "cat a.txt; echo \" $GREETING\"; pwd", "env": {"GREETING": "hey"}, "cwd": "sub"}))
        .await;
    let cwd = agent.path("sub").canonicalize().unwrap();
    assert_eq!(result.stdout, format!("A hey\n{}\n", cwd.display()));
    // A program that is not there is exit 127, as a shell says.
    let result = agent.run(json!({"command": ["no-such-program-arl"]})).await;
    assert_eq!(result.exit_code, Some(127));
    assert!(
        result.stderr.contains("no-such-program-arl"),
        "{}",
        result.stderr
    );
}

#[tokio::test]
async fn a_service_keeps_running_between_calls_until_signalled() {
    let agent = agent(Limits::default()).await;
    let script = "trap 'echo bye > stopped.txt; exit 0' TERM; echo up > started.txt; \
                  while true; do sleep 0.05; done";
    let started = agent
        .run(json!({"command": ["bash", "-c", script], "background": true}))
        .await;
    assert_eq!(started.exit_code, None, "a service has no exit code yet");
    let pid = started.pid;
    eventually("the service to start", || {
        agent.path("started.txt").exists()
    })
    .await;
    // Other commands run while it does.
    let other = agent.run(json!({"command": ["echo", "beside"]})).await;
    assert_eq!(other.stdout, "beside\n");
    assert!(exists(pid));
    let (status, body) = agent
        .post("/signal", json!({"pid": pid, "signal": "SIGTERM"}))
        .await;
    assert_eq!(status, 200, "{body}");
    eventually("the service to stop", || agent.path("stopped.txt").exists()).await;
    eventually("the service to be reaped", || !exists(pid)).await;
    // Gone, it can no longer be signalled.
    let (status, body) = agent
        .post("/signal", json!({"pid": pid, "signal": "SIGTERM"}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("process_not_found"))
    );
}

#[tokio::test]
async fn a_timeout_kills_the_whole_group_grandchildren_too() {
    let agent = agent(Limits::default()).await;
    let started = Instant::now();
    let result = agent
        .run(json!({
            "command": ["bash", "-c", "(sleep 30 & echo $! > grandchild.pid; wait) & sleep 30"],
            "timeout_seconds": 1
        }))
        .await;
    assert!(result.timed_out);
    assert_eq!(result.exit_code, Some(124));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let grandchild: i32 = std::fs::read_to_string(agent.path("grandchild.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eventually("the grandchild to be gone", || !exists(grandchild)).await;
    eventually("the group to be empty", || {
        group_members(result.pid).is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_flood_of_output_is_capped_and_killed_and_the_agent_keeps_serving() {
    let agent = agent(Limits {
        output_bytes: 64 * 1024,
        ..Limits::default()
    })
    .await;
    let result = agent
        .run(json!({"command": ["yes", "flood"], "timeout_seconds": 20}))
        .await;
    assert!(result.truncated);
    assert!(
        !result.timed_out,
        "killed for flooding, well before its deadline"
    );
    assert_eq!(result.stdout.len(), 64 * 1024);
    assert_eq!(result.exit_code, Some(128 + 9));
    let after = agent.run(json!({"command": ["echo", "still here"]})).await;
    assert_eq!(after.stdout, "still here\n");
}

#[tokio::test]
async fn forking_without_end_is_stopped_at_the_deadline() {
    let agent = agent(Limits {
        max_processes: 2048,
        ..Limits::default()
    })
    .await;
    let result = agent
        .run(json!({"command": ["bash", "-c", "while true; do sleep 100 & done"], "timeout_ms": 1500}))
        .await;
    assert!(result.timed_out);
    eventually("every forked process to be gone", || {
        group_members(result.pid).is_empty()
    })
    .await;
    let after = agent.run(json!({"command": ["echo", "ok"]})).await;
    assert_eq!(after.stdout, "ok\n");
}

#[tokio::test]
async fn a_patch_applies_all_or_nothing() {
    let agent = agent(Limits::default()).await;
    std::fs::write(agent.path("a.py"), "x = 1\ny = 2\n").unwrap();
    let patch = "--- a/a.py\n+++ b/a.py\n@@ -1,2 +1,2 @@\n x = 1\n-y = 2\n+y = 3\n";
    let (status, body) = agent.post("/files", json!({"patch": patch})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        std::fs::read_to_string(agent.path("a.py")).unwrap(),
        "x = 1\ny = 3\n"
    );
    // The same patch again no longer applies: nothing in the request is written.
    let (status, body) = agent
        .post("/files", json!({"files": {"new.txt": "n"}, "patch": patch}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("patch_failed")),
        "{body}"
    );
    assert!(!agent.path("new.txt").exists());
    assert_eq!(
        std::fs::read_to_string(agent.path("a.py")).unwrap(),
        "x = 1\ny = 3\n"
    );
    let (status, body) = agent.post("/files", json!({"patch": "not a diff"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_patch"))
    );
}

#[tokio::test]
async fn bad_input_is_refused_and_nothing_outside_the_workspace_is_touched() {
    let agent = agent(Limits::default()).await;
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("x.txt");
    for (route, body, status, code) in [
        (
            "/files",
            json!({"files": {"../x.txt": "no"}}),
            400,
            "invalid_path",
        ),
        (
            "/files",
            json!({"files": {target.to_str().unwrap(): "no"}}),
            400,
            "invalid_path",
        ),
        (
            "/files",
            json!({"base_path": "../..", "files": {"x": "no"}}),
            400,
            "invalid_path",
        ),
        (
            "/execute",
            json!({"command": ["true"], "cwd": "/etc"}),
            400,
            "invalid_path",
        ),
        (
            "/execute",
            json!({"command": ["true"], "cwd": "missing"}),
            404,
            "file_not_found",
        ),
        ("/execute", json!({"command": []}), 400, "invalid_command"),
        (
            "/execute",
            json!({"command": ["true"], "timeout_seconds": -1}),
            400,
            "invalid_timeout",
        ),
        (
            "/execute",
            json!({"command": ["true"], "env": {"A=B": "c"}}),
            400,
            "invalid_env",
        ),
        (
            "/execute",
            json!({"command": ["true"], "bogus": 1}),
            422,
            "invalid_request",
        ),
        (
            "/signal",
            json!({"pid": 1, "signal": "SIGTERM"}),
            404,
            "process_not_found",
        ),
        (
            "/signal",
            json!({"pid": 1, "signal": "SIGBOGUS"}),
            400,
            "invalid_signal",
        ),
    ] {
        let (got, answer) = agent.post(route, body.clone()).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{route} {body}: {answer}"
        );
    }
    assert!(!target.exists());
    let response = reqwest::Client::new()
        .post(format!("{}/execute", agent.url))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
}

#[tokio::test]
async fn reset_kills_every_process_and_empties_the_workspace_unless_asked_to_keep_files() {
    let agent = agent(Limits::default()).await;
    let service = agent
        .run(json!({"command": ["sleep", "60"], "background": true}))
        .await;
    std::fs::create_dir_all(agent.path("dir/sub")).unwrap();
    std::fs::write(agent.path("dir/sub/f"), "x").unwrap();
    std::fs::write(agent.path("keep.txt"), "x").unwrap();
    let (status, body) = agent.post("/reset", json!({"preserve_files": true})).await;
    assert_eq!(status, 200, "{body}");
    eventually("the service to be killed", || !exists(service.pid)).await;
    assert!(agent.path("keep.txt").exists());
    let (status, _) = agent.post("/reset", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(
        std::fs::read_dir(agent.workspace.path()).unwrap().count(),
        0
    );
}

#[tokio::test]
async fn events_stream_as_the_command_writes() {
    let agent = agent(Limits::default()).await;
    let response = reqwest::Client::new()
        .post(format!("{}/execute", agent.url))
        .header("accept", "text/event-stream")
        .json(&json!({"command": ["bash", "-c", "echo one; sleep 0.2; echo two; exit 4"]}))
        .send()
        .await
        .unwrap();
    let text = response.text().await.unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(names, ["started", "stdout", "stdout", "result"], "{text}");
    let result = text
        .lines()
        .last()
        .filter(|l| l.starts_with("data: "))
        .map(|l| &l[6..]);
    let result: ExecResult = serde_json::from_str(
        text.lines()
            .rev()
            .find_map(|l| l.strip_prefix("data: "))
            .or(result)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (result.stdout.as_str(), result.exit_code),
        ("one\ntwo\n", Some(4))
    );
}

#[tokio::test]
async fn grpc_on_a_unix_socket_runs_patches_and_opens_a_shell() {
    let agent = agent(Limits::default()).await;
    let remote = RemoteAgent::new(&Address::Unix(agent.socket.clone())).unwrap();
    remote.health().await.unwrap();
    let answer = remote
        .update_files(FileRequest {
            base_path: "src".into(),
            files: [("main.py".to_owned(), "print('hi')\n".to_owned())].into(),
            patch: String::new(),
        })
        .await
        .unwrap();
    assert!(answer.success);
    let log = remote
        .execute(ExecRequest {
            command: vec!["python3".into(), "main.py".into()],
            working_dir: "src".into(),
            ..ExecRequest::default()
        })
        .await
        .unwrap();
    let result = arl_exec::http::collect(log, false, Instant::now())
        .await
        .unwrap();
    assert_eq!(
        (result.stdout.as_str(), result.exit_code),
        ("hi\n", Some(0))
    );
    // A refusal keeps its code across gRPC.
    let e = remote
        .execute(ExecRequest {
            command: vec!["true".into()],
            timeout_seconds: -5,
            ..ExecRequest::default()
        })
        .await
        .err()
        .unwrap();
    assert_eq!(e.code, "invalid_timeout");
    // A shell on a terminal: it computes, knows it is on a tty, and exits with a code.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut output = remote
        .shell(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
        .await
        .unwrap();
    let keys = |s: &str| ShellInput {
        data: s.as_bytes().to_vec(),
        ..ShellInput::default()
    };
    tx.send(ShellInput {
        resize: true,
        rows: 40,
        cols: 100,
        ..ShellInput::default()
    })
    .await
    .unwrap();
    tx.send(keys("echo $((6*7)); test -t 0 && echo tty; stty size\n"))
        .await
        .unwrap();
    tx.send(keys("exit 5\n")).await.unwrap();
    let mut seen = String::new();
    let mut exit = None;
    while let Some(message) = tokio::time::timeout(Duration::from_secs(10), output.next())
        .await
        .unwrap()
    {
        let message = message.unwrap();
        seen.push_str(&String::from_utf8_lossy(&message.data));
        if message.closed {
            exit = Some(message.exit_code);
            break;
        }
    }
    assert!(
        seen.contains("42") && seen.contains("tty") && seen.contains("40 100"),
        "{seen}"
    );
    assert_eq!(exit, Some(5));
}
