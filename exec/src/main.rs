//! `arl-exec`: the executor agent of a container runtime. See the library's docs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
    #[arg(long, env = "ARL_EXEC_WORKSPACE", default_value = "/workspace")]
    workspace: PathBuf,
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
    /// RLIMIT_NPROC of every command (the user's processes; not applied to root).
    #[arg(long, env = "ARL_EXEC_MAX_PROCESSES", default_value_t = 4096)]
    max_processes: u64,
    /// The interactive shell [default: /bin/bash if present, else /bin/sh].
    #[arg(long, env = "ARL_EXEC_SHELL")]
    shell: Option<String>,
    /// Log filter (tracing-subscriber syntax).
    #[arg(long, env = "ARL_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .init();
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
    let agent = Arc::new(LocalAgent::new(&cli.workspace, limits, shell)?);
    tracing::info!(listen = %cli.listen, workspace = %agent.workspace().root().display(), "arl-exec serving");
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
    Ok(())
}
