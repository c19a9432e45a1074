#![allow(
    clippy::expect_used,
    reason = "a build script reports failure by panicking"
)]
//! Builds the guests of `wasm-guests/` for wasm32-wasip1 and emits one constant per guest plus
//! `foreach_guest!`, so a guest without a test fails to compile (as wasmtime's test-programs do).
//!
//! A fresh rustup install lacks the wasm32-wasip1 standard library; it is added here, once,
//! with `rustup target add` for the toolchain cargo runs under, so that `cargo test
//! --workspace` needs no other command first.

use std::path::PathBuf;
use std::process::Command;

const GUESTS: &[&str] = &["counter", "spinner", "hog", "prober"];
const TARGET: &str = "wasm32-wasip1";

/// Adds the guests' target to the toolchain when its standard library is missing.
fn ensure_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if sysroot.is_some_and(|root| root.join("lib/rustlib").join(TARGET).exists()) {
        return;
    }
    let mut rustup = Command::new("rustup");
    rustup.args(["target", "add", TARGET]);
    if let Ok(toolchain) = std::env::var("RUSTUP_TOOLCHAIN") {
        rustup.args(["--toolchain", &toolchain]);
    }
    println!("cargo:warning=adding the {TARGET} target with rustup, for wasm-guests/");
    let added = rustup.status().is_ok_and(|s| s.success());
    assert!(
        added,
        "the guests need the {TARGET} target and `rustup target add {TARGET}` failed: \
         install it for the toolchain that builds this workspace"
    );
}

fn main() {
    ensure_target();
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"))
        .join("../wasm-guests");
    println!("cargo:rerun-if-changed={}", root.display());
    let target_dir = root.join("target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&root)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
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
    let status = command.status().expect("running cargo for wasm-guests");
    assert!(
        status.success(),
        "building wasm-guests for {TARGET} failed (see the errors above)"
    );
    let mut out = String::new();
    for guest in GUESTS {
        let wasm = target_dir.join(format!("wasm32-wasip1/release/{guest}.wasm"));
        assert!(wasm.exists(), "{} was not built", wasm.display());
        out.push_str(&format!(
            "/// The `{guest}` guest.\npub const {}: &str = {:?};\n",
            guest.to_uppercase(),
            wasm.display().to_string()
        ));
    }
    out.push_str("/// Calls `$m!(name)` for every guest.\n#[macro_export]\nmacro_rules! foreach_guest {\n    ($m:ident) => {\n");
    for guest in GUESTS {
        out.push_str(&format!("        $m!({guest});\n"));
    }
    out.push_str("    };\n}\n");
    let dest = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("guests.rs");
    std::fs::write(dest, out).expect("writing guests.rs");
}
