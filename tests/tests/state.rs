//! Fork, snapshot and restore, export and import, rollback and history, over real sockets
//! with the real CPython runtime. (Restoring in a second manager process, and migrating
//! through the gateway, are in `manager/tests/state.rs`: that crate owns the binary.)
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::{Arc, OnceLock};

use arl_e2e::{Runtimes, TestManager, client, decode, python_config};
use arl_proto::v1 as pb;
use serde_json::{Value, json};

fn manager() -> &'static Arc<TestManager> {
    static M: OnceLock<Arc<TestManager>> = OnceLock::new();
    static SNAPSHOTS: OnceLock<tempfile::TempDir> = OnceLock::new();
    M.get_or_init(|| {
        let dir = SNAPSHOTS.get_or_init(|| tempfile::tempdir().unwrap());
        let mut c = python_config();
        c.store = Some(dir.path().display().to_string());
        TestManager::start(c, Runtimes::python())
    })
}

async fn session() -> String {
    manager().create(json!({})).await
}

async fn fork(id: &str) -> String {
    let (status, v) = manager()
        .post(&format!("/v1/sessions/{id}/fork"), json!(null))
        .await;
    assert_eq!(status, 201, "fork: {v}");
    v["id"].as_str().unwrap().to_owned()
}

async fn result(id: &str, code: &str) -> String {
    let v = manager().exec(id, code).await;
    assert_eq!(v["error"], Value::Null, "{code}: {v}");
    v["result"].as_str().unwrap_or_default().to_owned()
}

async fn history(id: &str) -> Vec<Value> {
    let (status, text) = manager()
        .get_text(&format!("/v1/sessions/{id}/history"))
        .await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn a_fork_has_its_parents_state_then_its_own() {
    let id = session().await;
    result(&id, "import random, numpy as np\nxs = [1, 2]\ndf_n = 3").await;
    result(
        &id,
        "open('/workspace/notes.txt', 'w').write('from the parent')",
    )
    .await;
    let child = fork(&id).await;
    assert_ne!(child, id);
    assert_eq!(result(&child, "xs, df_n").await, "([1, 2], 3)");
    assert_eq!(
        result(&child, "open('/workspace/notes.txt').read()").await,
        "'from the parent'"
    );
    // Independent from now on, both ways, memory and files.
    result(
        &child,
        "xs.append('child'); open('/workspace/notes.txt', 'w').write('child')",
    )
    .await;
    result(&id, "xs.append('parent')").await;
    assert_eq!(
        result(&id, "xs, open('/workspace/notes.txt').read()").await,
        "([1, 2, 'parent'], 'from the parent')"
    );
    assert_eq!(result(&child, "xs").await, "[1, 2, 'child']");
    // Forks draw new random states: their streams differ from each other and the parent's.
    let other = fork(&id).await;
    let draw = "(random.random(), float(np.random.random()))";
    let draws = [
        result(&id, draw).await,
        result(&child, draw).await,
        result(&other, draw).await,
    ];
    assert!(
        draws[0] != draws[1] && draws[1] != draws[2] && draws[0] != draws[2],
        "{draws:?}"
    );
    // The fork's history starts with its parent's turns and numbers on from them.
    let h = history(&child).await;
    assert_eq!(
        h[0]["code"],
        "import random, numpy as np\nxs = [1, 2]\ndf_n = 3"
    );
    let numbers: Vec<u64> = h.iter().map(|e| e["n"].as_u64().unwrap()).collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    // The parent goes on unaffected when its fork is deleted.
    assert_eq!(
        manager().delete(&format!("/v1/sessions/{child}")).await.0,
        204
    );
    assert_eq!(result(&id, "len(xs)").await, "3");
}

#[tokio::test]
async fn a_snapshot_restores_with_state_files_clock_and_history() {
    let m = manager();
    let id = session().await;
    result(
        &id,
        "import time\nbefore = time.monotonic()\ntotal = sum(range(10))",
    )
    .await;
    result(&id, "import os; os.makedirs('/workspace/d', exist_ok=True); open('/workspace/d/f.bin', 'wb').write(bytes(range(256)))").await;
    let (status, snap) = m
        .post(&format!("/v1/sessions/{id}/snapshot"), json!(null))
        .await;
    assert_eq!(status, 201, "{snap}");
    let snap_id = snap["id"].as_str().unwrap().to_owned();
    assert!(snap_id.starts_with("snap-"), "{snap}");
    assert_eq!(snap["source_session"], id.as_str());
    assert_eq!(snap["files"], 2, "d/ and d/f.bin: {snap}");
    assert!(
        snap["size_bytes"].as_u64().unwrap() < snap["state_bytes"].as_u64().unwrap(),
        "compressed: {snap}"
    );
    // The session goes on after its snapshot, and changes after it are not in it.
    result(&id, "total = -1").await;

    let (status, shown) = m.get(&format!("/v1/snapshots/{snap_id}")).await;
    assert_eq!((status, &shown["id"]), (200, &snap["id"]));
    let (_, listed) = m.get("/v1/snapshots").await;
    assert!(
        listed["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == snap["id"])
    );

    let restored = m
        .create(json!({"from_snapshot": snap_id, "timeout_ms": 5000}))
        .await;
    assert_eq!(result(&restored, "total").await, "45");
    assert_eq!(
        result(
            &restored,
            "open('/workspace/d/f.bin', 'rb').read() == bytes(range(256))"
        )
        .await,
        "True"
    );
    assert_eq!(
        result(&restored, "time.monotonic() >= before").await,
        "True",
        "the clock never runs back"
    );
    let (_, info) = m.get(&format!("/v1/sessions/{restored}")).await;
    assert_eq!(
        info["limits"]["timeout_ms"], 5000,
        "the request's limits over the snapshot's"
    );
    assert_eq!(
        history(&restored).await.len(),
        5,
        "two turns before the snapshot, three since"
    );

    assert_eq!(m.delete(&format!("/v1/snapshots/{snap_id}")).await.0, 204);
    let (status, v) = m.get(&format!("/v1/snapshots/{snap_id}")).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("snapshot_not_found"))
    );
    let (status, v) = m
        .post("/v1/sessions", json!({"from_snapshot": snap_id}))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("snapshot_not_found"))
    );
}

