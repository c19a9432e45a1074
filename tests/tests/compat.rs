//! The third-party clients ARL serves unchanged, driven as their users run them: the PyPI
//! packages, pinned, against a manager on a real socket.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use arl_e2e::{Runtimes, TestManager, client, python_config, run_client};
use arl_manager::ServeOptions;

/// The client versions these tests pin.
pub const SANDBOX_FUSION: [&str; 1] = ["sandbox-fusion==0.3.7"];

#[tokio::test]
async fn the_sandbox_fusion_client_runs_programs_unchanged() {
    let m = TestManager::start(python_config(), Runtimes::python());
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
    let m = TestManager::start_with(python_config(), Runtimes::python(), options);
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
    let m = TestManager::start(python_config(), Runtimes::python());
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
    let m = TestManager::start_with(python_config(), Runtimes::python(), options);
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
