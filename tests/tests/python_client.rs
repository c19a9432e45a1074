//! ARL's own Python client (`clients/python`, distribution `arl-client`): pip-installed from
//! the repository, its pytest suite run against a real manager with a token (the sync and
//! async clients, the RLM factory, the `rlms` environment with a stub model), and the package
//! type-checked with mypy in strict mode.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::path::Path;
use std::process::Command;

use arl_e2e::{Runtimes, TestManager, python, python_config, pytools};
use arl_manager::ServeOptions;

/// What the suite and the type check need, pinned; `httpx` is the client's one dependency.
const TOOLS: [&str; 4] = [
    "httpx==0.29.0",
    "pytest==9.2.0",
    "mypy==2.4.1",
    "rlms==0.1.3",
];

fn client_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("clients")
        .join("python")
}

/// Runs `python args` with `path` as its `PYTHONPATH`; panics with its output unless it
/// succeeds.
fn run(path: &str, args: &[&str], envs: &[(&str, &str)]) {
    let out = Command::new(python())
        .args(args)
        .current_dir(client_dir())
        .env("PYTHONPATH", path)
        .env(
            "MYPY_CACHE_DIR",
            std::env::temp_dir().join("arl-mypy-cache"),
        )
        .envs(envs.iter().copied())
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "python {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_python_client_installs_passes_its_suite_and_type_checks_strictly() {
    let tools = pytools(&TOOLS);
    // Installed as a user would (`pip install ./clients/python`), into a folder of its own.
    let installed = tempfile::tempdir().unwrap();
    let target = installed.path().to_str().unwrap().to_owned();
    let dir = client_dir();
    let pip = [
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--target",
        &target,
        dir.to_str().unwrap(),
    ];
    run("", &pip, &[]);
    let path = format!("{target}:{}", tools.display());

    let options = ServeOptions {
        auth_token: Some("s3cret".into()),
        ..ServeOptions::default()
    };
    let m = TestManager::start_with(python_config(), Runtimes::python(), options);
    let base = m.base.clone();
    let suite = path.clone();
    tokio::task::spawn_blocking(move || {
        let envs = [("ARL_URL", base.as_str()), ("ARL_AUTH_TOKEN", "s3cret")];
        run(
            &suite,
            &["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
            &envs,
        );
    })
    .await
    .unwrap();
    assert_eq!(
        m.registry.load().sessions,
        0,
        "the suite leaves no session behind"
    );

    // Strict typing of the package as installed, and of its tests.
    run(&path, &["-m", "mypy", "--strict", "-p", "arl"], &[]);
    run(&path, &["-m", "mypy", "--strict", "tests"], &[]);
}
