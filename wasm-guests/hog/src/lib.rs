//! Holds memory: `grow MIB` allocates and touches that much more (a failure is reported as a
//! MemoryError and the guest lives on), `held` answers the MiB held, `free` drops it all.
use arl_guest_abi::{Reply, guest};
use std::sync::Mutex;

static HELD: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn handle(input: &str) -> Reply {
    let mut words = input.split_whitespace();
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    match words.next() {
        Some("grow") => {
            let mib: usize = words.next().and_then(|w| w.parse().ok()).unwrap_or(1);
            let mut block = Vec::new();
            if block.try_reserve_exact(mib << 20).is_err() {
                return Reply::Error {
                    kind: "MemoryError".into(),
                    message: format!("could not allocate {mib} MiB"),
                };
            }
            block.resize(mib << 20, 1u8);
            held.push(block);
            Reply::Result(format!("{}", held.iter().map(Vec::len).sum::<usize>() >> 20))
        }
        Some("free") => {
            held.clear();
            held.shrink_to_fit();
            Reply::Result("0".into())
        }
        _ => Reply::Result(format!("{}", held.iter().map(Vec::len).sum::<usize>() >> 20)),
    }
}

guest!(handle);
