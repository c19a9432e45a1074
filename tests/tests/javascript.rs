//! The manager over real sockets with ARL's JavaScript runtime (the Boa engine as a WASI
//! reactor): Node-REPL cells, TypeScript, limits, fork, snapshot and files.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arl_e2e::{Runtimes, TestManager, python_config};
use serde_json::{Value, json};

fn manager() -> &'static Arc<TestManager> {
    static M: OnceLock<Arc<TestManager>> = OnceLock::new();
    M.get_or_init(|| {
        let mut config = python_config();
        config.defaults.timeout = Duration::from_secs(5);
        config.defaults.memory_bytes = 128 << 20;
        TestManager::start(config, Runtimes::javascript())
    })
}

async fn session() -> String {
    manager().create(json!({ "runtime": "javascript" })).await
}

async fn result(id: &str, code: &str) -> Value {
    let v = manager().exec(id, code).await;
    assert_eq!(v["error"], Value::Null, "{code}: {v}");
    v["result"].clone()
}

#[tokio::test]
async fn globals_persist_across_turns_as_in_nodes_repl() {
    let id = session().await;
    assert_eq!(
        result(&id, "let x = 41").await,
        Value::Null,
        "a statement has no value"
    );
    assert_eq!(result(&id, "x + 1").await, "42");
    result(
        &id,
        "const k = 2; class Point { constructor(x) { this.x = x } }; function twice(n) { return n * k }",
    )
    .await;
    assert_eq!(
        result(&id, "[twice(x), new Point(1)]").await,
        "[ 82, Point { x: 1 } ]"
    );
    assert_eq!(result(&id, "var v = 'kept'; v").await, "'kept'");
    let v = manager().exec(&id, "k = 3").await;
    assert_eq!(v["error"]["type"], "TypeError", "const stays const: {v}");
}

#[tokio::test]
async fn results_read_as_util_inspect_prints_them() {
    let id = session().await;
    let cases = [
        ("'it'", "'it'"),
        (
            "({ a: 1, b: [1, 2], c: 'x' })",
            "{ a: 1, b: [ 1, 2 ], c: 'x' }",
        ),
        (
            "({ a: { b: { c: { d: 1 } } } })",
            "{ a: { b: { c: [Object] } } }",
        ),
        ("new Map([['k', 1]])", "Map(1) { 'k' => 1 }"),
        ("new Set([1, 'two'])", "Set(2) { 1, 'two' }"),
        (
            "[undefined, null, NaN, -0, 1n]",
            "[ undefined, null, NaN, -0, 1n ]",
        ),
        (
            "Array.from({ length: 10 }, (_, i) => i)",
            "[\n  0, 1, 2, 3, 4,\n  5, 6, 7, 8, 9\n]",
        ),
        ("(function foo() {})", "[Function: foo]"),
        ("(class Bar extends Array {})", "[class Bar extends Array]"),
        ("Promise.resolve(42)", "Promise { 42 }"),
        (
            "(() => { const o = {}; o.self = o; return o })()",
            "<ref *1> { self: [Circular *1] }",
        ),
        ("new Date(0)", "1970-01-01T00:00:00.000Z"),
        ("Math", "Object [Math] {}"),
    ];
    for (code, shown) in cases {
        assert_eq!(result(&id, code).await, shown, "{code}");
    }
    let v = manager().exec(&id, "undefined").await;
    assert_eq!((&v["result"], &v["results"]), (&Value::Null, &json!([])));
    let v = manager().exec(&id, "6 * 7").await;
    assert_eq!(
        v["results"],
        json!([{ "text/plain": "42", "is_main_result": true }])
    );
}

#[tokio::test]
async fn console_goes_to_stdout_and_stderr_and_streams() {
    let m = manager();
    let id = session().await;
    let v = m
        .exec(
            &id,
            "console.log('hi', { a: 1 }, 2); console.error('oops %d', 5); 7",
        )
        .await;
    assert_eq!(
        (&v["stdout"], &v["stderr"], &v["result"]),
        (&json!("hi { a: 1 } 2\n"), &json!("oops 5\n"), &json!("7"))
    );
    let text = m
        .exec_streamed(
            &id,
            "for (let i = 0; i < 3; i++) { console.log(`line ${i}`); await new Promise(r => setTimeout(r, 30)) }",
        )
        .await;
    let first = text.find("event: stdout").expect(&text);
    let result = text.find("event: result").expect(&text);
    assert!(first < result, "{text}");
    assert_eq!(
        text.matches("event: stdout").count(),
        3,
        "one event a line: {text}"
    );
}

