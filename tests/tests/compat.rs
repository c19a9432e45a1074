//! The third-party clients ARL serves unchanged, driven as their users run them: the PyPI
//! packages, pinned, against a manager on a real socket.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use arl_e2e::{Runtimes, TestManager, python_config, run_client};

/// The client versions these tests pin.
pub const SANDBOX_FUSION: [&str; 1] = ["sandbox-fusion==0.3.7"];

#[tokio::test]
async fn the_sandbox_fusion_client_runs_programs_unchanged() {
    let m = TestManager::start(python_config(), Runtimes::python());
    run_client("fusion.py", &m.base, &SANDBOX_FUSION).await;
    assert_eq!(
        m.registry.load().sessions,
        0,
        "every program's session is gone"
    );
}
