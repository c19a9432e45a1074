//! The gateway's placement and routing over real managers (in-process `arl-manager`s serving
//! the `counter` guest on loopback), served on a real socket: what it answers with no
//! manager, `?pool=`, the summed load, and the RLM sidecar routes.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::sync::Arc;

use arl_e2e::{Runtimes, TestManager, guests};
use arl_operator::fleet::{Fleet, Member};
use arl_operator::gateway::{Gateway, router};
use arl_operator::manager::{Endpoint, Managers};
use serde_json::{Value, json};

/// A manager standing for pod `pod` of pool `pool` in namespace `agents`.
fn manager(pod: &str) -> Arc<TestManager> {
    let mut config = arl_e2e::config();
    config.id_prefix = format!("agents.{pod}");
    config.max_sessions = 8;
    TestManager::start(
        config,
        Runtimes {
            guests: vec![("counter", guests::COUNTER)],
            ..Runtimes::default()
        },
    )
}

fn member(pod: &str, pool: &str, manager: &TestManager) -> Member {
    Member {
        name: pod.into(),
        namespace: "agents".into(),
        pool: pool.into(),
        runtime: Some("counter".into()),
        endpoint: Endpoint {
            http: manager.base.clone(),
            token: None,
        },
        grpc: None,
        ready: true,
        draining: false,
        load: None,
    }
}

/// Serves the gateway over `fleet` on a loopback port; answers its base URL.
async fn gateway(fleet: Fleet) -> String {
    gateway_with(fleet, None).await
}

/// The same, with clients held to `token`.
async fn gateway_with(fleet: Fleet, token: Option<&str>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(Gateway::new(fleet, token));
    tokio::spawn(arl_serve::serve_http(listener, app, std::future::pending()));
    base
}

async fn call(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn with_no_manager_the_gateway_says_no_backends() {
    let base = gateway(Fleet::default()).await;
    let (status, v) = call(reqwest::Method::GET, format!("{base}/readyz"), None).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (503, Some("no_backends")),
        "{v}"
    );
    let create = json!({ "runtime": "counter" });
    let (status, v) = call(
        reqwest::Method::POST,
        format!("{base}/v1/sessions"),
        Some(create),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (503, Some("no_backends")),
        "{v}"
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("counter"),
        "{v}"
    );
}

#[tokio::test]
async fn pools_load_and_the_rlm_routes_go_where_they_should() {
    let (a, b) = (manager("alpha-0"), manager("beta-0"));
    let fleet = Fleet::default();
    fleet.upsert(member("alpha-0", "alpha", &a));
    fleet.upsert(member("beta-0", "beta", &b));
    fleet.poll(&Managers::new()).await;
    let base = gateway(fleet.clone()).await;
    let post = reqwest::Method::POST;

    // `?pool=` places only on that pool's pods, however empty the other is.
    let mut ids = Vec::new();
    for (pool, prefix) in [
        ("beta", "agents.beta-0."),
        ("beta", "agents.beta-0."),
        ("alpha", "agents.alpha-0."),
    ] {
        let url = format!("{base}/v1/sessions?pool={pool}");
        let (status, v) = call(post.clone(), url, Some(json!({ "runtime": "counter" }))).await;
        assert_eq!(status, 201, "{v}");
        let id = v["id"].as_str().unwrap().to_owned();
        assert!(id.starts_with(prefix), "{pool}: {id}");
        ids.push(id);
    }
    let url = format!("{base}/v1/sessions?pool=gamma");
    let (status, v) = call(post.clone(), url, Some(json!({ "runtime": "counter" }))).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (503, Some("no_backends")),
        "{v}"
    );
    assert_eq!(b.registry.load().sessions, 2);
    assert_eq!(a.registry.load().sessions, 1);

    // The load is every manager's, summed, as of their last read.
    fleet.poll(&Managers::new()).await;
    let (status, load) = call(reqwest::Method::GET, format!("{base}/v1/load"), None).await;
    assert_eq!(status, 200);
    let (la, lb) = (a.registry.load(), b.registry.load());
    assert_eq!(load["sessions"], la.sessions + lb.sessions, "{load}");
    assert_eq!(load["capacity"], la.capacity + lb.capacity, "{load}");
    assert_eq!(
        (load["managers"].as_u64(), load["accepting"].as_u64()),
        (Some(2), Some(2))
    );

    // The RLM sidecar's routes: a create placed like any, then routed by the id.
    let (status, v) = call(
        post.clone(),
        format!("{base}/session?pool=alpha"),
        Some(json!({ "runtime": "counter" })),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let rlm = v["session_id"].as_str().unwrap().to_owned();
    assert!(rlm.starts_with("agents.alpha-0."), "{rlm}");
    let (status, v) = call(
        post.clone(),
        format!("{base}/session/{rlm}/execute"),
        Some(json!({ "code": "inc" })),
    )
    .await;
    assert_eq!(
        (status, v["session_id"].as_str()),
        (200, Some(rlm.as_str())),
        "{v}"
    );
    assert_eq!(
        (v["success"].as_bool(), v["stdout"].as_str()),
        (Some(true), Some("count=1\n")),
        "{v}"
    );
    let (status, v) = call(reqwest::Method::GET, format!("{base}/sessions"), None).await;
    assert_eq!((status, v["count"].as_u64()), (200, Some(4)), "{v}");
    let (status, v) = call(reqwest::Method::DELETE, format!("{base}/sessions"), None).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("not_through_the_gateway")),
        "{v}"
    );
    assert_eq!(
        a.registry.load().sessions + b.registry.load().sessions,
        4,
        "nothing ended"
    );
    let (status, v) = call(
        reqwest::Method::DELETE,
        format!("{base}/session/{rlm}"),
        None,
    )
    .await;
    assert_eq!(
        (status, v["status"].as_str()),
        (200, Some("deleted")),
        "{v}"
    );
    assert_eq!(a.registry.load().sessions, 1);
    for id in ids {
        let (status, _) = call(
            reqwest::Method::DELETE,
            format!("{base}/v1/sessions/{id}"),
            None,
        )
        .await;
        assert_eq!(status, 204);
    }
}