#[tokio::test]
async fn errors_come_back_with_name_message_and_stack() {
    let m = manager();
    let id = session().await;
    let v = m
        .exec(
            &id,
            "function inner() { throw new TypeError('bad input') }\ninner()",
        )
        .await;
    assert_eq!(
        (&v["error"]["type"], &v["error"]["message"]),
        (&json!("TypeError"), &json!("bad input"))
    );
    let stack = v["error"]["traceback"].as_str().unwrap();
    assert!(
        stack.starts_with("TypeError: bad input\n") && stack.contains("at inner (REPL1:1:"),
        "{stack}"
    );

    let v = m.exec(&id, "let y = ;").await;
    assert_eq!(v["error"]["type"], "SyntaxError", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 1, col 9"),
        "{v}"
    );
    let v = m.exec(&id, "throw 'a string'").await;
    assert_eq!(
        (&v["error"]["type"], &v["error"]["message"]),
        (&json!("Uncaught"), &json!("'a string'"))
    );
    let v = m.exec(&id, "function r() { return r() }; r()").await;
    assert_eq!(
        v["error"]["type"], "RangeError",
        "runaway recursion is an error, not a trap: {v}"
    );
    assert_eq!(result(&id, "1 + 1").await, "2", "the session lives on");
}

#[tokio::test]
async fn promises_timers_and_top_level_await_settle_within_the_turn() {
    let m = manager();
    let id = session().await;
    let v = m
        .exec(
            &id,
            "setTimeout(() => console.log('later'), 20); console.log('now')",
        )
        .await;
    assert_eq!(
        v["stdout"], "now\nlater\n",
        "the turn runs its event loop out"
    );
    assert_eq!(
        result(
            &id,
            "const got = await new Promise(r => setTimeout(() => r(21), 10)); got * 2"
        )
        .await,
        "42"
    );
    assert_eq!(
        result(&id, "got").await,
        "21",
        "a top-level-await cell's const is global"
    );
    result(
        &id,
        "const { a, b: [c] } = await Promise.resolve({ a: 1, b: [2] }); class Later {}",
    )
    .await;
    assert_eq!(
        result(&id, "[a, c, typeof Later]").await,
        "[ 1, 2, 'function' ]"
    );
    let v = m
        .exec(&id, "await Promise.reject(new RangeError('nope'))")
        .await;
    assert_eq!(
        (&v["error"]["type"], &v["error"]["message"]),
        (&json!("RangeError"), &json!("nope"))
    );
    let v = m
        .exec(&id, "Promise.reject(new Error('nobody caught me')); 1")
        .await;
    assert_eq!(
        v["error"]["message"], "nobody caught me",
        "an unhandled rejection is the turn's error: {v}"
    );
    assert!(
        v["error"]["traceback"]
            .as_str()
            .unwrap()
            .starts_with("Uncaught (in promise)"),
        "{v}"
    );
    let v = m
        .exec(
            &id,
            "const t = setInterval(() => {}, 5); clearInterval(t); 'cleared'",
        )
        .await;
    assert_eq!(v["result"], "'cleared'");
}