#[tokio::test]
async fn an_export_imports_as_a_new_session() {
    let id = session().await;
    result(
        &id,
        "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2, 3]})",
    )
    .await;
    // Over the 8 MiB JSON body limit: an import is bounded by what a session may hold.
    let noise = "import os; open('/workspace/noise', 'wb').write(os.urandom(9 << 20))";
    result(&id, noise).await;
    let bytes = export(&id).await;
    assert!(bytes.len() > 9 << 20, "{} bytes", bytes.len());
    let (status, v) = import(bytes.clone()).await;
    assert_eq!(status, 201, "{v}");
    let imported = v["id"].as_str().unwrap();
    assert_eq!(
        result(
            imported,
            "int(df['a'].sum()), os.path.getsize('/workspace/noise')"
        )
        .await,
        "(6, 9437184)"
    );

    // Damaged bytes: 422 with a reason, never a 500, and nothing else is touched.
    let mut damaged = bytes.to_vec();
    let at = damaged.len() - 10;
    damaged[at] ^= 0x55;
    for (body, what) in [
        (damaged, "checksum"),
        (b"ARLSNAP1\xff\xff\xff\xff".to_vec(), "header"),
        (vec![], "short"),
    ] {
        let (status, v) = import(body).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (422, Some("invalid_snapshot")),
            "{what}: {v}"
        );
    }
    assert_eq!(result(&id, "len(df)").await, "3");
}

