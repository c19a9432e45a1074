//! The API surface over real sockets with CPython: files, streaming, gRPC (generated client),
//! load, metrics, drain, OpenAPI and auth.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arl_e2e::{Runtimes, TestManager, client, decode, python_config};
use arl_manager::ServeOptions;
use arl_proto::v1 as pb;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tonic::Code;

fn manager() -> &'static Arc<TestManager> {
    static M: OnceLock<Arc<TestManager>> = OnceLock::new();
    M.get_or_init(|| TestManager::start(python_config(), Runtimes::python()))
}

/// A manager of its own, for tests that change manager-wide state.
fn own_manager(
    tune: impl FnOnce(&mut arl_manager::ManagerConfig),
    options: ServeOptions,
) -> Arc<TestManager> {
    let mut c = python_config();
    c.max_sessions = 8;
    tune(&mut c);
    TestManager::start_with(c, Runtimes::python(), options)
}

/// Deterministic bytes that are not text: every value 0..=255, in a scrambled order.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sha256_hex(data: &[u8]) -> String {
    use std::fmt::Write;
    let digest = <sha2::Sha256 as sha2::Digest>::digest(data);
    digest.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

async fn put(m: &TestManager, id: &str, path: &str, data: Vec<u8>) -> (u16, Value) {
    let url = m.url(&format!("/v1/sessions/{id}/files/{path}"));
    decode(client().put(url).body(data).send().await.unwrap()).await
}

async fn download(m: &TestManager, id: &str, path: &str) -> (u16, Vec<u8>) {
    let url = m.url(&format!("/v1/sessions/{id}/files/{path}"));
    let r = client().get(url).send().await.unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn a_10_mib_file_round_trips_and_code_sees_uploads() {
    let m = manager();
    let id = m.create(json!({})).await;
    let data = noise(10 << 20);
    let (status, v) = put(m, &id, "data/big.bin", data.clone()).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(
        (v["path"].as_str(), v["kind"].as_str(), v["size"].as_u64()),
        (Some("data/big.bin"), Some("file"), Some(10 << 20))
    );
    let (status, back) = download(m, &id, "data/big.bin").await;
    assert_eq!(status, 200);
    assert!(back == data, "10 MiB came back byte for byte");
    let v = m
        .exec(
            &id,
            "import hashlib; b = open('data/big.bin', 'rb').read(); len(b), hashlib.sha256(b).hexdigest()",
        )
        .await;
    assert_eq!(
        v["result"].as_str().unwrap(),
        format!("({}, '{}')", 10 << 20, sha256_hex(&data)),
        "the guest reads the upload"
    );
    let (status, _) = put(m, &id, "data/big.bin", b"small now".to_vec()).await;
    assert_eq!(status, 200, "a replacement answers 200");
    assert_eq!(
        m.exec(&id, "open('data/big.bin').read()").await["result"],
        "'small now'"
    );
}

#[tokio::test]
async fn files_written_by_code_are_listed_downloaded_and_deleted() {
    let m = manager();
    let id = m.create(json!({})).await;
    m.exec(
        &id,
        "import os, pandas\nos.makedirs('out/plots', exist_ok=True)\n\
         pandas.DataFrame({'a': [1, 2], 'b': [3, 4]}).to_csv('out/result.csv', index=False)",
    )
    .await;
    let (status, csv) = download(m, &id, "out/result.csv").await;
    assert_eq!((status, csv.as_slice()), (200, &b"a,b\n1,3\n2,4\n"[..]));
    let (status, v) = m.get(&format!("/v1/sessions/{id}/files?path=out")).await;
    assert_eq!(status, 200, "{v}");
    let entries = v["entries"].as_array().unwrap();
    let names: Vec<_> = entries
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["out/plots", "out/result.csv"]);
    assert_eq!(entries[0]["kind"], "dir");
    assert_eq!(entries[1]["size"], 12);
    assert!(
        entries[1]["modified_at"]
            .as_str()
            .unwrap()
            .starts_with("20"),
        "mtime as RFC 3339: {v}"
    );
    let (_, root) = m.get(&format!("/v1/sessions/{id}/files")).await;
    assert_eq!(root["entries"][0]["path"], "out", "{root}");

    let (status, _) = m
        .delete(&format!("/v1/sessions/{id}/files/out/result.csv"))
        .await;
    assert_eq!(status, 204);
    let (status, v) = m
        .get(&format!("/v1/sessions/{id}/files/out/result.csv"))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("file_not_found"))
    );
    assert_eq!(
        m.exec(&id, "os.path.exists('out/result.csv')").await["result"],
        "False"
    );
    let (status, _) = m.delete(&format!("/v1/sessions/{id}/files/out")).await;
    assert_eq!(status, 204, "a folder goes with what it holds");
    assert_eq!(m.exec(&id, "os.listdir('.')").await["result"], "[]");
}

