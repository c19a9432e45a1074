#![allow(
    clippy::expect_used,
    reason = "a build script reports failure by panicking"
)]
//! Builds ARL's JavaScript runtime (`javascript/`, the Boa engine as a turn-contract reactor)
//! for wasm32-wasip1 and puts it in `OUT_DIR`, where `javascript.rs` includes it: the manager
//! carries the runtime in its binary and pre-initialises it into its cache on first start.

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"))
        .join("javascript");
    for watched in ["Cargo.toml", "Cargo.lock", "src"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let built = arl_build_support::build_guests(&root);
    let wasm = built.join("arl_javascript.wasm");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("javascript.wasm");
    std::fs::copy(&wasm, &out).expect("copying the JavaScript runtime into OUT_DIR");
}
