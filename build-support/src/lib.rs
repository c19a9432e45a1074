//! What the workspace's build scripts share: they build WebAssembly guests (the test guests of
//! `wasm-guests/`, the JavaScript runtime of `runtimes/javascript/`) with a nested cargo, for
//! `wasm32-wasip1`, and a fresh rustup install lacks that target's standard library. The
//! tests of several crates share [`pytools`] too: PyPI packages installed once into the cache.
//!
//! Build scripts and tests report failure by panicking, so these functions do too, with what
//! to do.
#![allow(
    clippy::expect_used,
    reason = "build scripts report failure by panicking"
)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guests' target.
pub const TARGET: &str = "wasm32-wasip1";

/// Adds [`TARGET`] to the toolchain cargo runs under when its standard library is missing.
/// Several build scripts may ask at once: one adds it while the others wait on a lock.
pub fn ensure_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let present = || {
        sysroot
            .as_ref()
            .is_some_and(|root| root.join("lib/rustlib").join(TARGET).exists())
    };
    if present() {
        return;
    }
    let lock_path = std::env::temp_dir().join("arl-rustup-target.lock");
    let lock = File::create(&lock_path).expect("creating the rustup lock file");
    lock.lock().expect("locking the rustup lock file");
    if present() {
        return;
    }
    let mut rustup = Command::new("rustup");
    rustup.args(["target", "add", TARGET]);
    if let Ok(toolchain) = std::env::var("RUSTUP_TOOLCHAIN") {
        rustup.args(["--toolchain", &toolchain]);
    }
    println!("cargo:warning=adding the {TARGET} target with rustup");
    let added = rustup.status().is_ok_and(|s| s.success());
    assert!(
        added,
        "the guests need the {TARGET} target and `rustup target add {TARGET}` failed: \
         install it for the toolchain that builds this workspace"
    );
}

/// Builds the cargo workspace at `root` for [`TARGET`] in release, into `root/target`, and
/// returns the folder its `.wasm` files land in. The caller says what to watch.
pub fn build_guests(root: &Path) -> PathBuf {
    ensure_target();
    let target_dir = root.join("target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(root)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);
    // The outer build's flags are for the host, not for the guests.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        command.env_remove(var);
    }
    let status = command.status().expect("running cargo for the guests");
    assert!(
        status.success(),
        "building {} for {TARGET} failed (see the errors above)",
        root.display()
    );
    target_dir.join(TARGET).join("release")
}

/// A folder holding the PyPI `packages` (pinned `name==version`), installed with `python`'s
/// pip into `cache/pytools` on first use; put it on `sys.path` to import them. The error is
/// pip's own words.
pub fn pytools(cache: &Path, python: &str, packages: &[&str]) -> Result<PathBuf, String> {
    // One install at a time in this process (tests of one binary run side by side and would
    // share the staging folder below); other processes stage in their own.
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = INSTALLING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let name = packages.join("+").replace("==", "-");
    let target = cache.join("pytools").join(name);
    if target.join("READY").exists() {
        return Ok(target);
    }
    let staging = target.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let out = Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg("--target")
        .arg(&staging)
        .args(packages)
        .output()
        .map_err(|e| format!("running {python} -m pip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "pip install {packages:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::write(staging.join("READY"), "").map_err(|e| format!("marking the install: {e}"))?;
    // Another process may have won the race; its copy is as good as ours.
    if std::fs::rename(&staging, &target).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    Ok(target)
}

/// The cache `arl-manager` uses by default, which the tests share: `ARL_CACHE_DIR`, else
/// `arl` in the user's cache folder (`XDG_CACHE_HOME`, else `~/.cache`).
pub fn cache_dir() -> PathBuf {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("ARL_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("arl")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("arl")))
        .unwrap_or_else(|| std::env::temp_dir().join("arl-cache"))
}
