//! The processes the agent starts: each command in its own process group, its output streamed
//! and capped, its deadline killing the whole group; services left running until signalled or
//! reset. Only processes in [`Processes`]'s table may be signalled.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arl_proto::sidecar::ExecLog;
use rustix::io::Errno;
use rustix::process::{Pid, Signal};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

use crate::error::{ExecError, Kind, Result};

/// Output past the cap is dropped; a process group that writes this many times the cap is
/// flooding and is killed.
const FLOOD_FACTOR: usize = 64;
/// How long output may still arrive once a command's group is gone (a process that left the
/// group may hold the pipes).
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// The exit code of a command killed at its deadline, as `timeout(1)` reports it.
pub const TIMED_OUT: i32 = 124;

/// What bounds every command.
#[derive(Debug, Clone)]
pub struct Limits {
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    /// Bytes of stdout and stderr together kept per command.
    pub output_bytes: usize,
    /// `RLIMIT_NPROC` of every command: processes of the agent's user, a bound on fork bombs
    /// (the kernel does not apply it to root); 0 for none.
    pub max_processes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(300),
            max_timeout: Duration::from_secs(3600),
            output_bytes: 1 << 20,
            max_processes: 4096,
        }
    }
}

/// A command, checked.
#[derive(Debug)]
pub struct Command {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub timeout: Duration,
    pub background: bool,
}

/// The process groups the agent started and has not seen end (commands, services, shells),
/// by their leader's pid.
#[derive(Debug, Default)]
pub struct Processes {
    live: Mutex<HashSet<i32>>,
    pub limits: Limits,
}

