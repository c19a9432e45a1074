//! The session contract, the same for every runtime ARL ships: one table of cells per runtime,
//! one test per promise, each run against Python and JavaScript in one manager.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arl_e2e::{Runtimes, TestManager, python_config};
use serde_json::{Value, json};

fn manager() -> &'static Arc<TestManager> {
    static M: OnceLock<Arc<TestManager>> = OnceLock::new();
    M.get_or_init(|| {
        let mut config = python_config();
        config.defaults.timeout = Duration::from_secs(3);
        config.warm_sessions = 1;
        TestManager::start(config, Runtimes::ours())
    })
}

/// One runtime's cells for each promise of the contract.
struct Cells {
    runtime: &'static str,
    set: &'static str,
    get: &'static str,
    print: &'static str,
    /// Raises an error of type `error`.
    raise: &'static str,
    error: &'static str,
    spin: &'static str,
    exit: &'static str,
    write_file: &'static str,
    read_env: &'static str,
    env_value: &'static str,
}

const TABLE: &[Cells] = &[
    Cells {
        runtime: "python",
        set: "x = 41",
        get: "x + 1",
        print: "print('hi')",
        raise: "1 / 0",
        error: "ZeroDivisionError",
        spin: "x = 0\nwhile True: pass",
        exit: "import sys; sys.exit(3)",
        write_file: "open('/workspace/out.txt', 'w').write('from the cell')",
        read_env: "import os; os.environ['TOKEN']",
        env_value: "'t0k'",
    },
    Cells {
        runtime: "javascript",
        set: "let x = 41",
        get: "x + 1",
        print: "console.log('hi')",
        raise: "null.f()",
        error: "TypeError",
        spin: "x = 0; while (true) {}",
        exit: "process.exit(3)",
        write_file: "require('fs').writeFileSync('/workspace/out.txt', 'from the cell')",
        read_env: "process.env.TOKEN",
        env_value: "'t0k'",
    },
];

async fn session(cells: &Cells) -> String {
    manager().create(json!({ "runtime": cells.runtime })).await
}

async fn exec(id: &str, code: &str) -> Value {
    manager().exec(id, code).await
}

#[tokio::test]
async fn state_output_and_errors() {
    for c in TABLE {
        let id = session(c).await;
        exec(&id, c.set).await;
        let v = exec(&id, c.get).await;
        assert_eq!(
            (&v["result"], &v["error"]),
            (&json!("42"), &Value::Null),
            "{}: {v}",
            c.runtime
        );
        let v = exec(&id, c.print).await;
        assert_eq!(
            (&v["stdout"], &v["result"]),
            (&json!("hi\n"), &Value::Null),
            "{}: {v}",
            c.runtime
        );
        let v = exec(&id, c.raise).await;
        assert_eq!(v["error"]["type"], c.error, "{}: {v}", c.runtime);
        assert!(
            !v["error"]["traceback"].as_str().unwrap().is_empty(),
            "{}: {v}",
            c.runtime
        );
        assert_eq!(
            exec(&id, c.get).await["result"],
            "42",
            "{} lives on after an error",
            c.runtime
        );
        let (_, info) = manager().get(&format!("/v1/sessions/{id}")).await;
        assert_eq!(
            (&info["runtime"], &info["executions"]),
            (&json!(c.runtime), &json!(5)),
            "{info}"
        );
    }
}

#[tokio::test]
async fn a_deadline_rolls_the_turn_back() {
    for c in TABLE {
        let id = session(c).await;
        exec(&id, c.set).await;
        let v = exec(&id, c.spin).await;
        assert_eq!(
            (&v["rolled_back"], &v["rollback_reason"]),
            (&json!(true), &json!("deadline")),
            "{}: {v}",
            c.runtime
        );
        assert_eq!(exec(&id, c.get).await["result"], "42", "{}", c.runtime);
    }
}

#[tokio::test]
async fn forks_and_snapshots_carry_state_and_files() {
    let m = manager();
    for c in TABLE {
        let id = session(c).await;
        exec(&id, c.set).await;
        exec(&id, c.write_file).await;
        let (status, fork) = m.post(&format!("/v1/sessions/{id}/fork"), json!({})).await;
        assert_eq!(status, 201, "{}: {fork}", c.runtime);
        let fork = fork["id"].as_str().unwrap();
        assert_eq!(exec(fork, c.get).await["result"], "42", "{}", c.runtime);
        let (status, snap) = m
            .post(&format!("/v1/sessions/{id}/snapshot"), json!({}))
            .await;
        assert_eq!(
            (status, &snap["runtime"]),
            (201, &json!(c.runtime)),
            "{snap}"
        );
        let restored = m.create(json!({ "from_snapshot": snap["id"] })).await;
        assert_eq!(
            exec(&restored, c.get).await["result"],
            "42",
            "{}",
            c.runtime
        );
        let (status, text) = m
            .get_text(&format!("/v1/sessions/{restored}/files/out.txt"))
            .await;
        assert_eq!(
            (status, text.as_str()),
            (200, "from the cell"),
            "{}",
            c.runtime
        );
    }
}

#[tokio::test]
async fn env_history_and_exit() {
    let m = manager();
    for c in TABLE {
        let id = m
            .create(json!({ "runtime": c.runtime, "env": { "TOKEN": "t0k" } }))
            .await;
        assert_eq!(
            exec(&id, c.read_env).await["result"],
            c.env_value,
            "{}",
            c.runtime
        );
        let (status, history) = m.get_text(&format!("/v1/sessions/{id}/history")).await;
        assert_eq!(status, 200);
        let turns: Vec<Value> = history
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            (turns.len(), &turns[0]["code"]),
            (1, &json!(c.read_env)),
            "{}",
            c.runtime
        );
        let v = exec(&id, c.exit).await;
        assert_eq!(
            (&v["session_ended"], &v["end_reason"]),
            (&json!(true), &json!("exit")),
            "{}: {v}",
            c.runtime
        );
    }
}

#[tokio::test]
async fn each_runtime_has_its_warm_sessions_and_its_metrics() {
    let m = manager();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while m.registry.warm().len() < TABLE.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "warm: {:?}",
            m.registry.warm()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for c in TABLE {
        session(c).await;
    }
    let (_, metrics) = m.get_text("/metrics").await;
    for c in TABLE {
        let line = format!("arl_sessions_created_total{{runtime=\"{}\"}}", c.runtime);
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
}
