//! A stateful reactor: `inc` adds one and prints the count, `get` answers it, `exit N` exits,
//! `trap` hits `unreachable`, `fail` reports an error. State lives across turns.
use arl_guest_abi::{Reply, guest};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNT: AtomicU64 = AtomicU64::new(0);

fn handle(input: &str) -> Reply {
    let mut words = input.split_whitespace();
    match words.next() {
        Some("inc") => {
            let n = COUNT.fetch_add(1, Ordering::Relaxed) + 1;
            println!("count={n}");
            Reply::Result(n.to_string())
        }
        Some("get") => Reply::Result(COUNT.load(Ordering::Relaxed).to_string()),
        Some("exit") => std::process::exit(words.next().and_then(|w| w.parse().ok()).unwrap_or(0)),
        Some("trap") => core::arch::wasm32::unreachable(),
        Some("fail") => Reply::Error {
            kind: "ValueError".into(),
            message: "asked to fail".into(),
        },
        Some("print") => {
            let n: usize = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            print!("{}", "x".repeat(n));
            eprint!("{}", "e".repeat(n));
            Reply::Nothing
        }
        _ => Reply::Error {
            kind: "UnknownCommand".into(),
            message: format!("{input:?}"),
        },
    }
}

guest!(handle);