#[tokio::test]
async fn paths_out_of_the_workspace_are_refused() {
    let m = manager();
    let id = m.create(json!({})).await;
    // Encoded slashes keep `..` inside one URL segment, so the client cannot normalise it away.
    for path in [
        "..%2F..%2Fetc%2Fpasswd",
        "a%2F..%2F..%2Fsecret",
        "%2Fetc%2Fpasswd",
    ] {
        let (status, v) = put(m, &id, path, b"x".to_vec()).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some("invalid_path")),
            "{path}: {v}"
        );
        let (status, v) = m.get(&format!("/v1/sessions/{id}/files/{path}")).await;
        assert_eq!(status, 400, "{path}: {v}");
    }
    let (status, v) = m.get(&format!("/v1/sessions/{id}/files?path=..")).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_path"))
    );
    // A symlink the guest makes cannot lead the host out either.
    let v = m
        .exec(
            &id,
            "import os; os.symlink('../../../../../../../etc', 'up')",
        )
        .await;
    assert_eq!(v["error"], Value::Null, "{v}");
    let (status, v) = m.get(&format!("/v1/sessions/{id}/files/up/passwd")).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_path")),
        "{v}"
    );
    let (status, _) = put(m, &id, "up/planted", b"x".to_vec()).await;
    assert_eq!(status, 400);
    let (_, v) = m.get(&format!("/v1/sessions/{id}/files")).await;
    assert_eq!(v["entries"][0]["kind"], "symlink", "{v}");
}

#[tokio::test]
async fn the_workspace_quota_answers_413_and_keeps_what_is_there() {
    let m = own_manager(
        |c| c.defaults.workspace_bytes = 1 << 20,
        ServeOptions::default(),
    );
    let id = m.create(json!({})).await;
    let (status, _) = put(&m, &id, "a.bin", noise(600 << 10)).await;
    assert_eq!(status, 201);
    let (status, v) = put(&m, &id, "b.bin", noise(600 << 10)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (413, Some("quota_exceeded")),
        "{v}"
    );
    let (_, v) = m.get(&format!("/v1/sessions/{id}/files")).await;
    let names: Vec<_> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].clone())
        .collect();
    assert_eq!(
        names,
        [json!("a.bin")],
        "the refused upload left nothing behind"
    );
    let (status, back) = download(&m, &id, "a.bin").await;
    assert_eq!((status, back == noise(600 << 10)), (200, true));
}

#[tokio::test]
async fn uploads_side_by_side_cannot_each_take_the_room_left() {
    let m = own_manager(
        |c| c.defaults.workspace_bytes = 1 << 20,
        ServeOptions::default(),
    );
    let id = m.create(json!({})).await;
    // Six uploads of 300 KiB at once: each sees 1 MiB free when it begins, three fit.
    let uploads = (0..6).map(|n| {
        let (m, id) = (m.clone(), id.clone());
        tokio::spawn(async move { put(&m, &id, &format!("f{n}.bin"), noise(300 << 10)).await })
    });
    let mut stored = 0;
    for upload in futures_util::future::join_all(uploads).await {
        let (status, v) = upload.unwrap();
        match status {
            201 => stored += 1,
            413 => assert_eq!(v["error"]["code"], "quota_exceeded", "{v}"),
            other => panic!("{other}: {v}"),
        }
    }
    assert_eq!(stored, 3, "1 MiB holds three 300 KiB files");
    let (_, v) = m.get(&format!("/v1/sessions/{id}/files")).await;
    let total: u64 = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["size"].as_u64().unwrap())
        .sum();
    assert!(total <= 1 << 20, "{total} bytes stored under a 1 MiB quota");
}