/// Session `id` exported; panics unless 200 with the snapshot media type.
async fn export(id: &str) -> Vec<u8> {
    let r = client()
        .post(manager().url(&format!("/v1/sessions/{id}/export")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/vnd.arl.snapshot");
    r.bytes().await.unwrap().to_vec()
}

async fn import(body: Vec<u8>) -> (u16, Value) {
    let r = client()
        .post(manager().url("/v1/sessions/import"))
        .header("content-type", "application/vnd.arl.snapshot")
        .body(body)
        .send()
        .await
        .unwrap();
    decode(r).await
}

/// A snapshot whose header names another module than the one this manager runs.
fn with_module(bytes: &[u8], module: &str) -> Vec<u8> {
    with_header(bytes, |header| header["module"] = json!(module))
}

/// A snapshot whose header `edit` changed (the payload's checksum does not cover it).
fn with_header(bytes: &[u8], edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[12..12 + len]).unwrap();
    edit(&mut header);
    let header = serde_json::to_vec(&header).unwrap();
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&bytes[12 + len..]);
    out
}

#[tokio::test]
async fn an_image_is_held_to_the_limits_a_create_is() {
    let id = session().await;
    result(&id, "kept = 'yes'").await;
    let bytes = export(&id).await;
    // Past --max-timeout-ms, or past --max-memory-mib: refused as a create would be.
    for (field, value) in [
        ("timeout_ms", json!(100_000_000_000u64)),
        ("memory_bytes", json!(1u64 << 50)),
        ("lifetime_s", json!(0)),
    ] {
        let crafted = with_header(&bytes, |h| h["limits"][field] = value.clone());
        let (status, v) = import(crafted).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (422, Some("invalid_snapshot")),
            "{field}: {v}"
        );
    }
    // What only the manager decides (output kept, upload quota) is capped at its own.
    let crafted = with_header(&bytes, |h| {
        h["limits"]["output_bytes"] = json!(u64::MAX);
        h["limits"]["workspace_bytes"] = json!(u64::MAX);
    });
    let (status, v) = import(crafted).await;
    assert_eq!(status, 201, "{v}");
    let defaults = python_config().defaults;
    assert_eq!(v["limits"]["output_bytes"], defaults.output_bytes, "{v}");
    assert_eq!(
        v["limits"]["workspace_bytes"], defaults.workspace_bytes,
        "{v}"
    );
    let imported = v["id"].as_str().unwrap();
    assert_eq!(result(imported, "kept").await, "'yes'");
}

#[tokio::test]
async fn a_symlink_out_of_the_session_carries_nothing_into_a_fork_or_an_export() {
    let id = session().await;
    let made = result(
        &id,
        "import os\n\
         os.makedirs('/workspace/real', exist_ok=True)\n\
         open('/workspace/real/mine.txt', 'w').write('mine')\n\
         os.symlink('../../../../../../../../etc', '/workspace/etc')\n\
         os.symlink('../../../../../../../../etc/hostname', '/workspace/hostname')\n\
         os.symlink('../../../../../../../../etc', '/tmp/etc')\n\
         sorted(os.listdir('/workspace'))",
    )
    .await;
    assert_eq!(made, "['etc', 'hostname', 'real']");
    let child = fork(&id).await;
    assert_eq!(
        result(
            &child,
            "sorted(os.listdir('/workspace')), os.path.lexists('/tmp/etc')"
        )
        .await,
        "(['real'], False)",
        "a fork carries the files, never what a symlink points at"
    );
    assert_eq!(
        result(&child, "open('/workspace/real/mine.txt').read()").await,
        "'mine'"
    );
    let bytes = export(&id).await;
    let (status, v) = import(bytes).await;
    assert_eq!(status, 201, "{v}");
    let imported = v["id"].as_str().unwrap();
    assert_eq!(
        result(imported, "sorted(os.listdir('/workspace'))").await,
        "['real']"
    );
}

