//! The OpenAPI document says what the server does: schemathesis (PyPI), run over
//! `/openapi.json` of a real `arl-manager serve` with every check, finds no response the
//! document does not declare, no request it allows that the server refuses, and none it
//! forbids that the server takes; with a token and without one.
//!
//! Its scope is ARL's own API (`/v1/...`), less two routes: `POST /v1/drain` (it would drain
//! the manager under the rest of the run) and `POST /v1/sessions/import` (a binary body that
//! schemathesis cannot make). Examples are bounded and the seed fixed, so a run is repeatable.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use common::{Manager, runtime, wait_ready};

fn schemathesis(base: &str, token: Option<&str>) {
    let tools = arl_build_support::pytools(
        &arl_build_support::cache_dir(),
        "python3",
        &["schemathesis==4.32.5"],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut command = std::process::Command::new("python3");
    command
        .args(["-m", "schemathesis.cli", "run"])
        .arg(format!("{base}/openapi.json"))
        .args(["--checks", "all", "--max-examples", "20", "--seed", "1"])
        .args(["--workers", "2", "--include-path-regex", "^/v1/"])
        .args(["--exclude-path", "/v1/drain"])
        .args(["--exclude-path", "/v1/sessions/import"])
        .env("PYTHONPATH", tools)
        .env("NO_COLOR", "1");
    if let Some(token) = token {
        command.args(["--header", &format!("Authorization: Bearer {token}")]);
    }
    let out = command.output().expect("running schemathesis");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found what the document does not say (token: {}):\n{report}\n{}",
        token.is_some(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("API Operations"), "{report}");
}

#[test]
fn the_document_says_what_the_server_does() {
    let rt = runtime();
    for token in [None, Some("st-token")] {
        let m = Manager::spawn("st", |command| {
            command.args(["--runtimes", "python,javascript"]);
            if let Some(token) = token {
                command.args(["--auth-token", token]);
            }
        });
        rt.block_on(wait_ready(&m.base));
        schemathesis(&m.base, token);
    }
}
