//! A session's state leaves its manager process: a snapshot taken by one `arl-manager serve`
//! restores in another that shares the snapshot folder, and a draining manager's session is
//! exported and imported elsewhere through the operator's gateway, with its state, files and
//! clock intact.
//!
//! It lives with the manager because that is the crate whose binary it runs.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use arl_operator::fleet::Fleet;
use arl_operator::gateway::{self, Gateway};
use arl_operator::manager::Managers;
use serde_json::{Value, json};

mod common;

use common::{Manager, call, post, result, runtime, wait_ready};

fn spawn(name: &str, snapshots: &std::path::Path) -> Manager {
    Manager::spawn(name, |command| {
        command.arg("--snapshot-dir").arg(snapshots);
    })
}

#[test]
fn state_moves_between_manager_processes() {
    let rt = runtime();
    let snapshots = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let a = spawn("a", snapshots.path());
        let b = spawn("b", snapshots.path());
        wait_ready(&a.base).await;
        wait_ready(&b.base).await;

        // A snapshot taken by `a` restores in `b`: variables, files, a clock that goes on.
        let (_, created) = post(format!("{}/v1/sessions", a.base), json!({})).await;
        let id = created["id"].as_str().unwrap().to_owned();
        result(&a.base, &id, "import time\nx = 41\nt0 = time.monotonic()").await;
        result(
            &a.base,
            &id,
            "open('/workspace/w.txt', 'w').write('written in a')",
        )
        .await;
        let (status, snap) =
            post(format!("{}/v1/sessions/{id}/snapshot", a.base), json!(null)).await;
        assert_eq!(status, 201, "{snap}");
        let snap_id = snap["id"].as_str().unwrap();
        let (status, seen) = call(
            reqwest::Method::GET,
            format!("{}/v1/snapshots/{snap_id}", b.base),
            None,
        )
        .await;
        assert_eq!(
            (status, &seen["module"]),
            (200, &snap["module"]),
            "b sees a's snapshot: {seen}"
        );
        let (status, restored) = post(
            format!("{}/v1/sessions", b.base),
            json!({"from_snapshot": snap_id}),
        )
        .await;
        assert_eq!(status, 201, "{restored}");
        let restored = restored["id"].as_str().unwrap().to_owned();
        assert!(restored.starts_with("b."), "{restored}");
        assert_eq!(result(&b.base, &restored, "x + 1").await, "42");
        assert_eq!(
            result(&b.base, &restored, "open('/workspace/w.txt').read()").await,
            "'written in a'"
        );
        assert_eq!(
            result(&b.base, &restored, "time.monotonic() > t0").await,
            "True"
        );
        assert_eq!(result(&a.base, &id, "x").await, "41", "a's session goes on");

        // Draining `a` hands its session to `b` through the gateway: export, import, delete.
        let fleet = Fleet::default();
        for m in [&a, &b] {
            fleet.upsert(m.member(None));
        }
        assert_eq!(
            post(format!("{}/v1/drain", a.base), json!(null)).await.0,
            200
        );
        fleet.poll(&Managers::new()).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw = format!("http://{}", listener.local_addr().unwrap());
        let router = gateway::router(Gateway::new(fleet.clone(), None));
        let served = tokio::spawn(arl_serve::serve_http(
            listener,
            router,
            std::future::pending(),
        ));

        let exported = reqwest::Client::new()
            .post(format!("{gw}/v1/sessions/{id}/export"))
            .send()
            .await
            .unwrap();
        assert_eq!(exported.status(), 200);
        let bytes = exported.bytes().await.unwrap();
        let r = reqwest::Client::new()
            .post(format!("{gw}/v1/sessions/import"))
            .header("content-type", "application/vnd.arl.snapshot")
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let moved: Value = r.json().await.unwrap();
        let moved = moved["id"].as_str().unwrap().to_owned();
        assert!(
            moved.starts_with("b."),
            "placed on the manager that is not draining: {moved}"
        );
        assert_eq!(
            call(
                reqwest::Method::DELETE,
                format!("{gw}/v1/sessions/{id}"),
                None
            )
            .await
            .0,
            204
        );
        assert_eq!(
            result(&gw, &moved, "x, open('/workspace/w.txt').read()").await,
            "(41, 'written in a')"
        );
        let history = reqwest::get(format!("{gw}/v1/sessions/{moved}/history"))
            .await
            .unwrap();
        let status = history.status().as_u16();
        let history = history.text().await.unwrap();
        assert_eq!(
            (status, history.lines().count()),
            (200, 4),
            "a's two turns, the check, and the one above: {history}"
        );

        // An export over what the gateway holds (32 MiB) streams through it to one manager.
        let (_, big) = post(format!("{}/v1/sessions", b.base), json!({})).await;
        let big = big["id"].as_str().unwrap().to_owned();
        let noise = "import os; open('/workspace/noise', 'wb').write(os.urandom(40 << 20))";
        result(&gw, &big, noise).await;
        let exported = reqwest::Client::new()
            .post(format!("{gw}/v1/sessions/{big}/export"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(exported.len() > 40 << 20, "{}", exported.len());
        let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = exported
            .chunks(1 << 20)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        let r = reqwest::Client::new()
            .post(format!("{gw}/v1/sessions/import"))
            .header("content-type", "application/vnd.arl.snapshot")
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let copy: Value = r.json().await.unwrap();
        let copy = copy["id"].as_str().unwrap();
        assert_eq!(
            result(&gw, copy, "os.path.getsize('/workspace/noise')").await,
            (40u64 << 20).to_string()
        );
        for id in [copy, big.as_str()] {
            let gone = call(
                reqwest::Method::DELETE,
                format!("{gw}/v1/sessions/{id}"),
                None,
            );
            assert_eq!(gone.await.0, 204);
        }

        // Snapshots through the gateway: listed once although both managers see the folder.
        let (status, listed) = call(reqwest::Method::GET, format!("{gw}/v1/snapshots"), None).await;
        assert_eq!(status, 200);
        let ids: Vec<&str> = listed["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [snap_id], "{listed}");
        let (status, _) = call(
            reqwest::Method::DELETE,
            format!("{gw}/v1/snapshots/{snap_id}"),
            None,
        )
        .await;
        assert_eq!(status, 204);
        let (status, v) = call(
            reqwest::Method::GET,
            format!("{gw}/v1/snapshots/{snap_id}"),
            None,
        )
        .await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (404, Some("snapshot_not_found")),
            "{v}"
        );
        served.abort();
    });
}