#[tokio::test]
async fn what_the_guest_writes_counts_against_the_quota_and_stops_there() {
    let m = own_manager(
        |c| c.defaults.workspace_bytes = 1 << 20,
        ServeOptions::default(),
    );
    let id = m.create(json!({"timeout_ms": 60_000})).await;
    let files = format!("/v1/sessions/{id}/files");
    assert_eq!(m.exec(&id, "x = 1").await["error"], Value::Null);

    // Past the quota when the turn ends: rolled back, /tmp emptied.
    let v = m
        .exec(&id, "x = 2\nopen('/tmp/big', 'wb').write(b'0' * (2 << 20))")
        .await;
    assert_eq!(v["error"]["type"], "DiskQuotaExceeded", "{v}");
    assert_eq!(v["rollback_reason"], "disk_quota", "{v}");
    let v = m.exec(&id, "import os\n(x, os.listdir('/tmp'))").await;
    assert_eq!(v["result"], "(1, [])", "{v}");

    // Past it while the turn runs: stopped within a count (0.1 s), long before its deadline,
    // with what reached /workspace kept and every later turn refused until it is deleted.
    let started = Instant::now();
    let v = m
        .exec(
            &id,
            "x = 3\nwith open('/workspace/grow.bin', 'wb') as f:\n    while True:\n        \
             f.write(b'0' * 65536); f.flush()",
        )
        .await;
    assert_eq!(v["error"]["type"], "DiskQuotaExceeded", "{v}");
    assert!(started.elapsed() < Duration::from_secs(30), "not stopped");
    let (status, v) = m
        .post(&format!("/v1/sessions/{id}/execute"), json!({"code": "x"}))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (413, Some("quota_exceeded")),
        "{v}"
    );
    let (status, _) = m.delete(&format!("{files}/grow.bin")).await;
    assert_eq!(status, 204);
    assert_eq!(m.exec(&id, "x").await["result"], "1");
}

#[tokio::test]
async fn a_report_past_what_the_session_keeps_is_never_copied_out() {
    let m = own_manager(|c| c.defaults.output_bytes = 1000, ServeOptions::default());
    let id = m.create(json!({})).await;
    // The guest's driver cuts each field to the cap before it crosses, and says so.
    let v = m.exec(&id, "'é' * 20_000").await;
    assert_eq!(
        (v["truncated"].as_bool(), &v["error"]),
        (Some(true), &Value::Null),
        "{v}"
    );
    assert_eq!(
        v["result"].as_str().unwrap().len(),
        999,
        "cut on a character boundary"
    );
    let v = m.exec(&id, "raise ValueError('z' * 3_000_000)").await;
    assert_eq!(
        (v["error"]["type"].as_str(), v["truncated"].as_bool()),
        (Some("ValueError"), Some(true))
    );
    assert!(v["error"]["message"].as_str().unwrap().len() <= 1000, "{v}");
    // A guest that goes around the driver: its frame, past what the host reads (24 times
    // the cap), is never copied out of the guest, and the turn says so.
    let bypass = "import _arl, _host\n\
                  _arl.run = lambda src, n, cap=None: \
                  _host.call(b'{\"result\": \"' + b'x' * 3_000_000 + b'\"}')";
    assert_eq!(m.exec(&id, bypass).await["error"], Value::Null);
    let v = m.exec(&id, "1").await;
    assert_eq!(v["error"]["type"], "ReportTooLarge", "{v}");
    assert_eq!(
        (v["truncated"].as_bool(), &v["result"]),
        (Some(true), &Value::Null),
        "{v}"
    );
}

/// Between SIGTERM and the servers closing, the manager refuses new sessions (HTTP 503
/// `shutting_down`, gRPC `UNAVAILABLE`) and serves the ones it has.
#[tokio::test]
async fn a_stopping_manager_refuses_new_sessions_and_serves_its_own() {
    let m = own_manager(|_| {}, ServeOptions::default());
    let id = m.create(json!({})).await;
    m.exec(&id, "x = 41").await;
    let mut rpc = m.grpc_client().await;
    m.registry.stop_accepting();
    for path in ["/v1/sessions".to_owned(), format!("/v1/sessions/{id}/fork")] {
        let (status, v) = m.post(&path, json!({})).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (503, Some("shutting_down")),
            "{path}: {v}"
        );
    }
    let refused = rpc
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(m.exec(&id, "x + 1").await["result"], "42");
    assert_eq!(m.delete(&format!("/v1/sessions/{id}")).await.0, 204);
}

/// One Server-Sent Event: its name and its data.
#[derive(Debug, Clone)]
struct Sse {
    event: String,
    data: Value,
    at: Instant,
}

