//! What a guest reaches outside its sandbox, end to end: brokered HTTP against a real local
//! server, per-session allow-lists and budgets, redirects, deadlines, host tools, and
//! `pip install` from a wheelhouse and from an index.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arl_e2e::{Runtimes, TestManager, python_config};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// What the local server saw.
#[derive(Default)]
struct Seen {
    /// Slow requests whose client went away before the answer.
    abandoned: AtomicUsize,
    /// The last tool call's JSON body and Authorization header.
    tool_call: Mutex<Option<(Value, Option<String>)>>,
    /// Wheels the index serves.
    wheels: Mutex<Vec<(String, Vec<u8>)>>,
    /// Wheel files downloaded from the index.
    downloads: AtomicUsize,
}

struct Server {
    port: u16,
    seen: Arc<Seen>,
    /// A port nothing allows: redirects off the list go there.
    other_port: u16,
}

/// A wheel: `files` and a `.dist-info` with `requires`; pure unless `native`.
fn wheel(
    name: &str,
    version: &str,
    files: &[(&str, &str)],
    requires: &[&str],
    native: bool,
) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut bytes);
        let options = zip::write::SimpleFileOptions::default();
        let dist = format!("{}-{version}.dist-info", name.replace('-', "_"));
        let metadata = format!(
            "Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{}",
            requires
                .iter()
                .map(|r| format!("Requires-Dist: {r}\n"))
                .collect::<String>()
        );
        let purelib = if native { "false" } else { "true" };
        let entries = files
            .iter()
            .map(|(p, c)| ((*p).to_owned(), (*c).to_owned()))
            .chain([
                (format!("{dist}/METADATA"), metadata),
                (
                    format!("{dist}/WHEEL"),
                    format!("Wheel-Version: 1.0\nRoot-Is-Purelib: {purelib}\n"),
                ),
                (format!("{dist}/RECORD"), String::new()),
            ]);
        for (path, content) in entries {
            zip.start_file(path, options).unwrap();
            zip.write_all(content.as_bytes()).unwrap();
        }
        zip.finish().unwrap();
    }
    bytes.into_inner()
}

fn wheelhouse() -> PathBuf {
    let dir = arl_e2e::data_dir().join("wheelhouse");
    std::fs::create_dir_all(&dir).unwrap();
    let put = |file: &str, bytes: Vec<u8>| std::fs::write(dir.join(file), bytes).unwrap();
    put(
        "greeter-1.0.0-py3-none-any.whl",
        wheel(
            "greeter",
            "1.0.0",
            &[(
                "greeter/__init__.py",
                "from punct import MARK\ndef greet(n):\n    return 'hello ' + n + MARK\n",
            )],
            &["punct>=0.2", "numpy", "winonly; sys_platform == 'win32'"],
            false,
        ),
    );
    put(
        "punct-0.1-py3-none-any.whl",
        wheel("punct", "0.1", &[("punct.py", "MARK = '?'\n")], &[], false),
    );
    put(
        "punct-0.2-py3-none-any.whl",
        wheel("punct", "0.2", &[("punct.py", "MARK = '!'\n")], &[], false),
    );
    put(
        "fastmath-1.0-cp315-cp315-manylinux_2_17_x86_64.whl",
        wheel(
            "fastmath",
            "1.0",
            &[("fastmath/_speed.so", "\x7fELF")],
            &[],
            true,
        ),
    );
    dir
}

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let seen = Arc::new(Seen::default());
        // A version of this process's own, so that the manager's wheel cache (shared between
        // runs) has never seen it.
        let version = index_version();
        seen.wheels.lock().unwrap().push((
            format!("indexed_pkg-{version}-py3-none-any.whl"),
            wheel(
                "indexed-pkg",
                &version,
                &[("indexed_pkg.py", "WHERE = 'from the index'\n")],
                &[],
                false,
            ),
        ));
        let (tx, rx) = std::sync::mpsc::channel();
        let state = seen.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let (port, other_port) = (
                    listener.local_addr().unwrap().port(),
                    other.local_addr().unwrap().port(),
                );
                tx.send((port, other_port)).unwrap();
                let app = axum::Router::new()
                    .route("/hello", get(|| async { "hello from the host" }))
                    .route("/big", get(|| async { vec![b'x'; 2 << 20] }))
                    .route("/slow", get(slow))
                    .route("/to-hello", get(|| async { Redirect::temporary("/hello") }))
                    .route(
                        "/away",
                        get(move || async move {
                            Redirect::temporary(&format!("http://127.0.0.1:{other_port}/hello"))
                        }),
                    )
                    .route("/echo", post(echo))
                    .route("/llm", post(tool))
                    .route("/simple/{name}/", get(index_page))
                    .route("/files/{file}", get(index_file))
                    .with_state(state);
                let off = axum::Router::new().route("/hello", get(|| async { "off the list" }));
                tokio::spawn(async move { axum::serve(other, off).await });
                axum::serve(listener, app).await.unwrap();
            });
        });
        let (port, other_port) = rx.recv().unwrap();
        Server {
            port,
            seen,
            other_port,
        }
    })
}