/// Imports held open by their clients take the gateway's four turns; the next is refused at
/// once, with when to retry, instead of being read into memory beside them.
#[tokio::test]
async fn imports_past_the_gateways_turns_are_refused_not_held() {
    let m = manager("alpha-0");
    let fleet = Fleet::default();
    fleet.upsert(member("alpha-0", "alpha", &m));
    fleet.poll(&Managers::new()).await;
    let base = gateway(fleet).await;
    let url = format!("{base}/v1/sessions/import?runtime=counter");
    let mut open = Vec::new();
    for _ in 0..4 {
        let (send, receive) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
        send.send(Ok(b"ARLSNAP1".to_vec())).await.unwrap();
        let body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(receive));
        let pending = reqwest::Client::new().post(&url).body(body).send();
        open.push((send, tokio::spawn(pending)));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let r = reqwest::Client::new()
            .post(&url)
            .body(Vec::new())
            .send()
            .await
            .unwrap();
        let (status, retry) = (r.status().as_u16(), r.headers().get("retry-after").cloned());
        let v: Value = r.json().await.unwrap();
        if status == 503 {
            assert_eq!(v["error"]["code"], "imports_busy", "{v}");
            assert_eq!(retry.unwrap(), "1");
            break;
        }
        // Before the four are all in, an empty import reaches the manager, which refuses it.
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (422, Some("invalid_snapshot")),
            "{v}"
        );
        assert!(std::time::Instant::now() < deadline, "never refused");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Their clients give up: the turns come back.
    for (send, pending) in open {
        drop(send);
        let r = pending.await.unwrap().unwrap();
        assert_eq!(r.status(), 422, "a cut-short export is refused");
    }
    let r = reqwest::Client::new()
        .post(&url)
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
}

/// SandboxFusion's client, unmodified, through the gateway: each program placed on a manager.
#[tokio::test]
async fn the_sandbox_fusion_client_runs_through_the_gateway() {
    // A Python pool's manager: it loads JavaScript too (`pool_runtimes`).
    let m = TestManager::start(arl_e2e::python_config(), Runtimes::ours());
    let mut python = member("py-0", "py", &m);
    python.runtime = Some("python".into());
    let fleet = Fleet::default();
    fleet.upsert(python);
    fleet.poll(&Managers::new()).await;
    let base = gateway_with(fleet, Some("s3cret")).await;
    // SandboxFusion's clients send no header: the token rides in the base URL.
    let refused = reqwest::Client::new()
        .post(format!("{base}/run_code"))
        .json(&json!({ "code": "print(1)", "language": "python" }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let base = format!("{base}/fusion/s3cret");
    arl_e2e::run_client("fusion.py", &[&base], &["sandbox-fusion==0.3.7"]).await;
}

/// E2B's SDK, unmodified, through a gateway with a token: the create placed by template (a
/// WarmPool's name too), then `run_code`, files and kill routed by the sandbox's id.
#[tokio::test]
async fn the_e2b_sdk_runs_through_the_gateway() {
    let mut config = arl_e2e::python_config();
    config.id_prefix = "agents.py-0".into();
    let m = TestManager::start(config, Runtimes::ours());
    let mut python = member("py-0", "py", &m);
    python.runtime = Some("python".into());
    let fleet = Fleet::default();
    fleet.upsert(python);
    fleet.poll(&Managers::new()).await;
    let base = gateway_with(fleet, Some("s3cret")).await;
    arl_e2e::run_client(
        "e2b_sdk.py",
        &[&base, "s3cret"],
        &["e2b-code-interpreter==2.11.5"],
    )
    .await;
    // A WarmPool's name as the template places the sandbox in that pool.
    let created = reqwest::Client::new()
        .post(format!("{base}/v2/sandboxes"))
        .header("x-api-key", "s3cret")
        .json(&json!({ "templateID": "py" }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let v: Value = created.json().await.unwrap();
    let id = v["sandboxID"].as_str().unwrap();
    assert!(id.starts_with("agents.py-0."), "{v}");
    let killed = reqwest::Client::new()
        .delete(format!("{base}/sandboxes/{id}"))
        .header("x-api-key", "s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(killed.status(), 204);
}

/// The official MCP Python SDK through a gateway over two managers: messages without a
/// session are placed, tool calls that name one reach its manager, so state carries across
/// calls whichever manager holds it.
#[tokio::test]
async fn an_mcp_client_runs_through_the_gateway() {
    let managers: Vec<Arc<TestManager>> = ["py-0", "py-1"]
        .iter()
        .map(|pod| {
            let mut config = arl_e2e::python_config();
            config.id_prefix = format!("agents.{pod}");
            TestManager::start(config, Runtimes::python())
        })
        .collect();
    let fleet = Fleet::default();
    for (pod, m) in ["py-0", "py-1"].iter().zip(&managers) {
        let mut python = member(pod, "py", m);
        python.runtime = Some("python".into());
        fleet.upsert(python);
    }
    fleet.poll(&Managers::new()).await;
    let base = gateway_with(fleet, Some("s3cret")).await;
    arl_e2e::run_client(
        "mcp_client.py",
        &[&format!("{base}/mcp"), "s3cret"],
        &["mcp==2.3.0"],
    )
    .await;
    let open: usize = managers
        .iter()
        .map(|m| m.registry.load().sessions as usize)
        .sum();
    assert_eq!(open, 0, "every session is gone");
}