#[tokio::test]
async fn swapping_files_for_symlinks_while_forking_carries_nothing_from_outside() {
    let m = manager();
    let id = session().await;
    // A file that the guest keeps swapping for a symlink to a host file and back, and a
    // folder it keeps swapping for a symlink to a host folder, while the host forks.
    result(
        &id,
        "import os\n\
         def swap(n):\n\
         \x20   for _ in range(n):\n\
         \x20       for name, target, make in [('f', '../../../../../../../../etc/hostname', lambda p: open(p, 'w').write('guest')), ('d', '../../../../../../../../etc', os.mkdir)]:\n\
         \x20           p = '/workspace/' + name\n\
         \x20           if os.path.islink(p): os.remove(p); make(p)\n\
         \x20           else:\n\
         \x20               (os.rmdir if os.path.isdir(p) else os.remove)(p); os.symlink(target, p)\n\
         open('/workspace/f', 'w').write('guest')\n\
         os.mkdir('/workspace/d')",
    )
    .await;
    let host_name = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let swap = |n: u32| {
        let url = m.url(&format!("/v1/sessions/{id}/execute"));
        tokio::spawn(async move {
            let r = client()
                .post(url)
                .json(&json!({"code": format!("swap({n})")}))
                .send()
                .await
                .unwrap();
            decode(r).await
        })
    };
    for round in 0..20 {
        // Queued in this order, the fork's files are copied while the second swap runs.
        let first = swap(50);
        let fork = {
            let url = m.url(&format!("/v1/sessions/{id}/fork"));
            tokio::spawn(async move { decode(client().post(url).send().await.unwrap()).await })
        };
        let second = swap(400);
        let (status, v) = fork.await.unwrap();
        for turn in [first, second] {
            let (_, done) = turn.await.unwrap();
            assert_eq!(done["error"], Value::Null, "{done}");
        }
        assert_eq!(status, 201, "round {round}: {v}");
        let child = v["id"].as_str().unwrap().to_owned();
        let seen = result(
            &child,
            "import os\n\
             [(r, sorted(fs)) for r, ds, fs in os.walk('/workspace')], \
             [open(os.path.join(r, f)).read() for r, ds, fs in os.walk('/workspace') for f in fs]",
        )
        .await;
        assert!(
            !seen.contains("passwd") && !seen.contains("os-release"),
            "round {round}: a host folder was copied: {seen}"
        );
        if !host_name.trim().is_empty() && host_name.trim() != "guest" {
            assert!(
                !seen.contains(host_name.trim()),
                "round {round}: a host file was copied: {seen}"
            );
        }
        m.delete(&format!("/v1/sessions/{child}")).await;
    }
}

#[tokio::test]
async fn refusals_are_clear_and_keep_the_session() {
    let m = manager();
    let id = session().await;
    result(&id, "kept = 'yes'\nf = open('/workspace/open.txt', 'w')").await;
    for route in ["fork", "snapshot", "export"] {
        let (status, v) = m
            .post(&format!("/v1/sessions/{id}/{route}"), json!(null))
            .await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (409, Some("snapshot_refused")),
            "{route}: {v}"
        );
        assert!(
            v["error"]["message"].as_str().unwrap().contains("open"),
            "{v}"
        );
    }
    result(&id, "f.close()").await;
    let other = with_module(&export(&id).await, &"0".repeat(64)); // closed, it can be taken
    let (status, v) = import(other).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("snapshot_module_mismatch")),
        "{v}"
    );
    assert_eq!(result(&id, "kept").await, "'yes'");

    let (status, v) = m.post("/v1/sessions/nope/fork", json!(null)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("session_not_found"))
    );
    let (status, v) = m
        .post("/v1/sessions", json!({"from_snapshot": "../../etc/passwd"}))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("snapshot_not_found")),
        "{v}"
    );
    let (status, v) = m.get("/v1/snapshots/snap-zz").await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = m.post("/v1/sessions", json!({"from_snapshot": 7})).await;
    assert_eq!(status, 422, "{v}");
    let ended = session().await;
    m.delete(&format!("/v1/sessions/{ended}")).await;
    let (status, _) = m
        .post(&format!("/v1/sessions/{ended}/snapshot"), json!(null))
        .await;
    assert_eq!(status, 404);
}

