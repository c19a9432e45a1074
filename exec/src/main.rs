//! `arl-exec`: the executor agent of a container runtime. See the library's docs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arl_exec::process::Limits;
use arl_exec::{Address, LocalAgent};
use clap::Parser;

/// ARL's executor agent: runs commands, patches files, signals and resets inside a container
/// runtime, serving arl.sidecar.AgentService (gRPC) and /files, /execute, /signal, /reset,
/// /health (HTTP) on one listener.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Where to listen: unix:/path/to/socket (the pod's shared volume) or host:port.
    #[arg(long, env = "ARL_EXEC_LISTEN", default_value = "127.0.0.1:7070")]
    listen: Address,
    /// The folder commands run in and the only one file operations touch.
    /// [default: /workspace]. With --install, made (if named) so that it belongs to the
    /// installing user before a volume's subPath mounts it.
    #[arg(long, env = "ARL_EXEC_WORKSPACE")]
    workspace: Option<PathBuf>,
    /// Deadline of a command that asks for none, in seconds.
    #[arg(long, env = "ARL_EXEC_TIMEOUT_SECS", default_value_t = 300)]
    timeout_secs: u64,
    /// The longest deadline a command may ask for, in seconds.
    #[arg(long, env = "ARL_EXEC_MAX_TIMEOUT_SECS", default_value_t = 3600)]
    max_timeout_secs: u64,
    /// Bytes of output (stdout and stderr together) kept per command; past 64 times this the
    /// command's process group is killed.
    #[arg(long, env = "ARL_EXEC_OUTPUT_BYTES", default_value_t = 1 << 20)]
    output_bytes: usize,
    /// RLIMIT_NPROC of every command (the user's processes; not applied to root); 0: none.
    #[arg(long, env = "ARL_EXEC_MAX_PROCESSES", default_value_t = 4096)]
    max_processes: u64,
    /// The interactive shell [default: /bin/bash if present, else /bin/sh].
    #[arg(long, env = "ARL_EXEC_SHELL")]
    shell: Option<String>,
    /// Log filter (tracing-subscriber syntax).
    #[arg(long, env = "ARL_LOG", default_value = "info")]
    log: String,
    /// Copy this binary into DIR (made if needed) and exit: how a pod's init container puts
    /// the agent into a runtime image that lacks it.
    #[arg(long, value_name = "DIR")]
    install: Option<PathBuf>,
    /// A service to start with the agent and keep running across sessions and resets (a
    /// server the commands talk to): `arl-exec [OPTIONS] -- node server.js`. Its output is
    /// the agent's.
    #[arg(last = true, value_name = "SERVICE")]
    service: Vec<String>,
}

/// Set in the agent that an init `arl-exec` (PID 1) started.
const UNDER_INIT: &str = "ARL_EXEC_UNDER_INIT";

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // As a container's entrypoint the agent is PID 1, which orphans are reparented to: it
    // then stays init (reaping every orphan, forwarding SIGTERM and SIGINT) and runs the agent
    // as its child, as tini would.
    if rustix::process::getpid().is_init()
        && std::env::var_os(UNDER_INIT).is_none()
        && cli.install.is_none()
    {
        let code = runtime.block_on(init())?;
        std::process::exit(code);
    }
    runtime.block_on(agent(cli))
}

/// PID 1: runs this binary again as the agent, reaps every process that ends here, passes
/// stop signals on, and exits as the agent did.
async fn init() -> anyhow::Result<i32> {
    use tokio::signal::unix::{SignalKind, signal};
    let me = std::env::current_exe().context("finding this binary")?;
    let child = std::process::Command::new(me)
        .args(std::env::args_os().skip(1))
        .env(UNDER_INIT, "1")
        .spawn()
        .context("starting the agent")?;
    let agent = rustix::process::Pid::from_child(&child);
    let reaper = tokio::task::spawn_blocking(move || {
        loop {
            match rustix::process::wait(rustix::process::WaitOptions::empty()) {
                Ok(Some((pid, status))) if pid == agent => {
                    return status
                        .exit_status()
                        .unwrap_or(128 + status.terminating_signal().unwrap_or(0));
                }
                Ok(_) => {} // an orphan, reaped
                Err(_) => return 1,
            }
        }
    });
    let (mut term, mut int) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
    );
    tokio::pin!(reaper);
    loop {
        let forward = tokio::select! {
            code = &mut reaper => return Ok(code.unwrap_or(1)),
            _ = term.recv() => rustix::process::Signal::TERM,
            _ = int.recv() => rustix::process::Signal::INT,
        };
        let _ = rustix::process::kill_process(agent, forward);
    }
}

async fn agent(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .init();
    if let Some(dir) = &cli.install {
        if let Some(workspace) = &cli.workspace {
            std::fs::create_dir_all(workspace)
                .with_context(|| format!("creating {}", workspace.display()))?;
        }
        return install(dir);
    }
    let shell = cli.shell.unwrap_or_else(|| {
        let bash = "/bin/bash";
        if std::path::Path::new(bash).exists() {
            bash
        } else {
            "/bin/sh"
        }
        .to_owned()
    });
    let limits = Limits {
        default_timeout: Duration::from_secs(cli.timeout_secs),
        max_timeout: Duration::from_secs(cli.max_timeout_secs),
        output_bytes: cli.output_bytes,
        max_processes: cli.max_processes,
    };
    let workspace = cli.workspace.unwrap_or_else(|| PathBuf::from("/workspace"));
    let agent = Arc::new(LocalAgent::new(&workspace, limits, shell)?);
    tracing::info!(listen = %cli.listen, workspace = %agent.workspace().root().display(), "arl-exec serving");
    let mut service = match cli.service.split_first() {
        None => None,
        Some((program, args)) => {
            let child = tokio::process::Command::new(program)
                .args(args)
                .current_dir(agent.workspace().root())
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting the service {:?}", cli.service))?;
            tracing::info!(argv = ?cli.service, pid = child.id(), "service started");
            Some(child)
        }
    };
    let stop = {
        let agent = agent.clone();
        async move {
            arl_serve::stop_signal().await;
            let killed = agent.processes().kill_all().await;
            tracing::info!(killed, "stopping");
        }
    };
    let listener = arl_exec::Listener::bind(&cli.listen).await?;
    arl_exec::serve(agent, listener, stop).await?;
    if let Some(service) = service.as_mut() {
        let _ = service.kill().await;
    }
    Ok(())
}

/// Copies the running binary to `dir/arl-exec`, executable by anyone.
fn install(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let me = std::env::current_exe().context("finding this binary")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let to = dir.join("arl-exec");
    let partial = dir.join(".arl-exec.partial");
    std::fs::copy(&me, &partial).with_context(|| format!("copying to {}", partial.display()))?;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&partial, &to).with_context(|| format!("moving into {}", to.display()))?;
    println!("installed {}", to.display());
    Ok(())
}