/// Reads events from a streamed execute until `stop` says so or the stream ends.
async fn read_events(r: reqwest::Response, mut stop: impl FnMut(&Sse) -> bool) -> Vec<Sse> {
    let mut body = r.bytes_stream();
    let (mut buf, mut events) = (String::new(), Vec::new());
    while let Some(chunk) = body.next().await {
        buf.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let (mut event, mut data) = (String::new(), String::new());
            for line in frame.lines() {
                if let Some(e) = line.strip_prefix("event: ").or(line.strip_prefix("event:")) {
                    event = e.trim().to_owned();
                } else if let Some(d) = line.strip_prefix("data: ").or(line.strip_prefix("data:")) {
                    data.push_str(d);
                }
            }
            if event.is_empty() {
                continue; // a keep-alive comment
            }
            let sse = Sse {
                event,
                data: serde_json::from_str(&data).unwrap(),
                at: Instant::now(),
            };
            let done = stop(&sse);
            events.push(sse);
            if done {
                return events;
            }
        }
    }
    events
}

async fn stream_execute(m: &TestManager, id: &str, code: &str) -> reqwest::Response {
    let r = client()
        .post(m.url(&format!("/v1/sessions/{id}/execute")))
        .header("accept", "text/event-stream")
        .json(&json!({ "code": code }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"),
        "{:?}",
        r.headers()
    );
    r
}

#[tokio::test]
async fn streaming_shows_output_before_the_turn_ends() {
    let m = manager();
    let id = m.create(json!({})).await;
    let code = "import time, sys\nfor i in range(5):\n    print(i)\n    time.sleep(0.2)\n\
                print('warn', file=sys.stderr)\n'done'";
    let r = stream_execute(m, &id, code).await;
    let events = read_events(r, |_| false).await;
    let names: Vec<_> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names.last(), Some(&"result"), "{names:?}");
    let first = events.iter().find(|e| e.event == "stdout").unwrap();
    assert_eq!(first.data["text"], "0\n", "one line per print");
    let last = events.last().unwrap();
    assert!(
        last.at.duration_since(first.at) >= Duration::from_millis(600),
        "the first chunk came while the turn still ran ({:?} before its end)",
        last.at.duration_since(first.at)
    );
    let streamed: String = events
        .iter()
        .filter(|e| e.event == "stdout")
        .map(|e| e.data["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, "0\n1\n2\n3\n4\n");
    assert!(
        events
            .iter()
            .any(|e| e.event == "stderr" && e.data["text"] == "warn\n")
    );
    assert_eq!(
        last.data["stdout"], "0\n1\n2\n3\n4\n",
        "the result event is whole"
    );
    assert_eq!(last.data["result"], "'done'");
    assert_eq!(m.exec(&id, "i").await["result"], "4", "the session goes on");
}

/// Waits until session `id` is running a turn.
async fn wait_running(m: &TestManager, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = m.get(&format!("/v1/sessions/{id}")).await;
        if v["state"] == "running" {
            return;
        }
        assert!(Instant::now() < deadline, "never running: {v}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_ended(m: &TestManager, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, v) = m.get(&format!("/v1/sessions/{id}")).await;
        if status == 410 {
            return v;
        }
        assert!(Instant::now() < deadline, "still {status} {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the turn whose caller went away has been stopped and rolled back (well before
/// the 20 s deadline would have stopped it), and checks the session is back where it was.
async fn wait_rolled_back(m: &TestManager, id: &str) {
    let started = Instant::now();
    assert_eq!(
        m.exec(id, "kept").await["result"],
        "'before'",
        "the turn's effects are undone"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped late: {:?}",
        started.elapsed()
    );
    let (_, history) = m.get_text(&format!("/v1/sessions/{id}/history")).await;
    let last_but_one: Value = serde_json::from_str(history.lines().rev().nth(1).unwrap()).unwrap();
    assert_eq!(last_but_one["rollback_reason"], "cancelled", "{history}");
}

#[tokio::test]
async fn a_client_that_disconnects_stops_its_turn() {
    let m = manager();
    let id = m.create(json!({})).await;
    m.exec(&id, "kept = 'before'").await;
    let neighbour = m.create(json!({})).await;
    let r = stream_execute(
        m,
        &id,
        "kept = 'during'\nprint('spinning')\nwhile True: pass",
    )
    .await;
    let seen = read_events(r, |e| e.event == "stdout").await;
    assert_eq!(seen.last().unwrap().data["text"], "spinning\n");
    // `read_events` dropped the response: the connection is gone.
    wait_rolled_back(m, &id).await;
    assert_eq!(m.exec(&neighbour, "1 + 1").await["result"], "2");
    let (_, metrics) = metrics_text(m).await;
    assert!(
        metrics.contains(r#"arl_executions_total{outcome="cancelled"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_plain_execute_whose_client_gives_up_is_stopped_too() {
    let m = manager();
    let id = m.create(json!({})).await;
    m.exec(&id, "kept = 'before'").await;
    // The client gives up once its turn runs (not after a fixed time, which a loaded machine
    // could spend before the turn even starts).
    let give_up_while_running = |id: String, code: &'static str| async move {
        let url = m.url(&format!("/v1/sessions/{id}/execute"));
        let call = tokio::spawn(client().post(url).json(&json!({ "code": code })).send());
        wait_running(m, &id).await;
        call.abort();
        assert!(call.await.unwrap_err().is_cancelled());
    };
    give_up_while_running(id.clone(), "kept = 'during'\nwhile True: pass").await;
    wait_rolled_back(m, &id).await;

    // Created with `rollback: false`, the session ends instead, as it used to.
    let id = m.create(json!({"rollback": false})).await;
    give_up_while_running(id.clone(), "while True: pass").await;
    let v = wait_ended(m, &id).await;
    assert_eq!(v["error"]["reason"], "cancelled", "{v}");
}

async fn metrics_text(m: &TestManager) -> (String, String) {
    let r = client().get(m.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let kind = r.headers()["content-type"].to_str().unwrap().to_owned();
    (kind, r.text().await.unwrap())
}

#[tokio::test]
async fn load_and_metrics_follow_the_sessions() {
    let m = manager();
    let id = m.create(json!({})).await;
    m.exec(&id, "x = 1").await;
    let (status, load) = m.get("/v1/load").await;
    assert_eq!(status, 200);
    assert_eq!(load["capacity"], 64);
    assert_eq!(load["draining"], false);
    assert!(load["sessions"].as_u64().unwrap() >= 1, "{load}");
    assert!(load["memory_bytes"].as_u64().unwrap() >= 40 << 20, "{load}");
    // A session that ended, so that the ended counter has a series whichever tests ran first:
    // wait for it to be counted (its task ends just after the delete answers).
    let gone = m.create(json!({})).await;
    m.delete(&format!("/v1/sessions/{gone}")).await;
    let (kind, text) = loop {
        let (kind, text) = metrics_text(m).await;
        if text.contains(r#"arl_sessions_ended_total{reason="deleted"}"#) {
            break (kind, text);
        }
        tokio::task::yield_now().await;
    };
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    for name in arl_manager::metrics::ALL {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    // The README's table lists exactly the metrics there are.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let mut documented: Vec<&str> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `arl_"))
        .filter_map(|rest| rest.split('`').next())
        .collect();
    documented.sort_unstable();
    let mut exposed: Vec<&str> = arl_manager::metrics::ALL
        .iter()
        .map(|n| n.trim_start_matches("arl_"))
        .collect();
    exposed.sort_unstable();
    assert_eq!(documented, exposed, "the README's metrics table");
    assert!(text.contains("arl_sessions_capacity 64"), "{text}");
    assert!(text.contains(r#"arl_sessions_created_total{runtime="python"}"#));
    assert!(text.contains(r#"arl_executions_total{outcome="ok"}"#));
    assert!(text.contains("arl_execution_duration_seconds_bucket"));
    assert!(
        text.contains(r#"arl_http_requests_total{method="GET",route="/v1/load",status="200"}"#),
        "{text}"
    );
    assert!(
        text.contains(r#"route="/v1/sessions/{id}/execute""#),
        "routes are counted by pattern, not by id"
    );
    // Made-up methods share one label: they cannot grow the series without bound.
    for made_up in ["FROB1", "FROB2"] {
        let method = reqwest::Method::from_bytes(made_up.as_bytes()).unwrap();
        let r = client()
            .request(method, m.url("/v1/load"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{made_up}");
    }
    let (_, text) = metrics_text(m).await;
    assert!(!text.contains("FROB"), "{text}");
    assert!(
        text.contains(r#"arl_http_requests_total{method="other","#),
        "{text}"
    );
}

#[tokio::test]
async fn drain_refuses_new_sessions_while_existing_ones_continue() {
    let m = own_manager(|_| {}, ServeOptions::default());
    let id = m.create(json!({})).await;
    m.exec(&id, "kept = 'yes'").await;
    let (status, load) = m.post("/v1/drain", Value::Null).await;
    assert_eq!((status, load["draining"].as_bool()), (200, Some(true)));
    let (status, v) = m.post("/v1/sessions", json!({})).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (503, Some("draining")),
        "{v}"
    );
    let r = client().post(m.url("/session")).send().await.unwrap();
    assert_eq!(r.status(), 503, "the RLM route too");
    let mut grpc = m.grpc_client().await;
    let refused = grpc
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert_eq!(m.exec(&id, "kept").await["result"], "'yes'");
    let (_, load) = m.get("/v1/load").await;
    assert_eq!(
        (load["draining"].as_bool(), load["sessions"].as_u64()),
        (Some(true), Some(1))
    );
    let (status, _) = m.delete("/v1/drain").await;
    assert_eq!(status, 200);
    m.create(json!({})).await;
    let load = grpc.drain(pb::DrainRequest {}).await.unwrap().into_inner();
    assert!(load.draining && load.sessions == 2, "{load:?}");
}

#[tokio::test]
async fn grpc_mirrors_the_http_api() {
    let m = manager();
    let mut grpc = m.grpc_client().await;
    let created = grpc
        .create_session(pb::CreateSessionRequest {
            env: [("WHO".to_owned(), "grpc".to_owned())].into(),
            timeout_ms: Some(5000),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.runtime, "python");
    assert_eq!(created.limits.unwrap().timeout_ms, 5000);
    let id = created.id;
    let (status, _) = m.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(status, 200, "one registry behind both APIs");
    let netted = grpc
        .create_session(pb::CreateSessionRequest {
            network: Some(pb::NetworkPolicy {
                allow: vec!["api.example.com:8443".into()],
                max_bytes: Some(1 << 20),
                max_requests: None,
            }),
            tools: [(
                "llm_query".to_owned(),
                pb::ToolSpec {
                    url: "http://127.0.0.1:9/llm".into(),
                    headers: Default::default(),
                },
            )]
            .into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (_, view) = m.get(&format!("/v1/sessions/{}", netted.id)).await;
    assert_eq!(
        (
            &view["network"]["allow"],
            &view["network"]["max_bytes"],
            &view["network"]["tools"]
        ),
        (
            &json!(["api.example.com:8443"]),
            &json!(1 << 20),
            &json!(["llm_query"])
        ),
        "{view}"
    );
    m.delete(&format!("/v1/sessions/{}", netted.id)).await;
    let listed = grpc
        .list_sessions(pb::ListSessionsRequest {})
        .await
        .unwrap();
    assert!(listed.get_ref().sessions.iter().any(|s| s.id == id));

    let run = |code: &str| pb::ExecuteRequest {
        session_id: id.clone(),
        code: code.into(),
        timeout_ms: None,
    };
    let mut events = grpc
        .execute(run(
            "import os\nprint('hi', os.environ['WHO'])\ndisplay({'k': 1})\nx = 41\nx + 1",
        ))
        .await
        .unwrap()
        .into_inner();
    let (mut output, mut shown, mut result) = (Vec::new(), Vec::new(), None);
    while let Some(event) = events.message().await.unwrap() {
        match event.event.unwrap() {
            pb::execute_event::Event::Output(chunk) => {
                assert_eq!(chunk.stream, pb::Stream::Stdout as i32);
                output.extend(chunk.data);
            }
            pb::execute_event::Event::Display(d) => {
                assert!(result.is_none(), "displays come before the result");
                shown.push(d);
            }
            pb::execute_event::Event::Result(r) => result = Some(r),
        }
    }
    let result = result.expect("a result message ends the stream");
    assert_eq!(output, b"hi grpc\n");
    assert_eq!(
        (result.result.as_deref(), result.stdout.as_str()),
        (Some("42"), "hi grpc\n")
    );
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0].data["text/plain"], "{'k': 1}");
    assert!(!shown[0].is_main_result);
    let mains: Vec<_> = result.results.iter().map(|d| d.is_main_result).collect();
    assert_eq!(mains, [false, true], "{:?}", result.results);
    assert_eq!(result.results[1].data["text/plain"], "42");
    let mut failing = grpc.execute(run("1/0")).await.unwrap().into_inner();
    let Some(pb::execute_event::Event::Result(r)) = failing.message().await.unwrap().unwrap().event
    else {
        panic!("a result")
    };
    assert_eq!(r.error.unwrap().r#type, "ZeroDivisionError");

    // Files, in chunks both ways.
    let data = noise(300 << 10);
    let chunks: Vec<_> = data
        .chunks(100 << 10)
        .enumerate()
        .map(|(i, c)| pb::WriteFileRequest {
            session_id: if i == 0 { id.clone() } else { String::new() },
            path: if i == 0 {
                "in/blob.bin".into()
            } else {
                String::new()
            },
            data: c.to_vec(),
        })
        .collect();
    let written = grpc
        .write_file(futures_util::stream::iter(chunks))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (written.path.as_str(), written.size),
        ("in/blob.bin", 300 << 10)
    );
    let v = m.exec(&id, "len(open('in/blob.bin', 'rb').read())").await;
    assert_eq!(v["result"], (300 << 10).to_string());
    let mut read = grpc
        .read_file(pb::ReadFileRequest {
            session_id: id.clone(),
            path: "in/blob.bin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut back = Vec::new();
    while let Some(chunk) = read.message().await.unwrap() {
        back.extend(chunk.data);
    }
    assert!(back == data, "the file came back byte for byte");
    let listed = grpc
        .list_files(pb::ListFilesRequest {
            session_id: id.clone(),
            path: "in".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    assert_eq!(listed.entries[0].kind, "file");
    grpc.delete_file(pb::DeleteFileRequest {
        session_id: id.clone(),
        path: "in".into(),
    })
    .await
    .unwrap();

    // The same refusals, as status codes.
    let code = |e: tonic::Status| e.code();
    let bad_path = grpc
        .read_file(pb::ReadFileRequest {
            session_id: id.clone(),
            path: "../etc/passwd".into(),
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(code(bad_path), Code::InvalidArgument);
    let missing = grpc
        .read_file(pb::ReadFileRequest {
            session_id: id.clone(),
            path: "in/blob.bin".into(),
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(code(missing), Code::NotFound);
    let unknown = grpc
        .get_session(pb::GetSessionRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(code(unknown), Code::NotFound);
    let invalid = grpc
        .create_session(pb::CreateSessionRequest {
            runtime: "cobol".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(code(invalid), Code::InvalidArgument);
    let refused = grpc
        .create_session(pb::CreateSessionRequest {
            network: Some(pb::NetworkPolicy {
                allow: vec!["*.com".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("network.allow[0]"),
        "{}",
        refused.message()
    );
    let mut exit = grpc
        .execute(run("import os; os._exit(3)"))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::execute_event::Event::Result(r)) = exit.message().await.unwrap().unwrap().event
    else {
        panic!("a result")
    };
    assert_eq!(
        (r.session_ended, r.end_reason.as_deref()),
        (true, Some("exit"))
    );
    let ended = grpc
        .get_session(pb::GetSessionRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(code(ended), Code::FailedPrecondition);
    assert!(ended_message(&ended_status(&mut grpc, &id).await).contains("exit"));

    let load = grpc
        .get_load(pb::GetLoadRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(load.capacity, 64);
}

async fn ended_status(
    grpc: &mut pb::sessions_client::SessionsClient<tonic::transport::Channel>,
    id: &str,
) -> tonic::Status {
    grpc.execute(pb::ExecuteRequest {
        session_id: id.into(),
        code: "1".into(),
        timeout_ms: None,
    })
    .await
    .map(|_| ())
    .unwrap_err()
}

fn ended_message(status: &tonic::Status) -> String {
    assert_eq!(status.code(), Code::FailedPrecondition);
    status.message().to_owned()
}

#[tokio::test]
async fn a_cancelled_grpc_execute_stops_its_turn() {
    let m = manager();
    let mut grpc = m.grpc_client().await;
    let id = grpc
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap()
        .into_inner()
        .id;
    m.exec(&id, "kept = 'before'").await;
    let mut events = grpc
        .execute(pb::ExecuteRequest {
            session_id: id.clone(),
            code: "kept = 'during'\nprint('spinning')\nwhile True: pass".into(),
            timeout_ms: None,
        })
        .await
        .unwrap()
        .into_inner();
    let first = events.message().await.unwrap().unwrap();
    assert!(matches!(
        first.event,
        Some(pb::execute_event::Event::Output(_))
    ));
    drop(events);
    wait_rolled_back(m, &id).await;
}

#[tokio::test]
async fn grpc_health_says_serving() {
    let m = manager();
    let channel = tonic::transport::Channel::from_shared(m.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "arl.v1.Sessions"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
}

#[tokio::test]
async fn a_token_guards_every_route_but_the_probes() {
    let m = own_manager(
        |_| {},
        ServeOptions {
            auth_token: Some("s3cret".into()),
            ..ServeOptions::default()
        },
    );
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(m.get(probe).await.0, 200, "{probe}");
    }
    for (method, path) in [
        ("POST", "/v1/sessions"),
        ("GET", "/v1/sessions"),
        ("GET", "/v1/load"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("POST", "/v1/drain"),
        ("POST", "/session"),
        ("GET", "/no/such/route"),
    ] {
        for token in [None, Some("Bearer wrong"), Some("s3cret")] {
            let mut r = client().request(method.parse().unwrap(), m.url(path));
            if let Some(t) = token {
                r = r.header("authorization", t);
            }
            let r = r.send().await.unwrap();
            assert_eq!(r.status(), 401, "{method} {path} with {token:?}");
            assert_eq!(r.headers()["www-authenticate"], "Bearer");
            let (_, v) = decode(r).await;
            assert_eq!(v["error"]["code"], "unauthorized");
        }
    }
    let r = client()
        .post(m.url("/v1/sessions"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let mut grpc = m.grpc_client().await;
    let refused = grpc.get_load(pb::GetLoadRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let mut request = tonic::Request::new(pb::GetLoadRequest {});
    request
        .metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    let load = grpc.get_load(request).await.unwrap().into_inner();
    assert_eq!(load.sessions, 1);
}

/// Every `METHOD /path` the README's route tables name, with `{*path}` written `{path}`.
fn readme_routes() -> BTreeSet<(String, String)> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    readme
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| {
            let (method, rest) = rest.split_once(' ')?;
            if !["GET", "POST", "PUT", "DELETE"].contains(&method) {
                return None;
            }
            let path = rest.split(['`', '?']).next()?.to_owned();
            Some((method.to_lowercase(), path))
        })
        .collect()
}

#[tokio::test]
async fn openapi_lists_every_route_and_validates() {
    let m = own_manager(|_| {}, ServeOptions::default()); // some routes delete or drain
    let (status, doc) = m.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.clone(), path.clone()));
        }
    }
    let readme = readme_routes();
    assert!(
        readme.len() >= 20,
        "the README's route tables were read: {readme:?}"
    );
    let undocumented: Vec<_> = readme.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from /openapi.json: {undocumented:?}"
    );
    let unlisted: Vec<_> = documented.difference(&readme).collect();
    assert!(
        unlisted.is_empty(),
        "routes missing from the README: {unlisted:?}"
    );
    // And every documented route is served: none answers "no such route".
    for (method, path) in &documented {
        let url = m.url(
            &path
                .replace("{id}", "nope")
                .replace("{session_id}", "nope")
                .replace("{path}", "f"),
        );
        let r = client()
            .request(method.to_uppercase().parse().unwrap(), url)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let (_, v) = decode_any(r).await;
        assert!(
            ![Some("no_route"), Some("method_not_allowed")].contains(&v["error"]["code"].as_str()),
            "{method} {path}: {status} {v}"
        );
        // (The walk drains this manager: creates after it answer 503 `draining`, rightly.)
        assert!(
            status != 500 && v["error"]["code"] != "internal",
            "{method} {path}: a made-up id is the client's error, {status} {v}"
        );
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for schema in [
        "CreateRequest",
        "ExecuteRequest",
        "ExecuteResponse",
        "ErrorBody",
        "Load",
        "FileView",
    ] {
        assert!(schemas.contains_key(schema), "{schema} missing");
    }
    validate_openapi(&doc);
}

async fn decode_any(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Checks `doc` with the PyPI package `openapi-spec-validator`, installed once into the cache.
fn validate_openapi(doc: &Value) {
    let target = arl_e2e::pytools(&["openapi-spec-validator==0.7.2"]);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec(doc).unwrap()).unwrap();
    let out = std::process::Command::new(arl_e2e::python())
        .arg("-c")
        .arg(
            "import json, sys; sys.path.insert(0, sys.argv[1])\n\
             from openapi_spec_validator import validate\n\
             validate(json.load(open(sys.argv[2])))\nprint('valid')",
        )
        .arg(&target)
        .arg(file.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "/openapi.json is not valid OpenAPI: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