/// The checkpoint a rollback goes back to is kept from the pages the kernel says each turn
/// wrote, some left unprotected and compared, some protected again in batches: after many
/// turns that write some pages at every turn, some once and some now and then, a failed turn
/// still goes back to exactly the state the last good turn left, and so does one after that
/// rollback (whose fresh instance is tracked anew).
#[tokio::test]
async fn rollback_goes_back_exactly_after_many_turns_of_varied_writes() {
    let m = manager();
    let id = session().await;
    result(&id, "big = bytearray(8 << 20)\nd = {}\nn = 0").await;
    let state = "hash((bytes(big), tuple(sorted(d.items())), n))";
    for round in 0..2 {
        for i in 0..60 {
            // Every turn: `n` and a dict entry; now and then a new stretch of the array; once
            // in a while a page far out.
            let code = format!(
                "n += 1\nd[{i} % 7] = n\nbig[({i} * 40961) % len(big)] = {i} % 251\n\
                 if {i} % 5 == 0: big[{i} * 65536:{i} * 65536 + 20000] = bytes([{i} % 256]) * 20000"
            );
            result(&id, &code).await;
        }
        let before = result(&id, state).await;
        let (status, v) = m
            .post(
                &format!("/v1/sessions/{id}/execute"),
                json!({"code": "n = -1\nd.clear()\nbig[:] = bytes(len(big))\nwhile True: pass", "timeout_ms": 500}),
            )
            .await;
        assert_eq!(
            (status, &v["rolled_back"]),
            (200, &json!(true)),
            "round {round}: {v}"
        );
        assert_eq!(
            result(&id, state).await,
            before,
            "round {round}: the state before the failed turn"
        );
    }
}

