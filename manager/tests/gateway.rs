//! The operator's gateway end to end over three real `arl-manager serve` processes on
//! loopback: creates spread over them, every later call reaches the session's owner by its
//! id alone, and once one is killed its sessions answer 410 while new ones go to the others.
//!
//! It lives with the manager because that is the crate whose binary it runs.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::collections::BTreeMap;
use std::time::Duration;

use arl_operator::fleet::Fleet;
use arl_operator::gateway::{self, Gateway};
use arl_operator::grpc::{self, GrpcGateway};
use arl_operator::manager::Managers;
use arl_proto::v1 as pb;
use arl_proto::v1::sessions_client::SessionsClient;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

mod common;

use common::{Manager, runtime, wait_ready};

const MANAGER_TOKEN: &str = "manager-token-for-the-test";
const GATEWAY_TOKEN: &str = "gateway-token-for-the-test";

fn spawn(name: &str) -> Manager {
    Manager::spawn(name, |command| {
        command
            .args(["--max-sessions", "16"])
            .env("ARL_AUTH_TOKEN", MANAGER_TOKEN);
    })
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(GATEWAY_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn create(&self) -> String {
        let (status, v) = self
            .call(reqwest::Method::POST, "/v1/sessions", Some(json!({})))
            .await;
        assert_eq!(status, 201, "create: {v}");
        v["id"].as_str().unwrap().to_owned()
    }

    async fn execute(&self, id: &str, code: &str) -> (u16, Value) {
        let path = format!("/v1/sessions/{id}/execute");
        self.call(reqwest::Method::POST, &path, Some(json!({ "code": code })))
            .await
    }
}

/// Asks `manager` directly whether it holds session `id`.
async fn holds(manager: &Manager, id: &str) -> bool {
    let r = reqwest::Client::new()
        .get(format!("{}/v1/sessions/{id}", manager.base))
        .bearer_auth(MANAGER_TOKEN)
        .send()
        .await
        .unwrap();
    r.status() == 200
}

/// `message` with the gateway's token.
fn authed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {GATEWAY_TOKEN}").parse().unwrap(),
    );
    request
}

/// Runs `code` in `id` over the gateway's gRPC and returns the final result event.
async fn execute_rpc(rpc: &mut SessionsClient<Channel>, id: &str, code: &str) -> pb::ExecuteResult {
    let request = pb::ExecuteRequest {
        session_id: id.into(),
        code: code.into(),
        timeout_ms: None,
    };
    let mut events = rpc.execute(authed(request)).await.unwrap().into_inner();
    let mut last = None;
    while let Some(event) = events.message().await.unwrap() {
        if let Some(pb::execute_event::Event::Result(result)) = event.event {
            last = Some(result);
        }
    }
    last.expect("a result event")
}

