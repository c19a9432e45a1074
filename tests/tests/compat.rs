//! The third-party clients ARL serves unchanged, driven as their users run them: the PyPI
//! packages, pinned, against a manager on a real socket.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::process::Command;

use arl_e2e::{Runtimes, TestManager, python, python_config, pytools};

/// The client versions these tests pin.
const SANDBOX_FUSION: [&str; 1] = ["sandbox-fusion==0.3.7"];

fn client_script(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join(name)
}

#[tokio::test]
async fn the_sandbox_fusion_client_runs_programs_unchanged() {
    let m = TestManager::start(python_config(), Runtimes::python());
    let tools = pytools(&SANDBOX_FUSION);
    let base = m.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(client_script("fusion.py"))
            .arg(&base)
            .env("PYTHONPATH", &tools)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "fusion.py failed:\n{stdout}\n{stderr}"
    );
    assert_eq!(stdout.trim_end(), "ok", "{stderr}");
    assert_eq!(
        m.registry.load().sessions,
        0,
        "every program's session is gone"
    );
}
