//! An interactive shell on a pseudo-terminal: the shell leads its own session with the
//! terminal as its controlling one, so job control, Ctrl-C and window sizes work as in a
//! terminal. Keystrokes go to the terminal's master side; what it prints comes back.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use arl_proto::sidecar::{ShellInput, ShellOutput};
use futures_util::{Stream, StreamExt};
use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::error::{ExecError, Result};
use crate::process::{Processes, kill_group, pid_of, signal_named};

/// Starts `shell` in `cwd` on a new terminal of 24 rows by 80 columns and connects it to
/// `input`; the terminal's output, ending with a `closed` message and the exit code.
pub fn open(
    shell: &str,
    cwd: &Path,
    processes: Arc<Processes>,
    mut input: impl Stream<Item = ShellInput> + Send + Unpin + 'static,
) -> Result<mpsc::Receiver<ShellOutput>> {
    let (master, slave) = terminal().map_err(|e| ExecError::internal("opening a terminal", e))?;
    resize(&master, 24, 80);
    let slave = File::from(slave);
    let stdio = |f: &File| f.try_clone().map(Stdio::from);
    let (stdin, stdout, stderr) =
        (|| Ok::<_, std::io::Error>((stdio(&slave)?, stdio(&slave)?, stdio(&slave)?)))()
            .map_err(|e| ExecError::internal("opening a terminal", e))?;
    let mut command = tokio::process::Command::new(shell);
    command
        .current_dir(cwd)
        .env("TERM", "xterm-256color")
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(false);
    lead_session(&mut command);
    let mut child = command
        .spawn()
        .map_err(|e| ExecError::invalid("invalid_command", format!("starting `{shell}`: {e}")))?;
    drop(slave);
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| ExecError::internal("starting a shell", "no pid"))?;
    processes.track(pid);
    let master = File::from(master);
    let reader = master
        .try_clone()
        .map_err(|e| ExecError::internal("opening a terminal", e))?;
    let control: OwnedFd = master
        .try_clone()
        .map_err(|e| ExecError::internal("opening a terminal", e))?
        .into();
    let mut writer = tokio::fs::File::from_std(master);
    let (tx, rx) = mpsc::channel(64);
    // Keystrokes, sizes and signals in; the end of input hangs the shell up.
    tokio::spawn(async move {
        while let Some(message) = input.next().await {
            if !message.data.is_empty() && writer.write_all(&message.data).await.is_err() {
                break;
            }
            let _ = writer.flush().await;
            if message.resize {
                resize(&control, message.rows, message.cols);
            }
            if !message.signal.is_empty()
                && let Ok(signal) = signal_named(&message.signal)
            {
                let group = rustix::termios::tcgetpgrp(&control).unwrap_or(pid_of(pid));
                let _ = rustix::process::kill_process_group(group, signal);
            }
        }
        kill_group(pid).await;
    });
    // The terminal's output out, then how the shell ended.
    tokio::spawn(async move {
        let mut reader = tokio::fs::File::from_std(reader);
        let mut buf = vec![0u8; 8192];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break, // EIO: every holder of the terminal's other side is gone
                Ok(n) => {
                    let data = buf[..n].to_vec();
                    if tx
                        .send(ShellOutput {
                            data,
                            ..ShellOutput::default()
                        })
                        .await
                        .is_err()
                    {
                        kill_group(pid).await;
                        break;
                    }
                }
            }
        }
        let exit_code = match child.wait().await {
            Ok(status) => status.code().unwrap_or(-1),
            Err(_) => -1,
        };
        kill_group(pid).await;
        processes.untrack(pid);
        let _ = tx
            .send(ShellOutput {
                exit_code,
                closed: true,
                ..ShellOutput::default()
            })
            .await;
    });
    Ok(rx)
}

/// A new pseudo-terminal: its master and slave sides.
fn terminal() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let path = std::ffi::OsStr::from_bytes(name.as_bytes());
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
        .open(path)?;
    Ok((master, slave.into()))
}

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;

fn resize(terminal: &impl AsFd, rows: u32, cols: u32) {
    let size = Winsize {
        ws_row: u16::try_from(rows).unwrap_or(u16::MAX).max(1),
        ws_col: u16::try_from(cols).unwrap_or(u16::MAX).max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let _ = rustix::termios::tcsetwinsize(terminal, size);
}

/// Makes the child the leader of a new session whose controlling terminal is its stdin.
fn lead_session(command: &mut tokio::process::Command) {
    #[allow(
        unsafe_code,
        reason = "pre_exec runs in the forked child before exec; setsid and the TIOCSCTTY ioctl \
                  are async-signal-safe and allocate nothing"
    )]
    unsafe {
        command.pre_exec(|| {
            rustix::process::setsid()?;
            let stdin = BorrowedFd::borrow_raw(0);
            rustix::process::ioctl_tiocsctty(stdin)?;
            Ok(())
        });
    }
}