#[tokio::test]
async fn typescript_cells_have_their_types_stripped() {
    let m = manager();
    for body in [
        json!({ "runtime": "javascript", "language": "typescript" }),
        json!({ "runtime": "typescript" }),
    ] {
        let id = m.create(body).await;
        result(
            &id,
            "interface P { x: number }\nconst p: P = { x: 1 };\nenum Color { Red, Green }\nfunction id<T>(v: T): T { return v }",
        )
        .await;
        assert_eq!(result(&id, "id<number>(p.x) + Color.Green").await, "2");
        assert_eq!(
            result(&id, "const s = await Promise.resolve<string>('ok'); s").await,
            "'ok'"
        );
        let v = m.exec(&id, "let z: number = ;").await;
        assert_eq!(v["error"]["type"], "SyntaxError", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("line 1, col 17"),
            "{v}"
        );
    }
    let (status, v) = m
        .post(
            "/v1/sessions",
            json!({ "runtime": "javascript", "language": "cobol" }),
        )
        .await;
    assert_eq!(
        (status, &v["error"]["code"]),
        (422, &json!("unknown_language")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("typescript"),
        "{v}"
    );
}

#[tokio::test]
async fn runaway_loops_and_memory_bombs_are_contained_and_rolled_back() {
    let m = manager();
    let id = session().await;
    result(&id, "let x = 41").await;
    let v = m.exec(&id, "x = 0; while (true) {}").await;
    assert_eq!(
        (&v["rolled_back"], &v["rollback_reason"]),
        (&json!(true), &json!("deadline")),
        "{v}"
    );
    let v = m.exec(&id, "x = 0; setInterval(() => {}, 1)").await;
    assert_eq!(
        v["rollback_reason"], "deadline",
        "a timer that never ends is bounded too: {v}"
    );
    assert_eq!(result(&id, "x + 1").await, "42", "back to the state before");

    let v = m
        .exec(&id, "x = 0; let s = 'x'.repeat(1 << 29); s.length")
        .await;
    assert_eq!(v["rolled_back"], true, "{v}");
    let v = m
        .exec(
            &id,
            "x = 0; const held = []; for (;;) held.push(new ArrayBuffer(8 << 20))",
        )
        .await;
    assert!(
        v["rolled_back"] == true || v["error"]["type"] == "RangeError",
        "memory past the limit fails the turn: {v}"
    );
    let v = m.exec(&id, "x").await;
    assert!(v["result"] == "41" || v["result"] == "0", "{v}");
    let info = m.get(&format!("/v1/sessions/{id}")).await.1;
    assert!(
        info["memory_bytes"].as_u64().unwrap() <= 128 << 20,
        "{info}"
    );
}

#[tokio::test]
async fn forks_and_snapshots_carry_the_state_and_evolve_apart() {
    let m = manager();
    let id = session().await;
    result(
        &id,
        "let x = 41; require('fs').writeFileSync('notes.txt', 'kept')",
    )
    .await;
    let (status, fork) = m.post(&format!("/v1/sessions/{id}/fork"), json!({})).await;
    assert_eq!(status, 201, "{fork}");
    let fork = fork["id"].as_str().unwrap().to_owned();
    assert_eq!(
        result(
            &fork,
            "x += 1; [x, require('fs').readFileSync('notes.txt', 'utf8')]"
        )
        .await,
        "[ 42, 'kept' ]"
    );
    assert_eq!(
        result(&id, "x").await,
        "41",
        "the parent does not see the fork's change"
    );
    let draws = result(&fork, "Math.random()").await;
    assert_ne!(
        result(&id, "Math.random()").await,
        draws,
        "a fork draws its own numbers"
    );

    let (status, snap) = m
        .post(&format!("/v1/sessions/{id}/snapshot"), json!({}))
        .await;
    assert_eq!(
        (status, &snap["runtime"]),
        (201, &json!("javascript")),
        "{snap}"
    );
    let restored = m.create(json!({ "from_snapshot": snap["id"] })).await;
    assert_eq!(
        result(&restored, "[x, require('fs').readdirSync('.')]").await,
        "[ 41, [ 'notes.txt' ] ]"
    );
}

#[tokio::test]
async fn files_written_by_a_cell_are_the_files_api_s() {
    let m = manager();
    let id = session().await;
    result(&id, "const fs = require('fs'); fs.mkdirSync('out', { recursive: true }); fs.writeFileSync('out/a.json', JSON.stringify({ n: 1 }))").await;
    let (status, body) = m
        .get_text(&format!("/v1/sessions/{id}/files/out/a.json"))
        .await;
    assert_eq!((status, body.as_str()), (200, r#"{"n":1}"#));
    let r = arl_e2e::client()
        .put(m.url(&format!("/v1/sessions/{id}/files/in.txt")))
        .body("from the host")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(
        result(&id, "fs.readFileSync('/workspace/in.txt', 'utf8')").await,
        "'from the host'"
    );
    let v = m.exec(&id, "fs.readFileSync('/etc/passwd', 'utf8')").await;
    assert_eq!(
        v["error"]["type"], "Error",
        "outside the preopens nothing is there: {v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("ENOENT")
            || v["error"]["message"].as_str().unwrap().contains("EACCES")
            || v["error"]["message"].as_str().unwrap().starts_with("EIO"),
        "{v}"
    );
    assert_eq!(
        result(&id, "const bytes = new TextEncoder().encode('héllo'); [bytes.length, new TextDecoder().decode(bytes), btoa('hi'), atob('aGk=')]").await,
        "[ 6, 'héllo', 'aGk=', 'hi' ]"
    );
    let v = m.exec(&id, "require('child_process')").await;
    assert_eq!(v["error"]["type"], "Error", "no processes: {v}");
}

#[tokio::test]
async fn env_reaches_process_env_and_exit_ends_the_session() {
    let m = manager();
    let id = m
        .create(json!({ "runtime": "javascript", "env": { "TOKEN": "t0k" } }))
        .await;
    assert_eq!(
        result(&id, "[process.env.TOKEN, process.env.HOME, process.cwd()]").await,
        "[ 't0k', '/workspace', '/workspace' ]"
    );
    let v = m.exec(&id, "process.exit(3)").await;
    assert_eq!(
        (&v["session_ended"], &v["end_reason"]),
        (&json!(true), &json!("exit")),
        "{v}"
    );
}