impl Processes {
    pub fn new(limits: Limits) -> Self {
        Self {
            live: Mutex::default(),
            limits,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashSet<i32>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn track(&self, pid: i32) {
        self.table().insert(pid);
    }

    pub(crate) fn untrack(&self, pid: i32) {
        self.table().remove(&pid);
    }

    /// The deadline a request asks for (seconds, or milliseconds; 0 or none: the default).
    pub fn timeout(&self, seconds: i32, millis: u64) -> Result<Duration> {
        if seconds < 0 {
            return Err(ExecError::invalid(
                "invalid_timeout",
                format!("timeout_seconds is {seconds}; it must be 0 (the default) or more"),
            ));
        }
        if seconds > 0 && millis > 0 {
            return Err(ExecError::invalid(
                "invalid_timeout",
                "set timeout_seconds or timeout_ms, not both",
            ));
        }
        let asked = match (seconds, millis) {
            (0, 0) => return Ok(self.limits.default_timeout),
            (0, ms) => Duration::from_millis(ms),
            (s, _) => Duration::from_secs(s.unsigned_abs().into()),
        };
        if asked > self.limits.max_timeout {
            return Err(ExecError::invalid(
                "invalid_timeout",
                format!(
                    "the timeout is {} s; the most this agent allows is {} s",
                    asked.as_secs_f64(),
                    self.limits.max_timeout.as_secs()
                ),
            ));
        }
        Ok(asked)
    }

    /// Starts `command`; its log as it runs (the first message names the pid, the last is
    /// `done`). A service answers one message and keeps running.
    pub fn run(self: &Arc<Self>, command: Command) -> mpsc::Receiver<ExecLog> {
        let (tx, rx) = mpsc::channel(64);
        let mut child = tokio::process::Command::new(&command.argv[0]);
        child
            .args(&command.argv[1..])
            .envs(command.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&command.cwd)
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(false);
        limit_processes(&mut child, self.limits.max_processes);
        if command.background {
            // A service's output is the agent's own: the container's log.
            child.stdout(Stdio::inherit()).stderr(Stdio::inherit());
        } else {
            child.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let spawned = child.spawn();
        let this = self.clone();
        tokio::spawn(async move {
            match spawned {
                Err(e) => {
                    let _ = tx.send(not_started(&command.argv[0], &e)).await;
                }
                Ok(child) if command.background => this.serve(child, &command, tx).await,
                Ok(child) => this.follow(child, command.timeout, tx).await,
            }
        });
        rx
    }

    /// Leaves a service running, tracked until its group is empty.
    async fn serve(
        self: Arc<Self>,
        mut child: tokio::process::Child,
        command: &Command,
        tx: mpsc::Sender<ExecLog>,
    ) {
        let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
            return;
        };
        self.track(pid);
        tracing::info!(pid, argv = ?command.argv, "service started");
        let _ = tx
            .send(ExecLog {
                pid,
                done: true,
                ..ExecLog::default()
            })
            .await;
        drop(tx); // the caller's log ends here; the service runs on
        let status = child.wait().await;
        tracing::info!(pid, ?status, "service ended");
        if !group_alive(pid) {
            self.untrack(pid);
        }
    }

    /// Streams a command's output until it ends or its deadline passes; then kills what is
    /// left of its group.
    async fn follow(
        self: Arc<Self>,
        mut child: tokio::process::Child,
        timeout: Duration,
        tx: mpsc::Sender<ExecLog>,
    ) {
        let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
            return;
        };
        self.track(pid);
        let started = Instant::now();
        let _ = tx
            .send(ExecLog {
                pid,
                ..ExecLog::default()
            })
            .await;
        let output = Arc::new(Output::new(self.limits.output_bytes, pid));
        let pumps = [
            child
                .stdout
                .take()
                .map(|r| tokio::spawn(pump(r, true, tx.clone(), output.clone()))),
            child
                .stderr
                .take()
                .map(|r| tokio::spawn(pump(r, false, tx.clone(), output.clone()))),
        ];
        // The deadline, or a caller gone (nobody reads the log), ends the group.
        let ended = tokio::select! {
            status = tokio::time::timeout(timeout, child.wait()) => status.ok().map(|s| s.ok()),
            () = tx.closed() => Some(None),
        };
        let status = match ended {
            Some(Some(status)) => Some(status),
            gone_or_late => {
                let _ = rustix::process::kill_process_group(pid_of(pid), Signal::KILL);
                let status = child.wait().await.ok();
                if gone_or_late.is_some() { status } else { None }
            }
        };
        // What the command left in its group goes with it: services are run as such.
        kill_group(pid).await;
        for pump in pumps.into_iter().flatten() {
            let abort = pump.abort_handle();
            if tokio::time::timeout(DRAIN_GRACE, pump).await.is_err() {
                abort.abort();
            }
        }
        self.untrack(pid);
        let (timed_out, exit_code) = match status {
            None => (true, TIMED_OUT),
            Some(status) => (false, exit_code(status)),
        };
        tracing::debug!(
            pid,
            exit_code,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "command ended"
        );
        let _ = tx
            .send(ExecLog {
                exit_code,
                done: true,
                truncated: output.truncated(),
                timed_out,
                ..ExecLog::default()
            })
            .await;
    }

    /// Sends `signal` (a name) to the group of `pid`, which must be one the agent started.
    pub fn signal(&self, pid: i32, signal: &str) -> Result<String> {
        let sig = signal_named(signal)?;
        if !self.table().contains(&pid) {
            return Err(ExecError::new(
                Kind::NotFound,
                "process_not_found",
                format!("pid {pid} is not a process this agent started and still runs"),
            ));
        }
        match rustix::process::kill_process_group(pid_of(pid), sig) {
            Ok(()) => Ok(format!(
                "sent {} to process group {pid}",
                signal.to_uppercase()
            )),
            Err(Errno::SRCH) => {
                self.untrack(pid);
                Err(ExecError::new(
                    Kind::NotFound,
                    "process_not_found",
                    format!("process group {pid} has ended"),
                ))
            }
            Err(e) => Err(ExecError::internal("sending a signal", e)),
        }
    }

    /// Kills every group the agent started and waits until they are gone: how many there were.
    pub async fn kill_all(&self) -> usize {
        let all: Vec<i32> = self.table().drain().collect();
        for pid in &all {
            kill_group(*pid).await;
        }
        all.len()
    }
}

/// The message of a command that could not start: exit 127 (not found) or 126, as a shell says.
fn not_started(program: &str, e: &std::io::Error) -> ExecLog {
    let exit_code = match e.kind() {
        std::io::ErrorKind::NotFound => 127,
        _ => 126,
    };
    ExecLog {
        stderr: format!("arl-exec: {program}: {e}\n"),
        exit_code,
        done: true,
        ..ExecLog::default()
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

pub(crate) fn pid_of(pid: i32) -> Pid {
    Pid::from_raw(pid).unwrap_or(Pid::INIT)
}

/// Whether any process is left in group `pgid`.
pub(crate) fn group_alive(pgid: i32) -> bool {
    rustix::process::test_kill_process_group(pid_of(pgid)).is_ok()
}

/// Kills group `pgid` again and again until it is empty (a fork bomb forks between signals),
/// for at most a second.
pub(crate) async fn kill_group(pgid: i32) {
    for _ in 0..200 {
        match rustix::process::kill_process_group(pid_of(pgid), Signal::KILL) {
            Err(_) => return,
            Ok(()) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    tracing::warn!(
        pgid,
        "process group still has members after a second of SIGKILLs"
    );
}

/// The signal a request names: `SIGTERM` or `TERM`, any case.
pub fn signal_named(name: &str) -> Result<Signal> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    Ok(match bare {
        "TERM" => Signal::TERM,
        "KILL" => Signal::KILL,
        "INT" => Signal::INT,
        "HUP" => Signal::HUP,
        "QUIT" => Signal::QUIT,
        "USR1" => Signal::USR1,
        "USR2" => Signal::USR2,
        "STOP" => Signal::STOP,
        "CONT" => Signal::CONT,
        _ => {
            return Err(ExecError::invalid(
                "invalid_signal",
                format!(
                    "unknown signal `{name}`; one of SIGTERM, SIGKILL, SIGINT, SIGHUP, SIGQUIT, \
                     SIGUSR1, SIGUSR2, SIGSTOP, SIGCONT"
                ),
            ));
        }
    })
}

/// Bounds the processes a command may make, set in the child between fork and exec (0: no
/// bound, and the command is started with `posix_spawn`, not `fork`).
fn limit_processes(command: &mut tokio::process::Command, max: u64) {
    if max == 0 {
        return;
    }
    let limit = rustix::process::Rlimit {
        current: Some(max),
        maximum: Some(max),
    };
    #[allow(
        unsafe_code,
        reason = "pre_exec runs in the forked child before exec; setrlimit is async-signal-safe \
                  and allocates nothing"
    )]
    unsafe {
        command.pre_exec(move || {
            rustix::process::setrlimit(rustix::process::Resource::Nproc, limit)
                .map_err(std::io::Error::from)
        });
    }
}

/// A command's output budget, shared by its two streams.
struct Output {
    pgid: i32,
    cap: usize,
    seen: Mutex<usize>,
}

impl Output {
    fn new(cap: usize, pgid: i32) -> Self {
        Self {
            pgid,
            cap,
            seen: Mutex::new(0),
        }
    }

    /// How much of `n` new bytes to keep; kills the group once it floods.
    fn admit(&self, n: usize) -> usize {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let keep = self.cap.saturating_sub(*seen).min(n);
        *seen = seen.saturating_add(n);
        if *seen > self.cap.saturating_mul(FLOOD_FACTOR) {
            let _ = rustix::process::kill_process_group(pid_of(self.pgid), Signal::KILL);
        }
        keep
    }

    fn truncated(&self) -> bool {
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) > self.cap
    }
}

/// Reads one of a command's streams to its end, sending what the budget keeps as text (a
/// UTF-8 character split between reads waits for its other half).
async fn pump(
    mut from: impl AsyncRead + Unpin,
    stdout: bool,
    tx: mpsc::Sender<ExecLog>,
    output: Arc<Output>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let keep = output.admit(n);
        if keep == 0 {
            continue;
        }
        pending.extend_from_slice(&buf[..keep]);
        let text = take_text(&mut pending, keep < n);
        if text.is_empty() {
            continue;
        }
        if tx.send(chunk(stdout, text)).await.is_err() {
            break; // the caller went away; the deadline still ends the command
        }
    }
    if !pending.is_empty() {
        let text = String::from_utf8_lossy(&pending).into_owned();
        let _ = tx.send(chunk(stdout, text)).await;
    }
}

