//! The third-party clients ARL serves unchanged, driven as their users run them: the PyPI
//! packages, pinned, against a manager on a real socket.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use arl_e2e::{Runtimes, TestManager, client, python_config, run_client};
use arl_manager::ServeOptions;

/// The client versions these tests pin.
pub const SANDBOX_FUSION: [&str; 1] = ["sandbox-fusion==0.3.7"];

#[tokio::test]
async fn the_sandbox_fusion_client_runs_programs_unchanged() {
    let m = TestManager::start(python_config(), Runtimes::ours());
    run_client("fusion.py", &[&m.base], &SANDBOX_FUSION).await;
    assert_eq!(
        m.registry.load().sessions,
        0,
        "every program's session is gone"
    );
}

/// With a token set, a client that can send no header carries it in its base URL.
#[tokio::test]
async fn a_token_in_the_path_lets_sandbox_fusion_in_and_nothing_else_does() {
    let options = ServeOptions {
        auth_token: Some("s3cret".into()),
        ..ServeOptions::default()
    };
    let m = TestManager::start_with(python_config(), Runtimes::ours(), options);
    let body = serde_json::json!({ "code": "print(1)", "language": "python" });
    for path in ["/run_code", "/fusion/wrong/run_code", "/fusion//run_code"] {
        let r = client().post(m.url(path)).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let r = client()
        .get(m.url("/fusion/s3cret/v1/sessions"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        404,
        "the path token opens only the SandboxFusion routes"
    );
    run_client("fusion.py", &[&m.url("/fusion/s3cret")], &SANDBOX_FUSION).await;
}

/// The E2B code interpreter SDK, pinned.
pub const E2B: [&str; 1] = ["e2b-code-interpreter==2.11.5"];

#[tokio::test]
async fn the_e2b_sdk_creates_runs_and_kills_unchanged() {
    let m = TestManager::start(python_config(), Runtimes::ours());
    run_client("e2b_sdk.py", &[&m.base], &E2B).await;
    assert_eq!(m.registry.load().sessions, 0, "killed");
}

/// With a token set, the SDK's API key is the token, and the sandbox's access token the SDK
/// is handed back carries it on `/execute`.
#[tokio::test]
async fn the_e2b_sdk_authenticates_with_the_token_as_its_api_key() {
    let options = ServeOptions {
        auth_token: Some("s3cret".into()),
        ..ServeOptions::default()
    };
    let m = TestManager::start_with(python_config(), Runtimes::ours(), options);
    let r = client()
        .post(m.url("/v2/sandboxes"))
        .header("x-api-key", "wrong")
        .json(&serde_json::json!({ "templateID": "code-interpreter-v1" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    run_client("e2b_sdk.py", &[&m.base, "s3cret"], &E2B).await;
}

/// E2B's calls with bad input answer a 4xx in E2B's shape (Connect's for the filesystem
/// service), never a 500, and touch nothing outside the sandbox's files.
#[tokio::test]
async fn bad_e2b_input_is_refused_in_e2b_shapes() {
    use arl_e2e::decode;
    use serde_json::{Value, json};
    let m = TestManager::start(python_config(), Runtimes::python());
    let post = |path: &str, id: &str, body: Value| {
        client()
            .post(m.url(path))
            .header("e2b-sandbox-id", id)
            .json(&body)
            .send()
    };
    let e2b_error = |(status, v): (u16, Value), want: u16, what: &str| {
        assert_eq!(status, want, "{what}: {v}");
        assert_eq!(v["code"], want, "{what}: E2B's shape: {v}");
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
    };
    for (body, want, what) in [
        (json!({ "templateID": "nope" }), 400, "unknown template"),
        (json!({ "timeout": 0 }), 422, "no lifetime"),
        (json!({ "metadata": { "": "x" } }), 422, "an empty label"),
        (json!({ "templateID": 5 }), 400, "a malformed body"),
    ] {
        let r = post("/v2/sandboxes", "", body).await.unwrap();
        e2b_error(decode(r).await, want, what);
    }
    let r = post("/v2/sandboxes", "", json!({})).await.unwrap();
    let (status, created) = decode(r).await;
    assert_eq!(status, 201, "{created}");
    let id = created["sandboxID"].as_str().unwrap().to_owned();

    let timeout = format!("/sandboxes/{id}/timeout");
    for (path, body, want) in [
        (timeout.as_str(), json!({ "timeout": 0 }), 400),
        (timeout.as_str(), json!({}), 400),
        ("/sandboxes/nope/timeout", json!({ "timeout": 5 }), 404),
    ] {
        let r = post(path, "", body).await.unwrap();
        e2b_error(decode(r).await, want, path);
    }
    for (path, body, want, what) in [
        (
            "/execute",
            json!({ "code": "1", "context_id": "nope" }),
            404,
            "unknown context",
        ),
        (
            "/execute",
            json!({ "code": "1", "language": "r" }),
            400,
            "unknown language",
        ),
        (
            "/execute",
            json!({ "code": "1", "env_vars": { "A": "1" } }),
            400,
            "per-run env",
        ),
        (
            "/contexts",
            json!({ "language": "r" }),
            400,
            "a context in R",
        ),
        (
            "/contexts/nope/restart",
            json!({}),
            404,
            "restart of no context",
        ),
    ] {
        let r = post(path, &id, body).await.unwrap();
        e2b_error(decode(r).await, want, what);
    }
    let r = client()
        .delete(m.url("/contexts/default"))
        .header("e2b-sandbox-id", &id)
        .send()
        .await
        .unwrap();
    e2b_error(decode(r).await, 400, "removing the default context");
    let r = client()
        .get(m.url("/v2/sandboxes?metadata=%2525FF%3D1"))
        .send()
        .await
        .unwrap();
    e2b_error(decode(r).await, 400, "labels that are not UTF-8");

    // The filesystem service: Connect's codes, nothing outside the home touched.
    let fs = |method: &str| format!("/filesystem.Filesystem/{method}");
    let r = post(&fs("MakeDir"), &id, json!({ "path": "/home/user/d" }))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for (method, body, want, code) in [
        (
            "Stat",
            json!({ "path": "/etc/passwd" }),
            400,
            "invalid_argument",
        ),
        (
            "Stat",
            json!({ "path": "../../etc/passwd" }),
            400,
            "invalid_argument",
        ),
        (
            "ListDir",
            json!({ "path": "/home/user/none" }),
            404,
            "not_found",
        ),
        (
            "MakeDir",
            json!({ "path": "/home/user/d" }),
            409,
            "already_exists",
        ),
        (
            "Remove",
            json!({ "path": "/home/user" }),
            400,
            "invalid_argument",
        ),
        ("Remove", json!({ "path": "/tmp" }), 400, "invalid_argument"),
        (
            "Move",
            json!({ "source": "d", "destination": "/etc/d" }),
            400,
            "invalid_argument",
        ),
        (
            "Move",
            json!({ "source": "none", "destination": "e" }),
            404,
            "not_found",
        ),
        ("Stat", json!({}), 400, "invalid_argument"),
        ("WatchDir", json!({ "path": "d" }), 501, "unimplemented"),
    ] {
        let (status, v) = decode(post(&fs(method), &id, body).await.unwrap()).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (want, Some(code)),
            "{method}: {v}"
        );
    }
    let r = client()
        .post(m.url(&fs("Stat")))
        .header("e2b-sandbox-id", &id)
        .body("{not json")
        .send()
        .await
        .unwrap();
    let (status, v) = decode(r).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("invalid_argument")),
        "{v}"
    );
    let r = post(&fs("Stat"), "nope", json!({ "path": "d" }))
        .await
        .unwrap();
    let (status, v) = decode(r).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (404, Some("not_found")),
        "{v}"
    );

    // A raw upload, as envd 0.5.7 takes one: inside the home only.
    let upload = |path: &str| {
        client()
            .post(m.url(&format!("/files?path={path}")))
            .header("e2b-sandbox-id", &id)
            .header("content-type", "application/octet-stream")
            .body("raw bytes")
            .send()
    };
    let r = upload("/etc/raw").await.unwrap();
    e2b_error(decode(r).await, 400, "an upload outside the home");
    let (status, v) = decode(upload("/home/user/d/raw.txt").await.unwrap()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v[0]["path"], "/home/user/d/raw.txt", "{v}");
    let r = client()
        .get(m.url("/files?path=d/raw.txt"))
        .header("e2b-sandbox-id", &id)
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "raw bytes");

    // A sandbox that is gone is not running, as E2B's proxy says it.
    let r = client()
        .delete(m.url(&format!("/sandboxes/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = client()
        .get(m.url("/health"))
        .header("e2b-sandbox-id", &id)
        .send()
        .await
        .unwrap();
    e2b_error(decode(r).await, 502, "health of a killed sandbox");
}

/// The official MCP Python SDK, pinned.
pub const MCP: [&str; 1] = ["mcp==2.3.0"];

/// An MCP client (the official Python SDK, streamable HTTP) lists ARL's tools, keeps state
/// across two `execute`s in one session, gets a figure as image content, and gets errors it
/// can read for bad input; with a token, as the rest of the API takes it.
#[tokio::test]
async fn an_mcp_client_runs_code_in_sessions_through_the_official_sdk() {
    let options = ServeOptions {
        auth_token: Some("s3cret".into()),
        ..ServeOptions::default()
    };
    let m = TestManager::start_with(python_config(), Runtimes::ours(), options);
    let r = client()
        .post(m.url("/mcp"))
        .json(&serde_json::json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/list" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "MCP takes the same token as the rest");
    run_client("mcp_client.py", &[&m.url("/mcp"), "s3cret"], &MCP).await;
    assert_eq!(m.registry.load().sessions, 0, "every session is gone");
}