fn index_version() -> String {
    format!("2.0.{}", std::process::id())
}

async fn slow(State(seen): State<Arc<Seen>>) -> &'static str {
    struct Watch(Arc<Seen>, bool);
    impl Drop for Watch {
        fn drop(&mut self) {
            if !self.1 {
                self.0.abandoned.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    let mut watch = Watch(seen, false);
    tokio::time::sleep(Duration::from_secs(30)).await;
    watch.1 = true;
    "too late"
}

async fn echo(headers: HeaderMap, body: String) -> impl IntoResponse {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    axum::Json(json!({"body": body, "content_type": ctype}))
}

async fn tool(
    State(seen): State<Arc<Seen>>,
    headers: HeaderMap,
    axum::Json(call): axum::Json<Value>,
) -> impl IntoResponse {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let prompt = call["args"][0].as_str().unwrap_or("").to_owned();
    *seen.tool_call.lock().unwrap() = Some((call, auth));
    axum::Json(json!(format!("the model says: {prompt}")))
}

async fn index_page(
    State(seen): State<Arc<Seen>>,
    UrlPath(name): UrlPath<String>,
) -> impl IntoResponse {
    use sha2::Digest;
    let files: Vec<Value> = seen
        .wheels
        .lock()
        .unwrap()
        .iter()
        .filter(|(file, _)| file.replace('_', "-").starts_with(&format!("{name}-")))
        .map(|(file, bytes)| {
            json!({"filename": file, "url": format!("../../files/{file}"),
                   "hashes": {"sha256": hex(&sha2::Sha256::digest(bytes))}})
        })
        .collect();
    if files.is_empty() {
        return (StatusCode::NOT_FOUND, "no such project").into_response();
    }
    (
        [(header::CONTENT_TYPE, "application/vnd.pypi.simple.v1+json")],
        axum::Json(json!({"files": files})),
    )
        .into_response()
}

async fn index_file(
    State(seen): State<Arc<Seen>>,
    UrlPath(file): UrlPath<String>,
) -> impl IntoResponse {
    seen.downloads.fetch_add(1, Ordering::SeqCst);
    let wheels = seen.wheels.lock().unwrap();
    match wheels.iter().find(|(f, _)| *f == file) {
        Some((_, bytes)) => bytes.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn manager() -> &'static Arc<TestManager> {
    static M: OnceLock<Arc<TestManager>> = OnceLock::new();
    M.get_or_init(|| {
        let mut config = python_config();
        config.wheelhouse = Some(wheelhouse());
        config.pip_index = Some(
            format!("http://127.0.0.1:{}/simple/", server().port)
                .parse()
                .unwrap(),
        );
        config.cache_dir.clone_from(&arl_e2e::cache_dir());
        TestManager::start(config, Runtimes::ours())
    })
}

/// A session allowed to reach the local server (and whatever else `more` adds to its create).
async fn allowed(more: Value) -> String {
    let mut body = json!({"network": {"allow": [format!("127.0.0.1:{}", server().port)]}});
    if let (Some(body), Some(more)) = (body.as_object_mut(), more.as_object()) {
        body.extend(more.clone());
    }
    manager().create(body).await
}

fn url(path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", server().port)
}

/// The error a turn raised, as `type: message`; panics if it raised none.
fn raised(v: &Value) -> String {
    assert!(v["error"].is_object(), "expected an error: {v}");
    format!(
        "{}: {}",
        v["error"]["type"].as_str().unwrap(),
        v["error"]["message"].as_str().unwrap()
    )
}

#[tokio::test]
async fn a_session_reaches_only_what_its_policy_allows() {
    let m = manager();
    let open = allowed(json!({})).await;
    let closed = m.create(json!({})).await;
    let get = format!(
        "import urllib.request\nurllib.request.urlopen({:?}).read().decode()",
        url("/hello")
    );
    assert_eq!(m.exec(&open, &get).await["result"], "'hello from the host'");
    let refused = raised(&m.exec(&closed, &get).await);
    assert!(refused.starts_with("NetworkRefused"), "{refused}");
    assert!(refused.contains("this session has no network"), "{refused}");
    let v = m
        .exec(&closed, &format!("import arl\ntry:\n    arl.request('GET', {:?})\nexcept arl.NetworkRefused as e:\n    refused = isinstance(e, PermissionError)\nrefused", url("/hello")))
        .await;
    assert_eq!(v["result"], "True", "a refusal is a PermissionError: {v}");

    // http.client and the requests shim go the same way.
    let v = m
        .exec(&open, &format!(
            "import http.client\nc = http.client.HTTPConnection('127.0.0.1', {})\nc.request('GET', '/hello')\nr = c.getresponse()\nfirst = (r.status, r.read())\nc.request('POST', '/echo', body=b'again')\nfirst, c.getresponse().read()",
            server().port
        ))
        .await;
    assert_eq!(
        v["result"],
        "((200, b'hello from the host'), b'{\"body\":\"again\",\"content_type\":\"\"}')",
        "{v}"
    );
    let v = m
        .exec(&open, &format!("import requests\nr = requests.post({:?}, json={{'a': 1}})\nr.status_code, r.json()", url("/echo")))
        .await;
    assert_eq!(
        v["result"], "(200, {'body': '{\"a\": 1}', 'content_type': 'application/json'})",
        "{v}"
    );

    // A listed name that resolves to a private address is refused: only a rule naming the
    // address allows one.
    let named = m
        .create(json!({"network": {"allow": [format!("localhost:{}", server().port)]}}))
        .await;
    let v = m
        .exec(
            &named,
            &format!(
                "import urllib.request\nurllib.request.urlopen('http://localhost:{}/hello').read()",
                server().port
            ),
        )
        .await;
    let refused = raised(&v);
    assert!(
        refused.contains("localhost resolves to") && refused.contains("not a public address"),
        "{refused}"
    );

    // Every call is in the session's history, refusals too.
    let (_, history) = m.get_text(&format!("/v1/sessions/{open}/history")).await;
    let first: Value = serde_json::from_str(history.lines().next().unwrap()).unwrap();
    let request = &first["requests"][0];
    assert_eq!(
        (
            request["kind"].as_str(),
            request["method"].as_str(),
            request["status"].as_u64()
        ),
        (Some("http"), Some("GET"), Some(200)),
        "{first}"
    );
    assert_eq!(request["url"], url("/hello"));
    assert_eq!(request["bytes_received"], 19);
    let (_, history) = m.get_text(&format!("/v1/sessions/{closed}/history")).await;
    assert!(history.contains("\"error\":\"refused:"), "{history}");
    let (_, metrics) = m.get_text("/metrics").await;
    assert!(
        metrics.contains("arl_egress_requests_total{kind=\"http\",outcome=\"ok\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("arl_egress_requests_total{kind=\"http\",outcome=\"refused\"}"),
        "{metrics}"
    );

    // The session shows what it may reach.
    let (_, info) = m.get(&format!("/v1/sessions/{open}")).await;
    assert_eq!(
        info["network"]["allow"],
        json!([format!("127.0.0.1:{}", server().port)]),
        "{info}"
    );
    assert!(info["network"]["requests"].as_u64().unwrap() >= 3, "{info}");
}

#[tokio::test]
async fn redirects_are_checked_at_each_hop() {
    let m = manager();
    let id = allowed(json!({})).await;
    let v = m
        .exec(
            &id,
            &format!(
                "import urllib.request\nurllib.request.urlopen({:?}).read()",
                url("/to-hello")
            ),
        )
        .await;
    assert_eq!(v["result"], "b'hello from the host'", "{v}");
    let v = m
        .exec(
            &id,
            &format!(
                "import urllib.request\nurllib.request.urlopen({:?}).read()",
                url("/away")
            ),
        )
        .await;
    let refused = raised(&v);
    assert!(
        refused.contains(&format!(
            "127.0.0.1:{} is not in this session's network allow-list",
            server().other_port
        )),
        "{refused}"
    );
    let v = m
        .exec(&id, &format!("import requests\nr = requests.get({:?}, allow_redirects=False)\nr.status_code, r.headers['location']", url("/away")))
        .await;
    assert_eq!(
        v["result"],
        format!("(307, 'http://127.0.0.1:{}/hello')", server().other_port),
        "{v}"
    );
}

#[tokio::test]
async fn bodies_and_request_counts_are_capped_per_session() {
    let m = manager();
    let small = allowed(json!({"network": {"allow": [format!("127.0.0.1:{}", server().port)], "max_bytes": 1 << 20, "max_requests": 3}})).await;
    let hello = format!(
        "import urllib.request\nurllib.request.urlopen({:?}).read()",
        url("/hello")
    );
    assert_eq!(
        m.exec(&small, &hello).await["result"],
        "b'hello from the host'"
    );
    assert_eq!(
        m.exec(&small, &hello).await["result"],
        "b'hello from the host'"
    );
    let v = m
        .exec(
            &small,
            &format!(
                "import urllib.request\nlen(urllib.request.urlopen({:?}).read())",
                url("/big")
            ),
        )
        .await;
    let refused = raised(&v);
    assert!(
        refused.starts_with("NetworkRefused") && refused.contains("network.max_bytes"),
        "{refused}"
    );
    let refused = raised(&m.exec(&small, &hello).await);
    assert!(
        refused.contains("made its 3 requests (network.max_requests)"),
        "{refused}"
    );
    // A neighbour with its own budget is untouched.
    let big = allowed(json!({})).await;
    let v = m
        .exec(
            &big,
            &format!(
                "import urllib.request\nlen(urllib.request.urlopen({:?}).read())",
                url("/big")
            ),
        )
        .await;
    assert_eq!(v["result"], (2 << 20).to_string(), "{v}");
}

#[tokio::test]
async fn a_hanging_request_ends_with_the_turn_and_is_cancelled() {
    let m = manager();
    let id = allowed(json!({"timeout_ms": 1500})).await;
    m.exec(&id, "kept = 'before'").await;
    let before = server().seen.abandoned.load(Ordering::SeqCst);
    let started = Instant::now();
    let v = m
        .exec(
            &id,
            &format!(
                "import urllib.request\nkept = 'during'\nurllib.request.urlopen({:?}).read()",
                url("/slow")
            ),
        )
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the deadline bounds the request"
    );
    assert_eq!(
        (v["rolled_back"].as_bool(), v["rollback_reason"].as_str()),
        (Some(true), Some("deadline")),
        "{v}"
    );
    assert_eq!(m.exec(&id, "kept").await["result"], "'before'");
    let deadline = Instant::now() + Duration::from_secs(5);
    while server().seen.abandoned.load(Ordering::SeqCst) == before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        server().seen.abandoned.load(Ordering::SeqCst) > before,
        "the server saw the request dropped"
    );
    // The library's own timeout is a TimeoutError in the guest, the session untouched.
    let v = m
        .exec(&id, &format!("import urllib.request, urllib.error\ntry:\n    urllib.request.urlopen({:?}, timeout=0.2)\nexcept TimeoutError as e:\n    kind = type(e).__name__\nkind", url("/slow")))
        .await;
    assert_eq!(v["result"], "'TimeoutError'", "{v}");
}

#[tokio::test]
async fn malformed_policies_and_tools_answer_422_naming_the_field() {
    let m = manager();
    for (body, names) in [
        (json!({"network": {"allow": ["*.com"]}}), "network.allow[0]"),
        (
            json!({"network": {"allow": ["ok.example.com", "a.example.com:0"]}}),
            "network.allow[1]",
        ),
        (
            json!({"network": {"allow": ["a.example.com:70000"]}}),
            "between 1 and 65535",
        ),
        (
            json!({"network": {"allow": ["https://a.example.com/x"]}}),
            "not a URL",
        ),
        (
            json!({"network": {"allow": ["a.*.example.com"]}}),
            "first label",
        ),
        (
            json!({"network": {"allow": [], "max_requests": u64::MAX}}),
            "network.max_requests",
        ),
        (json!({"network": {"allow": [], "speed": 1}}), "speed"),
        (
            json!({"tools": {"not a name": {"url": "http://127.0.0.1:1/x"}}}),
            "tools.not a name",
        ),
        (
            json!({"tools": {"llm_query": {"url": "ftp://127.0.0.1/x"}}}),
            "tools.llm_query.url",
        ),
    ] {
        let (status, v) = m.post("/v1/sessions", body.clone()).await;
        assert_eq!(status, 422, "{body}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(names), "{body}: {message}");
    }
}

#[tokio::test]
async fn llm_query_calls_the_callers_endpoint() {
    let m = manager();
    let id = m
        .create(json!({"tools": {"llm_query": {"url": url("/llm"), "headers": {"Authorization": "Bearer caller"}}}}))
        .await;
    let v = m
        .exec(
            &id,
            "answer = llm_query('what is 6 x 7?', model='small')\nanswer",
        )
        .await;
    assert_eq!(v["result"], "'the model says: what is 6 x 7?'", "{v}");
    let (call, auth) = server().seen.tool_call.lock().unwrap().clone().unwrap();
    assert_eq!(
        call,
        json!({"tool": "llm_query", "session_id": id, "args": ["what is 6 x 7?"], "kwargs": {"model": "small"}})
    );
    assert_eq!(
        auth.as_deref(),
        Some("Bearer caller"),
        "the tool's headers go to the caller, never to the guest"
    );
    let v = m
        .exec(&id, "import arl\narl.tools.llm_query('again')")
        .await;
    assert_eq!(v["result"], "'the model says: again'");
    // The tool's URL is the tool's alone: plain HTTP to it is still refused.
    let refused = raised(
        &m.exec(
            &id,
            &format!(
                "import urllib.request\nurllib.request.urlopen({:?})",
                url("/hello")
            ),
        )
        .await,
    );
    assert!(refused.contains("no network"), "{refused}");
    let refused = raised(&m.exec(&id, "import arl\narl.tools.search('x')").await);
    assert!(
        refused.starts_with("ToolError") && refused.contains("no tool `search`"),
        "{refused}"
    );
}

#[tokio::test]
async fn pip_installs_pure_wheels_that_travel_with_the_session() {
    let m = manager();
    let id = m.create(json!({})).await;
    let v = m
        .exec(
            &id,
            "%pip install greeter\nimport greeter\ngreeter.greet('you')",
        )
        .await;
    assert_eq!(
        v["result"], "'hello you!'",
        "the newest punct satisfying >=0.2 came with it: {v}"
    );
    assert_eq!(
        v["stdout"], "Successfully installed greeter-1.0.0 punct-0.2\n",
        "numpy is the runtime's own"
    );
    let v = m
        .exec(&id, "import arl\narl.install('punct==0.1', upgrade=True)")
        .await;
    assert_eq!(v["result"], "[{'name': 'punct', 'version': '0.1'}]", "{v}");
    let (_, listing) = m
        .get(&format!("/v1/sessions/{id}/files?path=.arl/site-packages"))
        .await;
    let names: Vec<&str> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["path"].as_str())
        .collect();
    assert!(
        names.contains(&".arl/site-packages/punct-0.1.dist-info")
            && !names.contains(&".arl/site-packages/punct-0.2.dist-info"),
        "{names:?}"
    );

    let refused = raised(&m.exec(&id, "%pip install fastmath").await);
    assert!(
        refused.starts_with("InstallError")
            && refused.contains("fastmath")
            && refused.contains("native code cannot run in WebAssembly"),
        "{refused}"
    );
    let refused = raised(&m.exec(&id, "%pip install nothing-like-it").await);
    assert!(
        refused.contains("no wheel of `nothing-like-it`") && refused.contains("not searched"),
        "{refused}"
    );
    let refused = raised(&m.exec(&id, "%pip uninstall greeter").await);
    assert!(refused.contains("only `pip install`"), "{refused}");

    // A fork has the package, files and all.
    let (status, fork) = m.post(&format!("/v1/sessions/{id}/fork"), json!({})).await;
    assert_eq!(status, 201, "{fork}");
    let fork = fork["id"].as_str().unwrap();
    let v = m
        .exec(
            fork,
            "import importlib, greeter, sys\nimportlib.reload(greeter).greet('fork')",
        )
        .await;
    assert_eq!(v["result"], "'hello fork!'", "{v}");

    // So does a snapshot restored into a new session: the module in memory, its files on disk.
    let (status, snapshot) = m
        .post(&format!("/v1/sessions/{id}/snapshot"), json!({}))
        .await;
    assert_eq!(status, 201, "{snapshot}");
    let restored = m
        .create(json!({"from_snapshot": snapshot["id"].as_str().unwrap()}))
        .await;
    let v = m
        .exec(
            &restored,
            "import greeter, os\ngreeter.greet('restored'), os.path.isfile('.arl/site-packages/punct.py')",
        )
        .await;
    assert_eq!(v["result"], "('hello restored!', True)", "{v}");
}

#[tokio::test]
async fn pip_uses_the_index_only_where_the_policy_allows_its_host() {
    let m = manager();
    let open = allowed(json!({})).await;
    let v = m
        .exec(
            &open,
            "%pip install indexed-pkg\nimport indexed_pkg\nindexed_pkg.WHERE",
        )
        .await;
    assert_eq!(v["result"], "'from the index'", "{v}");
    assert_eq!(
        v["stdout"],
        format!("Successfully installed indexed-pkg-{}\n", index_version())
    );
    // A second session installs the same wheel from the manager's cache: one download.
    let again = allowed(json!({})).await;
    let v = m
        .exec(
            &again,
            "%pip install indexed-pkg\nimport indexed_pkg\nindexed_pkg.WHERE",
        )
        .await;
    assert_eq!(v["result"], "'from the index'", "{v}");
    assert_eq!(
        server().seen.downloads.load(Ordering::SeqCst),
        1,
        "the wheel is kept once"
    );
    let closed = m.create(json!({})).await;
    let refused = raised(&m.exec(&closed, "%pip install indexed-pkg").await);
    assert!(
        refused.contains("not searched: this session's network does not allow its host"),
        "{refused}"
    );
}

/// JavaScript sessions leave the sandbox through the same door: `fetch` within the policy,
/// `NetworkRefused` outside it, and the caller's tools.
#[tokio::test]
async fn javascript_fetches_through_the_door_and_calls_tools() {
    let m = manager();
    let id = allowed(json!({
        "runtime": "javascript",
        "tools": {"llm_query": {"url": url("/llm")}},
    }))
    .await;
    let v = m
        .exec(
            &id,
            &format!(
                "const r = await fetch({:?}, {{ method: 'POST', headers: {{ 'content-type': 'text/plain' }}, body: 'héllo' }});\n[r.status, r.ok, await r.json()]",
                url("/echo")
            ),
        )
        .await;
    assert_eq!(
        v["result"], "[ 200, true, { body: 'héllo', content_type: 'text/plain' } ]",
        "{v}"
    );
    let v = m.exec(&id, "await fetch('http://127.0.0.1:9/')").await;
    assert_eq!(v["error"]["type"], "NetworkRefused", "{v}");
    let v = m.exec(&id, "llm_query('six times seven?')").await;
    assert_eq!(v["result"], "'the model says: six times seven?'", "{v}");
    let (_, history) = m.get_text(&format!("/v1/sessions/{id}/history")).await;
    let first: Value = serde_json::from_str(history.lines().next().unwrap()).unwrap();
    assert_eq!(
        (
            &first["requests"][0]["method"],
            &first["requests"][0]["status"]
        ),
        (&json!("POST"), &json!(200)),
        "the turn's record names its call: {first}"
    );
}
