//! `arl-manager`: parse the flags, load the runtime, serve the session API.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use arl_manager::api;
use arl_manager::{Limits, ManagerConfig, Registry};
use clap::{Args, Parser, Subcommand};

/// ARL's in-pod session manager: stateful Python sandboxes in WebAssembly, over HTTP.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the session API (loads the Python runtime first; /readyz says when it is ready).
    Serve(Serve),
    /// Fetch, verify and precompile the Python runtime into the cache, then exit.
    Prepare(Common),
}

#[derive(Debug, Args)]
struct Common {
    /// Where the runtime package and compiled modules are kept [default: the user's cache
    /// folder, e.g. ~/.cache/arl].
    #[arg(long, env = "ARL_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Log filter (tracing-subscriber syntax).
    #[arg(long, env = "ARL_LOG", default_value = "info")]
    log: String,
}

#[derive(Debug, Args)]
struct Serve {
    #[command(flatten)]
    common: Common,
    /// Address to listen on.
    #[arg(long, env = "ARL_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Sessions open at once; one more create answers 429.
    #[arg(long, env = "ARL_MAX_SESSIONS", default_value_t = 1024)]
    max_sessions: u32,
    /// Default wall-clock deadline of one execution, in milliseconds.
    #[arg(long, env = "ARL_TIMEOUT_MS", default_value_t = 30_000)]
    timeout_ms: u64,
    /// The longest deadline a request may ask for, in milliseconds.
    #[arg(long, env = "ARL_MAX_TIMEOUT_MS", default_value_t = 3_600_000)]
    max_timeout_ms: u64,
    /// Default memory limit of a session, in MiB.
    #[arg(long, env = "ARL_MEMORY_MIB", default_value_t = 512)]
    memory_mib: u64,
    /// The most memory a request may ask for, in MiB (the size of a pooled memory slot).
    #[arg(long, env = "ARL_MAX_MEMORY_MIB", default_value_t = 4096)]
    max_memory_mib: u64,
    /// Bytes of stdout and of stderr kept per execution; the rest is cut and marked.
    #[arg(long, env = "ARL_OUTPUT_BYTES", default_value_t = 1 << 20)]
    output_bytes: usize,
    /// A session unused for this many seconds is ended.
    #[arg(long, env = "ARL_IDLE_TTL_SECS", default_value_t = 600)]
    idle_ttl_secs: u64,
    /// A session is ended this many seconds after it was created.
    #[arg(long, env = "ARL_LIFETIME_SECS", default_value_t = 3600)]
    lifetime_secs: u64,
    /// Largest request body, in bytes; larger ones answer 413.
    #[arg(long, env = "ARL_BODY_LIMIT_BYTES", default_value_t = api::DEFAULT_BODY_LIMIT)]
    body_limit_bytes: usize,
    /// Where session workspaces live [default: a private temporary folder].
    #[arg(long, env = "ARL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Seconds that running executions get to finish on SIGTERM or Ctrl-C.
    #[arg(long, env = "ARL_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    shutdown_grace_secs: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log = match &cli.command {
        Command::Serve(s) => &s.common.log,
        Command::Prepare(c) => &c.log,
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(log).context("--log")?)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(serve) => runtime.block_on(run(serve)),
        Command::Prepare(common) => {
            let config = ManagerConfig::new(cache_dir(common.cache_dir)?);
            let registry = runtime.block_on(async { Registry::new(config) })?;
            registry.load_python(&progress)?;
            eprintln!("arl-manager: the Python runtime is ready");
            Ok(())
        }
    }
}

fn cache_dir(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match flag {
        Some(dir) => Ok(dir),
        None => dirs::cache_dir()
            .map(|d| d.join("arl"))
            .context("no user cache folder is known here: pass --cache-dir or set ARL_CACHE_DIR"),
    }
}

fn progress(step: &str) {
    eprintln!("arl-manager: {step}");
}

fn config(serve: &Serve) -> anyhow::Result<ManagerConfig> {
    let mut config = ManagerConfig::new(cache_dir(serve.common.cache_dir.clone())?);
    config.max_sessions = serve.max_sessions;
    config.defaults = Limits {
        timeout: Duration::from_millis(serve.timeout_ms),
        memory_bytes: serve.memory_mib << 20,
        output_bytes: serve.output_bytes,
        idle_ttl: Duration::from_secs(serve.idle_ttl_secs),
        lifetime: Duration::from_secs(serve.lifetime_secs),
    };
    config.max_memory_bytes = serve.max_memory_mib << 20;
    config.max_timeout = Duration::from_millis(serve.max_timeout_ms);
    config.data_dir = serve.data_dir.clone();
    config.validate()?;
    Ok(config)
}

async fn run(serve: Serve) -> anyhow::Result<()> {
    let registry = Registry::new(config(&serve)?)?;
    let listener = tokio::net::TcpListener::bind(serve.listen)
        .await
        .with_context(|| format!("binding {}", serve.listen))?;
    tracing::info!(listen = %listener.local_addr()?, "arl-manager listening; loading the Python runtime");
    let loader = registry.clone();
    let load = tokio::task::spawn_blocking(move || loader.load_python(&progress));
    registry.spawn_reaper();
    let router = api::router(registry.clone(), serve.body_limit_bytes);
    let server = tokio::spawn(api::serve(listener, router, shutdown_signal()));
    match load.await? {
        Ok(()) => tracing::info!("the Python runtime is ready"),
        Err(e) => return Err(anyhow::Error::new(e).context("loading the Python runtime")),
    }
    server.await??;
    tracing::info!("stopping: ending every session");
    registry
        .shutdown(Duration::from_secs(serve.shutdown_grace_secs))
        .await;
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
