//! Burns time: `spin` loops forever, `sleep MS` blocks in `poll_oneoff`, `ping` answers `pong`.
use arl_guest_abi::{Reply, guest};

fn handle(input: &str) -> Reply {
    let mut words = input.split_whitespace();
    match words.next() {
        Some("spin") => {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        Some("sleep") => {
            let ms = words.next().and_then(|w| w.parse().ok()).unwrap_or(1000);
            std::thread::sleep(std::time::Duration::from_millis(ms));
            Reply::Result("slept".into())
        }
        _ => Reply::Result("pong".into()),
    }
}

guest!(handle);
