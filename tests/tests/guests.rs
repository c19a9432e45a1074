//! The manager over real sockets with the small guests of `wasm-guests/`: every guest runs,
//! every limit shows its observable result, every bad input gets its 4xx.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arl_e2e::{Runtimes, TestManager, client, config, decode};
use serde_json::{Value, json};

fn manager() -> &'static Arc<TestManager> {
    static M: OnceLock<Arc<TestManager>> = OnceLock::new();
    M.get_or_init(|| {
        let mut c = config();
        c.defaults.timeout = Duration::from_secs(5);
        c.defaults.memory_bytes = 64 << 20;
        c.defaults.output_bytes = 1000;
        TestManager::start(c, Runtimes::guests())
    })
}

async fn session(runtime: &str) -> String {
    manager().create(json!({ "runtime": runtime })).await
}

// Every guest has a test named after it; one missing fails to compile here.
macro_rules! assert_tested {
    ($guest:ident) => {
        let _ = $guest;
    };
}
#[test]
fn every_guest_has_a_test() {
    arl_e2e::foreach_guest!(assert_tested);
}

#[tokio::test]
async fn counter() {
    let m = manager();
    let id = session("counter").await;
    let first = m.exec(&id, "inc").await;
    assert_eq!(first["result"], "1");
    assert_eq!(first["stdout"], "count=1\n");
    assert_eq!(m.exec(&id, "inc").await["result"], "2");
    assert_eq!(
        m.exec(&id, "get").await["result"],
        "2",
        "state persists across turns"
    );
    let other = session("counter").await;
    assert_eq!(
        m.exec(&other, "get").await["result"],
        "0",
        "sessions do not share state"
    );
    let failed = m.exec(&id, "fail").await;
    assert_eq!(failed["error"]["type"], "ValueError");
    assert_eq!(failed["session_ended"], false);
    assert_eq!(
        m.exec(&id, "get").await["result"],
        "2",
        "an error keeps the session"
    );
    let (status, info) = m.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(info["executions"], 5);
    assert_eq!(info["state"], "idle");
    assert!(info["memory_bytes"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn spinner() {
    let m = manager();
    let id = session("spinner").await;
    assert_eq!(m.exec(&id, "ping").await["result"], "pong");
    let (status, v) = m
        .post(
            &format!("/v1/sessions/{id}/execute"),
            json!({"code": "spin", "timeout_ms": 300}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["session_ended"], false, "{v}");
    assert_eq!(
        (v["rolled_back"].as_bool(), v["rollback_reason"].as_str()),
        (Some(true), Some("deadline"))
    );
    assert_eq!(v["error"]["type"], "Timeout");
    assert_eq!(
        m.exec(&id, "ping").await["result"],
        "pong",
        "rolled back, it answers on"
    );

    // Created with `rollback: false`, a deadline ends the session, as it used to.
    let id = m
        .create(json!({"runtime": "spinner", "rollback": false}))
        .await;
    let (status, v) = m
        .post(
            &format!("/v1/sessions/{id}/execute"),
            json!({"code": "spin", "timeout_ms": 300}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["session_ended"], true);
    assert_eq!(v["rolled_back"], false);
    assert_eq!(v["end_reason"], "deadline");
    assert_eq!(v["error"]["type"], "SessionEnded");
    let ms = v["duration_ms"].as_f64().unwrap();
    assert!(
        (300.0..3000.0).contains(&ms),
        "stopped near its deadline, took {ms} ms"
    );
    let (status, v) = m
        .post(
            &format!("/v1/sessions/{id}/execute"),
            json!({"code": "ping"}),
        )
        .await;
    assert_eq!(status, 410);
    assert_eq!(v["error"]["code"], "session_ended");
    assert_eq!(v["error"]["reason"], "deadline");
    assert_eq!(m.get(&format!("/v1/sessions/{id}")).await.0, 410);
}

#[tokio::test]
async fn a_blocking_sleep_is_bounded_by_the_deadline() {
    let m = manager();
    let id = session("spinner").await;
    assert_eq!(m.exec(&id, "sleep 10").await["result"], "slept");
    let (_, v) = m
        .post(
            &format!("/v1/sessions/{id}/execute"),
            json!({"code": "sleep 60000", "timeout_ms": 200}),
        )
        .await;
    assert_eq!(v["rollback_reason"], "deadline", "{v}");
    assert!(
        v["duration_ms"].as_f64().unwrap() < 60_000.0,
        "the sleep was cut short: {v}"
    );
}

#[tokio::test]
async fn hog() {
    let m = manager();
    let id = session("hog").await;
    assert_eq!(m.exec(&id, "grow 8").await["result"], "8");
    // 64 MiB is this manager's limit: growing past it fails inside the guest only.
    let over = m.exec(&id, "grow 100").await;
    assert_eq!(over["error"]["type"], "MemoryError", "{over}");
    assert_eq!(over["session_ended"], false);
    assert_eq!(
        m.exec(&id, "held").await["result"],
        "8",
        "the session is still usable"
    );
    let (_, info) = m.get(&format!("/v1/sessions/{id}")).await;
    assert!(info["memory_bytes"].as_u64().unwrap() >= 8 << 20);
    assert!(info["memory_bytes"].as_u64().unwrap() <= 64 << 20);
}

#[tokio::test]
async fn prober() {
    let m = manager();
    let id = session("prober").await;
    let refused = |v: Value, errno: &str| {
        assert_eq!(v["error"]["type"], "OSError", "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("(os error {errno})")), "{v}");
    };
    // WASI errnos: 44 ENOENT (no preopen holds the path), 63 EPERM (it would climb out).
    refused(m.exec(&id, "read /etc/passwd").await, "44");
    refused(m.exec(&id, "list /").await, "44");
    refused(m.exec(&id, "read /workspace/../../etc/passwd").await, "63");
    refused(m.exec(&id, "read /tmp/../../etc/passwd").await, "63");
    assert_eq!(
        m.exec(&id, "write /workspace/a.txt hello").await["result"],
        "written"
    );
    assert_eq!(
        m.exec(&id, "read /workspace/a.txt").await["result"],
        "hello"
    );
    assert_eq!(m.exec(&id, "list /workspace").await["result"], "a.txt");
    assert_eq!(
        m.exec(&id, "write /tmp/scratch mine").await["result"],
        "written"
    );
    let other = session("prober").await;
    refused(m.exec(&other, "read /workspace/a.txt").await, "44"); // workspaces are private
    refused(m.exec(&other, "read /tmp/scratch").await, "44"); // and so is /tmp
    assert_eq!(m.exec(&other, "list /tmp").await["result"], "");
    // Both folders live in the session's own folder on the host, removed when it ends.
    let dir = m.registry.get(&id).await.unwrap().dir.clone();
    assert_eq!(
        std::fs::read_to_string(dir.join("tmp/scratch")).unwrap(),
        "mine"
    );
    assert_eq!(m.delete(&format!("/v1/sessions/{id}")).await.0, 204);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while dir.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} is left",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Only the fixed environment reaches the guest, never the host's.
    assert_eq!(m.exec(&other, "env").await["result"], "HOME=/workspace");
    assert_eq!(
        m.exec(&other, "stdin").await["result"],
        "0:",
        "stdin is empty"
    );
}

#[tokio::test]
async fn env_from_the_request_reaches_the_guest() {
    let m = manager();
    let id = m
        .create(json!({"runtime": "prober", "env": {"TOKEN": "abc"}}))
        .await;
    assert_eq!(
        m.exec(&id, "env").await["result"],
        "HOME=/workspace\nTOKEN=abc"
    );
}

#[tokio::test]
async fn output_is_capped_and_marked() {
    let m = manager();
    let id = session("counter").await;
    let v = m.exec(&id, "print 5000").await;
    assert_eq!(v["stdout"].as_str().unwrap().len(), 1000);
    assert_eq!(v["stderr"].as_str().unwrap().len(), 1000);
    assert_eq!(v["truncated"], true);
    let v = m.exec(&id, "print 10").await;
    assert_eq!(v["truncated"], false);
}

#[tokio::test]
async fn exit_and_trap_end_only_their_session() {
    let m = manager();
    let neighbour = session("counter").await;
    m.exec(&neighbour, "inc").await;
    let id = session("counter").await;
    let v = m.exec(&id, "exit 3").await;
    assert_eq!(v["end_reason"], "exit");
    let (status, v) = m
        .post(
            &format!("/v1/sessions/{id}/execute"),
            json!({"code": "get"}),
        )
        .await;
    assert_eq!((status, v["error"]["reason"].as_str()), (410, Some("exit")));
    let id = session("counter").await;
    m.exec(&id, "inc").await;
    let v = m.exec(&id, "trap").await;
    assert_eq!(v["rolled_back"], true, "{v}");
    assert!(
        v["rollback_reason"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{v}"
    );
    assert_eq!(
        m.exec(&id, "get").await["result"],
        "1",
        "back where it was before the trap"
    );
    let id = m
        .create(json!({"runtime": "counter", "rollback": false}))
        .await;
    let v = m.exec(&id, "trap").await;
    assert!(
        v["end_reason"].as_str().unwrap().starts_with("trap: "),
        "{v}"
    );
    let (status, v) = m
        .post(
            &format!("/v1/sessions/{id}/execute"),
            json!({"code": "get"}),
        )
        .await;
    assert_eq!(status, 410);
    assert!(
        v["error"]["reason"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{v}"
    );
    assert_eq!(
        m.exec(&neighbour, "get").await["result"],
        "1",
        "the neighbour never noticed"
    );
}

#[tokio::test]
async fn a_neighbour_answers_while_another_session_spins() {
    let m = manager();
    let spinner = session("spinner").await;
    let neighbour = session("counter").await;
    let url = m.url(&format!("/v1/sessions/{spinner}/execute"));
    let spin = tokio::spawn(async move {
        client()
            .post(url)
            .json(&json!({"code": "spin", "timeout_ms": 600_000}))
            .send()
            .await
            .unwrap()
    });
    // The spinner's turn is running: wait for that, not for a time.
    while m.get(&format!("/v1/sessions/{spinner}")).await.1["state"] != "running" {
        tokio::task::yield_now().await;
    }
    for n in 1..=20 {
        assert_eq!(m.exec(&neighbour, "inc").await["result"], n.to_string());
    }
    let (_, info) = m.get(&format!("/v1/sessions/{spinner}")).await;
    assert_eq!(
        info["state"], "running",
        "20 turns of the neighbour went while the spinner still spun"
    );
    assert!(!spin.is_finished());
    m.delete(&format!("/v1/sessions/{spinner}")).await;
    let (_, v) = decode(spin.await.unwrap()).await;
    assert_eq!(v["end_reason"], "deleted", "{v}");
}

#[tokio::test]
async fn executes_on_one_session_are_serialized() {
    let m = manager();
    let id = session("counter").await;
    let calls = (0..10).map(|_| {
        let url = m.url(&format!("/v1/sessions/{id}/execute"));
        tokio::spawn(async move {
            decode(
                client()
                    .post(url)
                    .json(&json!({"code": "inc"}))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        })
    });
    let mut results: Vec<u64> = Vec::new();
    for call in calls {
        let (status, v) = call.await.unwrap();
        assert_eq!(status, 200);
        results.push(v["result"].as_str().unwrap().parse().unwrap());
    }
    results.sort();
    assert_eq!(
        results,
        (1..=10).collect::<Vec<_>>(),
        "each turn saw the one before"
    );
}

#[tokio::test]
async fn a_full_manager_answers_429_with_retry_after() {
    let mut c = config();
    c.max_sessions = 2;
    let m = TestManager::start(c, Runtimes::guests());
    let a = m.create(json!({"runtime": "counter"})).await;
    m.create(json!({"runtime": "counter"})).await;
    let r = client()
        .post(m.url("/v1/sessions"))
        .json(&json!({"runtime": "counter"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["retry-after"], "1");
    let (status, v) = decode(r).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (429, Some("capacity_exhausted"))
    );
    assert_eq!(m.delete(&format!("/v1/sessions/{a}")).await.0, 204);
    // The slot comes back once the deleted session's store is gone.
    let mut created = 0;
    for _ in 0..100 {
        if m.post("/v1/sessions", json!({"runtime": "counter"}))
            .await
            .0
            == 201
        {
            created += 1;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(created, 1);
}

#[tokio::test]
async fn idle_and_lifetime_bounds_end_sessions() {
    let mut c = config();
    c.defaults.idle_ttl = Duration::from_millis(300);
    let idle = TestManager::start(c, Runtimes::guests());
    let id = idle.create(json!({"runtime": "counter"})).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let (status, v) = idle.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!((status, v["error"]["reason"].as_str()), (410, Some("idle")));

    let mut c = config();
    c.defaults.lifetime = Duration::from_millis(500);
    let life = TestManager::start(c, Runtimes::guests());
    let id = life.create(json!({"runtime": "spinner"})).await;
    // A turn is cut at the lifetime even with a longer deadline.
    let (_, v) = life
        .post(
            &format!("/v1/sessions/{id}/execute"),
            json!({"code": "spin", "timeout_ms": 10000}),
        )
        .await;
    assert_eq!(v["end_reason"], "lifetime", "{v}");
}

#[tokio::test]
async fn sessions_are_listed_and_deleted() {
    let m = manager();
    let id = session("counter").await;
    let (_, all) = m.get("/v1/sessions").await;
    assert!(
        all["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == id.as_str())
    );
    assert_eq!(m.delete(&format!("/v1/sessions/{id}")).await.0, 204);
    let (status, v) = m.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("session_not_found"))
    );
    assert_eq!(m.delete(&format!("/v1/sessions/{id}")).await.0, 404);
}

async fn raw(method: reqwest::Method, path: &str, body: Vec<u8>) -> (u16, Value) {
    let r = client()
        .request(method, manager().url(path))
        .body(body)
        .send()
        .await
        .unwrap();
    decode(r).await
}

/// Sends a 9 MiB body over a raw socket and reads the answer, which may come before the whole
/// body is sent (a client library can see that early close as a broken pipe).
async fn oversized(path: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = manager().base.trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        9 << 20
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let (mut rx, mut tx) = tcp.into_split();
    // The manager may answer and close before all of it is sent: write errors are expected.
    let writer = tokio::spawn(async move {
        let chunk = vec![b' '; 64 << 10];
        for _ in 0..(9 << 20) / chunk.len() {
            if tx.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let (head, body) = loop {
        let n = rx.read(&mut buf).await.unwrap();
        assert!(n > 0, "the manager closed without answering");
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|l| l.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= length {
                break (head.to_owned(), body.to_owned());
            }
        }
    };
    writer.abort();
    let status = head[9..12].parse().unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx() {
    let m = manager();
    let id = session("counter").await;
    let exec = format!("/v1/sessions/{id}/execute");
    let post = reqwest::Method::POST;
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("/v1/sessions", b"{not json".to_vec(), 400, "invalid_json"),
        (
            "/v1/sessions",
            b"{\"timeout_ms\": \"soon\"}".to_vec(),
            422,
            "invalid_request",
        ),
        (
            "/v1/sessions",
            b"{\"memory_mib\": -1}".to_vec(),
            422,
            "invalid_request",
        ),
        (
            "/v1/sessions",
            b"{\"typo\": 1}".to_vec(),
            422,
            "invalid_request",
        ),
        (
            "/v1/sessions",
            b"{\"runtime\": \"cobol\"}".to_vec(),
            422,
            "unknown_runtime",
        ),
        (
            "/v1/sessions",
            b"{\"runtime\": \"counter\", \"timeout_ms\": 0}".to_vec(),
            422,
            "invalid_request",
        ),
        (
            "/v1/sessions",
            b"{\"runtime\": \"counter\", \"memory_mib\": 999999}".to_vec(),
            422,
            "invalid_request",
        ),
        (
            "/v1/sessions",
            b"{\"runtime\": \"counter\", \"env\": {\"A=B\": \"x\"}}".to_vec(),
            422,
            "invalid_request",
        ),
        ("/v1/sessions", b"[1, 2]".to_vec(), 422, "invalid_request"),
        (&exec, b"".to_vec(), 400, "invalid_json"),
        (&exec, b"{\"code\": 42}".to_vec(), 422, "invalid_request"),
        (&exec, b"{}".to_vec(), 422, "invalid_request"),
        (
            &exec,
            b"{\"code\": \"get\", \"timeout_ms\": -5}".to_vec(),
            422,
            "invalid_request",
        ),
        (
            "/v1/sessions/nope/execute",
            b"{\"code\": \"get\"}".to_vec(),
            404,
            "session_not_found",
        ),
        ("/v1/nothing-here", b"".to_vec(), 404, "no_route"),
    ];
    for (path, body, status, code) in cases {
        let (got, v) = raw(post.clone(), path, body.clone()).await;
        assert_eq!(
            (got, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{path} {:?}: {v}",
            String::from_utf8_lossy(&body)
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let (got, v) = raw(reqwest::Method::PUT, "/v1/sessions", vec![]).await;
    assert_eq!(
        (got, v["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let (got, v) = oversized(&exec).await;
    assert_eq!(
        (got, v["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );
    assert_eq!(
        m.exec(&id, "inc").await["result"],
        "1",
        "nothing stored was lost"
    );
}

#[tokio::test]
async fn health_and_readiness() {
    let m = manager();
    assert_eq!(m.get("/healthz").await, (200, json!({"status": "ok"})));
    assert_eq!(m.get("/readyz").await, (200, json!({"status": "ready"})));
}

#[tokio::test]
async fn before_a_runtime_is_loaded_the_manager_is_not_ready() {
    let m = TestManager::start(config(), Runtimes::default());
    assert_eq!(m.get("/healthz").await.0, 200, "alive while loading");
    let (status, v) = m.get("/readyz").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (503, Some("not_ready"))
    );
    let r = client()
        .post(m.url("/v1/sessions"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers().get("retry-after").map(|v| v.to_str().unwrap()),
        Some("1"),
        "a client is told when to try again"
    );
    let (status, v) = decode(r).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (503, Some("not_ready"))
    );
}

#[tokio::test]
async fn a_seventeenth_waiting_execute_is_refused_as_busy() {
    let m = manager();
    let id = session("spinner").await;
    let url = m.url(&format!("/v1/sessions/{id}/execute"));
    let send = |code: &'static str| {
        let url = url.clone();
        tokio::spawn(async move {
            decode(
                client()
                    .post(url)
                    .json(&json!({"code": code, "timeout_ms": 60_000}))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        })
    };
    let running = send("spin");
    while m.get(&format!("/v1/sessions/{id}")).await.1["state"] != "running" {
        tokio::task::yield_now().await;
    }
    // 16 may wait behind the running turn; the ones past them answer at once, as busy,
    // while the waiting ones cannot answer before the spinner stops.
    let mut waiting: Vec<_> = (0..20).map(|_| send("ping")).collect();
    // Only a full queue refuses: four refusals mean all twenty arrived and sixteen wait.
    // (Deleting before then would let a late one find no session at all.)
    for _ in 0..4 {
        let (answer, _, rest) = futures_util::future::select_all(waiting).await;
        let (status, v) = answer.unwrap();
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (409, Some("session_busy")),
            "{v}"
        );
        waiting = rest;
    }
    m.delete(&format!("/v1/sessions/{id}")).await;
    for answer in futures_util::future::join_all(waiting).await {
        let (status, v) = answer.unwrap();
        // Queued behind the spinner when it was deleted: the session's end, not a hang.
        assert!(
            matches!(status, 200 | 410)
                && (v["end_reason"] == "deleted" || v["error"]["code"] == "session_ended"),
            "{status}: {v}"
        );
    }
    let (_, v) = running.await.unwrap();
    assert_eq!(v["end_reason"], "deleted", "{v}");
}
