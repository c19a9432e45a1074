//! Probes what the sandbox lets it reach: `read PATH`, `list PATH`, `write PATH TEXT`, `env`,
//! `stdin`. Each answers what it found or the OS error it got.
use arl_guest_abi::{Reply, guest};
use std::io::Read;

fn fail(e: std::io::Error) -> Reply {
    Reply::Error {
        kind: "OSError".into(),
        message: e.to_string(),
    }
}

fn handle(input: &str) -> Reply {
    let (command, rest) = input.split_once(' ').unwrap_or((input, ""));
    match command {
        "read" => std::fs::read_to_string(rest).map_or_else(fail, Reply::Result),
        "list" => match std::fs::read_dir(rest) {
            Ok(entries) => {
                let mut names: Vec<_> = entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                Reply::Result(names.join(","))
            }
            Err(e) => fail(e),
        },
        "write" => {
            let (path, text) = rest.split_once(' ').unwrap_or((rest, ""));
            std::fs::write(path, text).map_or_else(fail, |()| Reply::Result("written".into()))
        }
        "env" => {
            let mut vars: Vec<_> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
            vars.sort();
            Reply::Result(vars.join("\n"))
        }
        "stdin" => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map_or_else(fail, |n| Reply::Result(format!("{n}:{s}")))
        }
        other => Reply::Error {
            kind: "UnknownCommand".into(),
            message: other.into(),
        },
    }
}

guest!(handle);
