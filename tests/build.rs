#![allow(
    clippy::expect_used,
    reason = "a build script reports failure by panicking"
)]
//! Builds the guests of `wasm-guests/` for wasm32-wasip1 and emits one constant per guest plus
//! `foreach_guest!`, so a guest without a test fails to compile (as wasmtime's test-programs do).
//!
//! A fresh rustup install lacks the wasm32-wasip1 standard library: `arl-build-support` adds
//! it, once, so that `cargo test --workspace` needs no other command first.

use std::path::PathBuf;

const GUESTS: &[&str] = &["counter", "spinner", "hog", "prober"];

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"))
        .join("../wasm-guests");
    println!("cargo:rerun-if-changed={}", root.display());
    let built = arl_build_support::build_guests(&root);
    let mut out = String::new();
    for guest in GUESTS {
        let wasm = built.join(format!("{guest}.wasm"));
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