/// The status of `method path` sent to `base` as written, with the gateway's token: reqwest
/// would resolve the `..` segments before sending.
async fn raw_status(base: &str, method: &str, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {GATEWAY_TOKEN}\r\n\
         content-length: 0\r\nconnection: close\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

/// Whether `manager` says it drains.
async fn draining(manager: &Manager) -> bool {
    let r = reqwest::Client::new()
        .get(format!("{}/v1/load", manager.base))
        .bearer_auth(MANAGER_TOKEN)
        .send()
        .await
        .unwrap();
    r.json::<Value>().await.unwrap()["draining"] == true
}

fn owner(id: &str) -> &str {
    gateway::owner(id).unwrap()
}

#[test]
fn the_gateway_spreads_sessions_routes_by_id_and_answers_410_for_a_dead_manager() {
    let rt = runtime();
    rt.block_on(async {
        let mut managers: Vec<Manager> = ["m1", "m2", "m3"].into_iter().map(spawn).collect();
        for m in &managers {
            wait_ready(&m.base).await;
        }

        // The gateway as `arl-operator gateway --backend m1=...` runs it.
        let fleet = Fleet::default();
        for m in &managers {
            fleet.upsert(m.member(Some(MANAGER_TOKEN)));
        }
        let polled = Managers::new();
        fleet.poll(&polled).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let router = gateway::router(Gateway::new(fleet.clone(), Some(GATEWAY_TOKEN)));
        let served = tokio::spawn(arl_serve::serve_http(
            listener,
            router,
            std::future::pending(),
        ));
        let client = Client {
            http: reqwest::Client::new(),
            base: base.clone(),
        };
        let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_url = format!("http://{}", grpc_listener.local_addr().unwrap());
        let grpc_gateway = GrpcGateway::new(fleet.clone());
        let grpc_served = tokio::spawn(grpc::serve(
            grpc_listener,
            grpc_gateway,
            Some(GATEWAY_TOKEN),
            std::future::pending(),
        ));
        let mut rpc = SessionsClient::connect(grpc_url).await.unwrap();

        // Without the gateway's token: 401, with a JSON body.
        let r = reqwest::get(format!("{base}/v1/sessions")).await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(
            r.json::<Value>().await.unwrap()["error"]["code"],
            "unauthorized"
        );
        let (status, ready) = client.call(reqwest::Method::GET, "/readyz", None).await;
        assert_eq!((status, ready["accepting"].as_u64()), (200, Some(3)));

        // Six creates spread two by two: the least utilised manager takes each.
        let mut ids = Vec::new();
        for _ in 0..6 {
            ids.push(client.create().await);
        }
        let mut per_owner: BTreeMap<&str, usize> = BTreeMap::new();
        for id in &ids {
            *per_owner.entry(owner(id)).or_default() += 1;
        }
        assert_eq!(
            per_owner,
            BTreeMap::from([("m1", 2), ("m2", 2), ("m3", 2)]),
            "{ids:?}"
        );
        // A path that climbs out of its session never reaches another manager route: not
        // `/v1/drain`, not the RLM delete-all.
        for (method, path) in [
            ("POST", format!("/v1/sessions/{}/../../drain", ids[0])),
            (
                "POST",
                format!("/v1/sessions/{}/%2e%2e/%2E%2e/drain", ids[0]),
            ),
            (
                "DELETE",
                format!("/v1/sessions/{}/..%5c..%5c..%5csessions", ids[0]),
            ),
        ] {
            assert_eq!(
                raw_status(&base, method, &path).await,
                400,
                "{method} {path}"
            );
        }
        for m in &managers {
            assert!(
                !draining(m).await,
                "{} was drained through the gateway",
                m.name
            );
        }
        for id in &ids {
            let m = managers.iter().find(|m| m.name == owner(id)).unwrap();
            assert!(holds(m, id).await, "{id} is gone");
        }

        // Polled loads from here on (started after the spread: a read in flight during a
        // create could answer the load from before it, and skew the placement under test).
        let poller = tokio::spawn(fleet.clone().poll_every(polled, Duration::from_millis(200)));

        // Every call reaches the owner: state persists across turns, and only the owner
        // holds the session.
        for (n, id) in ids.iter().enumerate() {
            let (status, v) = client.execute(id, &format!("x = {n} * 10")).await;
            assert_eq!(status, 200, "{v}");
            let (status, v) = client.execute(id, "x + 2").await;
            assert_eq!(
                (status, v["result"].as_str()),
                (200, Some(format!("{}", n * 10 + 2).as_str())),
                "{v}"
            );
            for m in &managers {
                assert_eq!(
                    holds(m, id).await,
                    m.name == owner(id),
                    "{} holding {id}",
                    m.name
                );
            }
        }
        // Streamed executions pass through as Server-Sent Events.
        let r = client
            .http
            .post(format!("{base}/v1/sessions/{}/execute", ids[0]))
            .bearer_auth(GATEWAY_TOKEN)
            .header("accept", "text/event-stream")
            .json(&json!({ "code": "print('streamed'); 7 * 6" }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let events = r.text().await.unwrap();
        assert!(
            events.contains("streamed") && events.contains("42"),
            "{events}"
        );
        // The list spans every manager.
        let (status, listed) = client
            .call(reqwest::Method::GET, "/v1/sessions", None)
            .await;
        assert_eq!(status, 200);
        assert_eq!(listed["sessions"].as_array().unwrap().len(), 6, "{listed}");
        // A manager's own errors come back as they are.
        let (status, v) = client
            .call(reqwest::Method::GET, "/v1/sessions/m1.0000", None)
            .await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (404, Some("session_not_found")),
            "{v}"
        );
        let (status, v) = client
            .call(reqwest::Method::GET, "/v1/sessions/not-an-id", None)
            .await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (404, Some("session_not_found")),
            "{v}"
        );

        // gRPC: the same placement and routing; three creates land one on each manager.
        let refused = rpc
            .list_sessions(pb::ListSessionsRequest {})
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);
        let mut rpc_ids = Vec::new();
        for _ in 0..3 {
            let created = rpc
                .create_session(authed(pb::CreateSessionRequest::default()))
                .await
                .unwrap();
            rpc_ids.push(created.into_inner().id);
        }
        let mut owners: Vec<&str> = rpc_ids.iter().map(|id| owner(id)).collect();
        owners.sort_unstable();
        assert_eq!(owners, ["m1", "m2", "m3"], "{rpc_ids:?}");
        for id in &rpc_ids {
            let upload = pb::WriteFileRequest {
                session_id: id.clone(),
                path: "in.txt".into(),
                data: b"forty-two".to_vec(),
            };
            let written = rpc
                .write_file(authed(tokio_stream::iter([upload])))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(written.size, 9);
            let code = "open('in.txt').read().upper()".to_owned();
            let result = execute_rpc(&mut rpc, id, &code).await;
            assert_eq!(result.result.as_deref(), Some("'FORTY-TWO'"), "{result:?}");
        }
        let listed = rpc
            .list_sessions(authed(pb::ListSessionsRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.sessions.len(), 9);
        let unknown = rpc
            .get_session(authed(pb::GetSessionRequest {
                id: "m9.0000".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), Code::FailedPrecondition, "{unknown:?}");

        // m2 dies: its sessions are gone (410), the others' live on, and new sessions go
        // to the survivors.
        let dead = managers.remove(1);
        drop(dead);
        for id in &ids {
            let (status, v) = client.execute(id, "x").await;
            if owner(id) == "m2" {
                assert_eq!(
                    (status, v["error"]["code"].as_str()),
                    (410, Some("session_gone")),
                    "{v}"
                );
            } else {
                assert_eq!(status, 200, "{v}");
            }
        }
        for id in rpc_ids.iter().filter(|id| owner(id) == "m2") {
            let lost = rpc
                .get_session(authed(pb::GetSessionRequest { id: id.clone() }))
                .await
                .unwrap_err();
            assert_eq!(lost.code(), Code::FailedPrecondition, "{lost:?}");
            assert!(lost.message().starts_with("session_gone"), "{lost:?}");
        }
        let created = rpc
            .create_session(authed(pb::CreateSessionRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert_ne!(owner(&created.id), "m2", "placed on a dead manager");
        rpc.delete_session(authed(pb::DeleteSessionRequest { id: created.id }))
            .await
            .unwrap();
        for _ in 0..4 {
            let id = client.create().await;
            assert_ne!(owner(&id), "m2", "placed on a dead manager");
            let (status, v) = client.execute(&id, "1 + 1").await;
            assert_eq!((status, v["result"].as_str()), (200, Some("2")), "{v}");
        }
        let (_, listed) = client
            .call(reqwest::Method::GET, "/v1/sessions", None)
            .await;
        assert_eq!(listed["unreachable"], json!(["m2"]), "{listed}");
        // Two and one of each survivor's, and the four new ones.
        assert_eq!(listed["sessions"].as_array().unwrap().len(), 10, "{listed}");

        // Full managers: 429, never a 500. The survivors themselves say how much room is
        // left (the gateway's own view lags by up to one load read).
        let mut free = 0;
        for m in &managers {
            let load: Value = reqwest::Client::new()
                .get(format!("{}/v1/load", m.base))
                .bearer_auth(MANAGER_TOKEN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            free += load["capacity"].as_u64().unwrap() - load["sessions"].as_u64().unwrap();
        }
        assert_eq!(free, 22, "32 places, 10 sessions");
        let mut statuses = BTreeMap::new();
        for _ in 0..free + 2 {
            let (status, _) = client
                .call(reqwest::Method::POST, "/v1/sessions", Some(json!({})))
                .await;
            *statuses.entry(status).or_insert(0) += 1;
        }
        assert!(
            statuses.keys().all(|s| *s == 201 || *s == 429),
            "{statuses:?}"
        );
        assert_eq!(
            statuses.get(&429),
            Some(&2),
            "{statuses:?} with {free} free"
        );

        poller.abort();
        served.abort();
        grpc_served.abort();
    });
}
