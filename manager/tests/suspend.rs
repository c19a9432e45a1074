//! Sessions that outlive their instance and their process: suspended when idle and resumed by
//! their next request under the same id; checkpointed, and served again by a manager restarted
//! after a `kill -9` on the same store; roaming between managers through an S3 bucket (a real
//! S3 API server, PyPI's `moto[server]`, started here) when one drains.
//!
//! It lives with the manager because that is the crate whose binary it runs and kills.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;

use common::{Manager, call, get, port, post, result, runtime, wait_ready};

async fn create(base: &str, body: Value) -> String {
    let (status, created) = post(format!("{base}/v1/sessions"), body).await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().unwrap().to_owned()
}

/// Waits (up to 20 s) until session `id` shows `state`.
async fn wait_state(base: &str, id: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, info) = get(format!("{base}/v1/sessions/{id}")).await;
        if status == 200 && info["state"] == state {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never became {state}: {info}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (up to 20 s) until `path` exists.
async fn wait_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never written",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn idle_sessions_suspend_resume_and_come_back_after_a_crash() {
    let store = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let flags = |command: &mut Command| {
        command
            .arg("--store")
            .arg(store.path())
            .arg("--data-dir")
            .arg(data.path())
            .args(["--suspend-after-secs", "1", "--checkpoint-every-secs", "1"])
            .args(["--runtimes", "python"]);
    };
    let sessions = store.path().join("sessions");
    runtime().block_on(async {
        let mut m = Manager::spawn("m", flags);
        let base = m.base.clone();
        wait_ready(&base).await;

        // Idle past `--suspend-after-secs`, a session goes to the store; its next request
        // brings it back with its variables, files, history, limits and labels.
        let a = create(&base, json!({"metadata": {"k": "v"}, "timeout_ms": 7000})).await;
        result(
            &base,
            &a,
            "x = 41\nopen('/workspace/f.txt', 'w').write('kept')",
        )
        .await;
        wait_state(&base, &a, "suspended").await;
        let (_, load) = get(format!("{base}/v1/load")).await;
        assert!(load["suspended"].as_u64().unwrap() >= 1, "{load}");
        assert_eq!(load["sessions"], 0, "its instance is freed: {load}");
        let metrics = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics.contains(r#"arl_suspensions_total{direction="suspend"}"#),
            "{metrics}"
        );
        assert_eq!(
            result(&base, &a, "x + 1, open('/workspace/f.txt').read()").await,
            "(42, 'kept')"
        );
        let (_, info) = get(format!("{base}/v1/sessions/{a}")).await;
        assert_eq!(
            (
                &info["state"],
                &info["executions"],
                &info["metadata"]["k"],
                &info["limits"]["timeout_ms"]
            ),
            (&json!("idle"), &json!(2), &json!("v"), &json!(7000)),
            "{info}"
        );
        let history = reqwest::get(format!("{base}/v1/sessions/{a}/history"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(history.lines().count(), 2, "{history}");

        // An explicit suspend races executions: each is answered, in order, none lost.
        let b = create(&base, json!({"suspend_after_secs": 0})).await;
        result(&base, &b, "n = 0").await;
        let mut racing = Vec::new();
        for i in 0..8 {
            let (base, b) = (base.clone(), b.clone());
            racing.push(tokio::spawn(async move {
                if i == 3 {
                    let (status, v) =
                        post(format!("{base}/v1/sessions/{b}/suspend"), json!(null)).await;
                    assert_eq!(status, 200, "{v}");
                } else {
                    result(&base, &b, "n += 1").await;
                }
            }));
        }
        for task in racing {
            task.await.unwrap();
        }
        assert_eq!(result(&base, &b, "n").await, "7");
        let (status, v) = post(format!("{base}/v1/sessions/{b}/suspend"), json!(null)).await;
        assert_eq!((status, &v["state"]), (200, &json!("suspended")), "{v}");
        let (status, v) = post(format!("{base}/v1/sessions/{b}/resume"), json!(null)).await;
        assert!(
            status == 200 && (v["state"] == "starting" || v["state"] == "idle"),
            "live again, its state being put back or at rest: {v}"
        );
        let (status, _) = post(format!("{base}/v1/sessions/{b}/suspend"), json!(null)).await;
        assert_eq!(status, 200);

        // A live session checkpointed after its turn; one created and never run (the store
        // knows it, with no state to give back); a session that ran no turn since its create.
        let c = create(&base, json!({"suspend_after_secs": 0})).await;
        result(&base, &c, "y = 7").await;
        wait_file(&sessions.join(format!("{c}.json"))).await;
        let d = create(&base, json!({"suspend_after_secs": 0})).await;
        wait_file(&sessions.join(format!("{d}.json"))).await;

        // What a crash leaves: a torn image under a record, a staged write, a session folder.
        let bad = "m.badbadbadbadbadbadbadbadbadbadba";
        let record = std::fs::read_to_string(sessions.join(format!("{c}.json"))).unwrap();
        let record = record
            .replace(&c, bad)
            .replace("\"checkpoint\"", "\"suspended\"");
        std::fs::write(sessions.join(format!("{bad}.json")), record).unwrap();
        let image = std::fs::read(sessions.join(format!("{c}.snap"))).unwrap();
        std::fs::write(
            sessions.join(format!("{bad}.snap")),
            &image[..image.len() / 2],
        )
        .unwrap();
        let staged = store.path().join("snap-0123.snap#7");
        std::fs::write(&staged, b"half").unwrap();
        let leftover = data.path().join("sessions").join("leftover");
        std::fs::create_dir_all(&leftover).unwrap();
        let e = create(&base, json!({"suspend_after_secs": 0})).await;

        m.crash();
        let m = Manager::spawn("m", flags);
        let base = m.base.clone();
        wait_ready(&base).await;

        // Suspended and checkpointed sessions are back under their ids, suspended.
        let info = wait_state(&base, &c, "suspended").await;
        assert_eq!(
            info["executions"], 1,
            "the turns its checkpoint holds: {info}"
        );
        assert_eq!(result(&base, &c, "y").await, "7");
        assert_eq!(result(&base, &b, "n").await, "7");
        assert_eq!(
            result(&base, &a, "x, open('/workspace/f.txt').read()").await,
            "(41, 'kept')"
        );
        // One the store knew with no state answers that it is lost, not that it never was.
        let (status, v) = get(format!("{base}/v1/sessions/{d}")).await;
        assert_eq!(
            (status, &v["error"]["reason"]),
            (410, &json!("lost")),
            "{v}"
        );
        // A torn image is refused, never restored wrong, and left for inspection.
        let (status, v) = post(
            format!("{base}/v1/sessions/{bad}/execute"),
            json!({"code": "1"}),
        )
        .await;
        assert_eq!(
            (status, &v["error"]["reason"]),
            (410, &json!("lost")),
            "{v}"
        );
        assert!(sessions.join(format!("{bad}.snap")).exists());
        // The session created in the last second before the crash is lost, or unknown if its
        // record was not written yet.
        let (status, v) = get(format!("{base}/v1/sessions/{e}")).await;
        assert!(
            status == 404 || (status == 410 && v["error"]["reason"] == "lost"),
            "{status} {v}"
        );
        // What the dead process left is gone.
        assert!(!staged.exists(), "the staged write is swept");
        assert!(
            !leftover.exists(),
            "the dead process's session folder is removed"
        );
        // Deleting a suspended session removes it from the store.
        let (status, _) = call(
            reqwest::Method::DELETE,
            format!("{base}/v1/sessions/{c}"),
            None,
        )
        .await;
        assert_eq!(status, 204);
        let deadline = Instant::now() + Duration::from_secs(10);
        while sessions.join(format!("{c}.json")).exists() {
            assert!(Instant::now() < deadline, "the record stays after a delete");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(get(format!("{base}/v1/sessions/{c}")).await.0, 404);

        // A manager stopped as Kubernetes stops it (SIGTERM) keeps its sessions in the store:
        // the next one serves them, a session that never ran a turn included.
        let fresh = create(&base, json!({"suspend_after_secs": 0})).await;
        assert_eq!(result(&base, &a, "x").await, "41");
        drop(m);
        let m = Manager::spawn("m", flags);
        wait_ready(&m.base).await;
        assert_eq!(result(&m.base, &a, "x").await, "41");
        assert_eq!(result(&m.base, &fresh, "1 + 1").await, "2");
    });
}

/// A local S3 API server (PyPI `moto[server]`), stopped when dropped.
struct S3 {
    endpoint: String,
    child: Child,
}

impl S3 {
    async fn start(bucket: &str) -> Self {
        let tools = arl_build_support::pytools(
            &arl_build_support::cache_dir(),
            "python3",
            &["moto[server]==5.2.6"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let port = port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .env("PYTHONPATH", tools)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let made = reqwest::Client::new()
                .put(format!("{endpoint}/{bucket}"))
                .send()
                .await;
            if made.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(Instant::now() < deadline, "moto did not start");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Self { endpoint, child }
    }

    /// The environment a manager reads its S3 endpoint and credentials from.
    fn configure(&self, command: &mut Command) {
        command
            .env("AWS_ENDPOINT", &self.endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1");
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sessions_roam_between_managers_through_an_s3_bucket() {
    runtime().block_on(async {
        let s3 = S3::start("arl-sessions").await;
        let spawn = |name: &str| {
            Manager::spawn(name, |command| {
                s3.configure(command);
                command
                    .args(["--store", "s3://arl-sessions/pool-a"])
                    .args(["--runtimes", "python"]);
            })
        };
        let (a, b) = (spawn("a"), spawn("b"));
        wait_ready(&a.base).await;
        wait_ready(&b.base).await;

        // Snapshots go to the bucket, where both managers see them.
        let id = create(&a.base, json!({})).await;
        result(
            &a.base,
            &id,
            "x = 41\nopen('/workspace/w.txt', 'w').write('from a')",
        )
        .await;
        let (status, snap) =
            post(format!("{}/v1/sessions/{id}/snapshot", a.base), json!(null)).await;
        assert_eq!(status, 201, "{snap}");
        let (status, seen) = get(format!(
            "{}/v1/snapshots/{}",
            b.base,
            snap["id"].as_str().unwrap()
        ))
        .await;
        assert_eq!((status, &seen["executions"]), (200, &json!(1)), "{seen}");

        // Suspended on `a`, the session is `a`'s: `b` says where it is.
        let (status, _) = post(format!("{}/v1/sessions/{id}/suspend", a.base), json!(null)).await;
        assert_eq!(status, 200);
        let (status, v) = get(format!("{}/v1/sessions/{id}", b.base)).await;
        assert_eq!((status, &v["error"]["reason"]), (421, &json!("a")), "{v}");

        // `a` drains and moves its sessions out: `b` resumes this one from the bucket, under
        // the same id, and `a` says where it went.
        let (status, _) = post(
            format!("{}/v1/drain?move_sessions=true", a.base),
            json!(null),
        )
        .await;
        assert_eq!(status, 200);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, load) = get(format!("{}/v1/load", a.base)).await;
            if load["sessions"] == 0 && load["suspended"] == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "a kept its sessions: {load}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            result(&b.base, &id, "x + 1, open('/workspace/w.txt').read()").await,
            "(42, 'from a')"
        );
        let (status, v) = get(format!("{}/v1/sessions/{id}", a.base)).await;
        assert_eq!((status, &v["error"]["reason"]), (421, &json!("b")), "{v}");
    });
}

#[test]
fn a_drain_under_load_moves_every_session_and_fails_no_request() {
    use arl_operator::fleet::Fleet;
    use arl_operator::gateway::{self, Gateway};
    use arl_operator::manager::Managers;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    runtime().block_on(async {
        let s3 = S3::start("arl-drain").await;
        let managers: Vec<Manager> = ["a", "b", "c"]
            .into_iter()
            .map(|name| {
                Manager::spawn(name, |command| {
                    s3.configure(command);
                    command
                        .args(["--store", "s3://arl-drain/pool"])
                        .args(["--runtimes", "python"]);
                })
            })
            .collect();
        let fleet = Fleet::default();
        for m in &managers {
            wait_ready(&m.base).await;
            fleet.upsert(m.member(None));
        }
        fleet.poll(&Managers::new()).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw = format!("http://{}", listener.local_addr().unwrap());
        let router = gateway::router(Gateway::new(fleet.clone(), None));
        tokio::spawn(arl_serve::serve_http(
            listener,
            router,
            std::future::pending(),
        ));

        let mut ids = Vec::new();
        for _ in 0..9 {
            let id = create(&gw, json!({})).await;
            result(&gw, &id, "n = 0").await;
            ids.push(id);
        }
        let owner = |id: &str| id.split('.').next().unwrap().to_owned();
        let victim = owner(&ids[0]);
        let on_victim = ids.iter().filter(|id| owner(id) == victim).count();

        // Each client steps its own session without pause; only the documented retryable
        // statuses (429, 503) are retried. Every answer must be this session's own count.
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = ids
            .iter()
            .map(|id| {
                let (gw, id, stop) = (gw.clone(), id.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut count = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let (status, v) = post(
                            format!("{gw}/v1/sessions/{id}/execute"),
                            json!({"code": "n += 1\nn"}),
                        )
                        .await;
                        match status {
                            200 => {
                                count += 1;
                                assert_eq!(v["result"], count.to_string(), "{id}: {v}");
                            }
                            429 | 503 => tokio::time::sleep(Duration::from_millis(20)).await,
                            _ => panic!("{id}: {status} {v}"),
                        }
                    }
                    count
                })
            })
            .collect();

        tokio::time::sleep(Duration::from_millis(500)).await;
        let base = &managers.iter().find(|m| m.name == victim).unwrap().base;
        let (status, _) = post(format!("{base}/v1/drain?move_sessions=true"), json!(null)).await;
        assert_eq!(status, 200);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, load) = get(format!("{base}/v1/load")).await;
            if load["sessions"] == 0 && load["suspended"] == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{victim} kept sessions: {load}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        fleet.poll(&Managers::new()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::SeqCst);
        let mut counts = Vec::new();
        for client in clients {
            counts.push(client.await.unwrap());
        }

        // Every session carries on elsewhere with all its turns; none stayed on the victim.
        for (id, count) in ids.iter().zip(counts) {
            assert!(count > 0, "{id} was never stepped");
            assert_eq!(result(&gw, id, "n").await, count.to_string(), "{id}");
        }
        let (_, load) = get(format!("{base}/v1/load")).await;
        assert_eq!(load["sessions"], 0, "{load}");
        assert!(on_victim >= 1);
    });
}
