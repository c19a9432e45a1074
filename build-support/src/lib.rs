//! What the workspace's build scripts share: they build WebAssembly guests (the test guests of
//! `wasm-guests/`, the JavaScript runtime of `runtimes/javascript/`) with a nested cargo, for
//! `wasm32-wasip1`, and a fresh rustup install lacks that target's standard library.
//!
//! Build scripts report failure by panicking, so these functions do too, with what to do.
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