#[tokio::test]
async fn a_failed_turn_is_rolled_back_and_the_session_goes_on() {
    let m = manager();
    let id = session().await;
    result(&id, "keep = [1, 2, 3]").await;
    let (_, before) = m.get(&format!("/v1/sessions/{id}")).await;
    let (status, v) = m
        .post(
            &format!("/v1/sessions/{id}/execute"),
            json!({"code": "keep.append(4)\nwhile True: pass", "timeout_ms": 300}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (v["rolled_back"].as_bool(), v["rollback_reason"].as_str()),
        (Some(true), Some("deadline")),
        "{v}"
    );
    assert_eq!(v["session_ended"], false);
    assert_eq!(result(&id, "keep").await, "[1, 2, 3]");

    // A memory blow-up: the turn is undone and its memory given back.
    let v = m
        .exec(
            &id,
            "keep.append(5)\nhog = []\nwhile True: hog.append(bytearray(1 << 20))",
        )
        .await;
    assert_eq!(
        (v["rolled_back"].as_bool(), v["rollback_reason"].as_str()),
        (Some(true), Some("memory")),
        "{v}"
    );
    assert_eq!(v["error"]["type"], "MemoryError");
    assert_eq!(
        result(&id, "keep, 'hog' in globals()").await,
        "([1, 2, 3], False)"
    );
    let (_, after) = m.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(
        after["memory_bytes"], before["memory_bytes"],
        "the memory is back to its size before"
    );

    // A caller that goes away mid-turn (a stream it drops): rolled back too.
    let streamed = client()
        .post(m.url(&format!("/v1/sessions/{id}/execute")))
        .header("accept", "text/event-stream")
        .json(&json!({"code": "keep.clear()\nprint('cleared', flush=True)\nimport time; time.sleep(30)"}))
        .send()
        .await
        .unwrap();
    let mut events = streamed.bytes_stream();
    use futures_util::StreamExt;
    let first = events.next().await.unwrap().unwrap();
    assert!(
        String::from_utf8_lossy(&first).contains("cleared"),
        "{first:?}"
    );
    drop(events);
    assert_eq!(result(&id, "keep").await, "[1, 2, 3]");
    let h = history(&id).await;
    let reasons: Vec<&str> = h
        .iter()
        .filter_map(|e| e["rollback_reason"].as_str())
        .collect();
    assert_eq!(reasons, ["deadline", "memory", "cancelled"], "{h:?}");
    assert!(
        h.iter()
            .all(|e| e["duration_ms"].is_f64() && e["started_at"].is_string())
    );

    // Rested past the second after which the checkpoint is let go: the next turn takes it
    // again first, so a failure still goes back to just before it.
    result(&id, "keep.append('after rest')").await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (_, v) = m
        .post(
            &format!("/v1/sessions/{id}/execute"),
            json!({"code": "keep.clear()\nwhile True: pass", "timeout_ms": 300}),
        )
        .await;
    assert_eq!(v["rollback_reason"], "deadline", "{v}");
    assert_eq!(result(&id, "keep").await, "[1, 2, 3, 'after rest']");
}

#[tokio::test]
async fn history_is_bounded() {
    let m = manager();
    let id = session().await;
    let big = format!("'{}'", "x".repeat(60_000));
    for _ in 0..80 {
        m.exec(&id, &big).await;
    }
    let r = client()
        .get(m.url(&format!("/v1/sessions/{id}/history")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "application/jsonl");
    let dropped: u64 = r.headers()["x-arl-history-dropped"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(text.len() <= 1 << 20, "{} bytes", text.len());
    let entries: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        dropped > 0 && entries.len() as u64 + dropped == 80,
        "{dropped} dropped, {} kept",
        entries.len()
    );
    assert!(
        entries.iter().all(|e| e["clipped"] == true),
        "60 kB code is clipped to 16 KiB"
    );
    assert_eq!(entries.last().unwrap()["n"], 80);
}

#[tokio::test]
async fn the_same_over_grpc() {
    let m = manager();
    let mut rpc = m.grpc_client().await;
    let created = rpc
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap()
        .into_inner();
    let run = |id: &str, code: &str| pb::ExecuteRequest {
        session_id: id.into(),
        code: code.into(),
        timeout_ms: Some(300),
    };
    let last = |mut s: tonic::Streaming<pb::ExecuteEvent>| async move {
        let mut result = None;
        while let Some(e) = s.message().await.unwrap() {
            if let Some(pb::execute_event::Event::Result(r)) = e.event {
                result = Some(r);
            }
        }
        result.unwrap()
    };
    let r = last(
        rpc.execute(run(&created.id, "n = 7"))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert!(!r.rolled_back);
    let r = last(
        rpc.execute(run(&created.id, "n = 8\nwhile True: pass"))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(
        (r.rolled_back, r.rollback_reason.as_deref(), r.session_ended),
        (true, Some("deadline"), false)
    );

    let forked = rpc
        .fork_session(pb::ForkSessionRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let r = last(
        rpc.execute(run(&forked.id, "n"))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(r.result.as_deref(), Some("7"));

    let snap = rpc
        .snapshot_session(pb::SnapshotSessionRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snap.source_session, created.id);
    let got = rpc
        .get_snapshot(pb::GetSnapshotRequest {
            id: snap.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, snap);
    let listed = rpc
        .list_snapshots(pb::ListSnapshotsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.snapshots.iter().any(|s| s.id == snap.id));
    let restored = rpc
        .create_session(pb::CreateSessionRequest {
            from_snapshot: snap.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let r = last(
        rpc.execute(run(&restored.id, "n + 1"))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(r.result.as_deref(), Some("8"));
    rpc.delete_snapshot(pb::DeleteSnapshotRequest {
        id: snap.id.clone(),
    })
    .await
    .unwrap();
    let gone = rpc
        .get_snapshot(pb::GetSnapshotRequest { id: snap.id })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);

    let mut chunks = rpc
        .export_session(pb::ExportSessionRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut exported = Vec::new();
    while let Some(chunk) = chunks.message().await.unwrap() {
        exported.push(chunk);
    }
    let imported = rpc
        .import_session(tokio_stream::iter(exported))
        .await
        .unwrap()
        .into_inner();
    let r = last(
        rpc.execute(run(&imported.id, "n * 2"))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(r.result.as_deref(), Some("14"));
    let bad = rpc
        .import_session(tokio_stream::iter([pb::SnapshotChunk {
            data: b"nope".to_vec(),
        }]))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");

    let mut entries = rpc
        .get_history(pb::GetHistoryRequest {
            session_id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(e) = entries.message().await.unwrap() {
        seen.push((e.n, e.rolled_back));
    }
    assert_eq!(seen, [(1, false), (2, true)]);
    let refused = rpc
        .fork_session(pb::ForkSessionRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);
}