/// A log message carrying `text` of stdout (or stderr).
fn chunk(stdout: bool, text: String) -> ExecLog {
    if stdout {
        ExecLog {
            stdout: text,
            ..ExecLog::default()
        }
    } else {
        ExecLog {
            stderr: text,
            ..ExecLog::default()
        }
    }
}

/// The complete UTF-8 text at the front of `bytes` (all of it, lossily, when `all`), leaving
/// an incomplete last character behind.
fn take_text(bytes: &mut Vec<u8>, all: bool) -> String {
    let cut = match std::str::from_utf8(bytes) {
        Ok(_) => bytes.len(),
        Err(e) if e.error_len().is_none() && !all => e.valid_up_to(),
        Err(_) => bytes.len(),
    };
    let rest = bytes.split_off(cut);
    let text = String::from_utf8_lossy(bytes).into_owned();
    *bytes = rest;
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn a_character_split_between_reads_is_kept_whole() {
        let mut pending = "é".as_bytes()[..1].to_vec();
        assert_eq!(take_text(&mut pending, false), "");
        pending.extend_from_slice(&"é".as_bytes()[1..]);
        assert_eq!(take_text(&mut pending, false), "é");
        assert!(pending.is_empty());
    }

    #[test]
    fn signals_are_named_with_or_without_sig() {
        assert!(signal_named("SIGTERM").is_ok());
        assert!(signal_named("kill").is_ok());
        assert_eq!(signal_named("SIGNOPE").unwrap_err().code, "invalid_signal");
        assert_eq!(signal_named("9").unwrap_err().code, "invalid_signal");
    }

    #[test]
    fn timeouts_are_checked() {
        let p = Processes::new(Limits::default());
        assert_eq!(p.timeout(0, 0).unwrap(), Duration::from_secs(300));
        assert_eq!(p.timeout(2, 0).unwrap(), Duration::from_secs(2));
        assert_eq!(p.timeout(0, 250).unwrap(), Duration::from_millis(250));
        for (s, ms) in [(-1, 0), (1, 1), (7200, 0)] {
            assert_eq!(p.timeout(s, ms).unwrap_err().code, "invalid_timeout");
        }
    }
}
