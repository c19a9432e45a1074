//! `arl-manager`: parse the flags, load the runtime, serve the session API.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use arl_manager::server::{self, Listeners};
use arl_manager::{Limits, ManagerConfig, Registry, ServeOptions, api};
use clap::{Args, Parser, Subcommand};

/// ARL's in-pod session manager: stateful Python and JavaScript sandboxes in WebAssembly, over
/// HTTP and gRPC (or, with --agent, the front of a container runtime's arl-exec).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the session API (loads the runtimes first; /readyz says when they are ready).
    Serve(Box<Serve>),
    /// Fetch, verify, snapshot and precompile the runtimes into the cache, then exit.
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
    /// The runtimes to serve, comma-separated: python (CPython 3.15 with numpy and pandas),
    /// javascript (ARL's Boa engine; TypeScript too).
    #[arg(long, env = "ARL_RUNTIMES", value_delimiter = ',', default_value = "python,javascript",
          value_parser = clap::builder::PossibleValuesParser::new(arl_manager::registry::runtimes::RUNTIMES))]
    runtimes: Vec<String>,
}

#[derive(Debug, Args)]
struct Serve {
    #[command(flatten)]
    common: Common,
    /// Address of the HTTP API.
    #[arg(long, env = "ARL_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Address of the gRPC API (arl.v1.Sessions and grpc.health.v1.Health).
    #[arg(long, env = "ARL_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    grpc_listen: SocketAddr,
    /// Bearer token every route but /healthz and /readyz (and gRPC health) requires. Prefer
    /// the environment variable: flags show in `ps`.
    #[arg(long, env = "ARL_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Listen on a non-loopback address without --auth-token: anyone who reaches the port can
    /// run code. Only behind something else that authenticates.
    #[arg(long, env = "ARL_INSECURE")]
    insecure: bool,
    /// Sessions open at once; one more create answers 429.
    #[arg(long, env = "ARL_MAX_SESSIONS", default_value_t = 1024)]
    max_sessions: u32,
    /// Python sessions kept started ahead (bootstrapped, one empty turn run), so that a
    /// create asking for the defaults gets one at once; they give way when the manager is full.
    #[arg(long, env = "ARL_WARM_SESSIONS", default_value_t = 4)]
    warm_sessions: u32,
    /// Below this much free memory (the machine's MemAvailable, or what the cgroup's limit
    /// leaves), idle sessions are ended, longest idle first, with the reason `evicted`; 0: never.
    #[arg(long, env = "ARL_MIN_FREE_MIB", default_value_t = 256)]
    min_free_mib: u64,
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
    /// MiB a session's files (`/workspace` and `/tmp`, uploaded or written by its code) may
    /// hold; past it, uploads answer 413 and a turn is stopped and rolled back.
    #[arg(long, env = "ARL_WORKSPACE_MIB", default_value_t = 100)]
    workspace_mib: u64,
    /// Largest JSON request body and gRPC message, in bytes; larger ones answer 413 (file
    /// uploads are bounded by the workspace quota instead).
    #[arg(long, env = "ARL_BODY_LIMIT_BYTES", default_value_t = api::DEFAULT_BODY_LIMIT)]
    body_limit_bytes: usize,
    /// Where session workspaces live [default: a private temporary folder].
    #[arg(long, env = "ARL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Where snapshots, suspended sessions and checkpoints are stored: a folder, or
    /// `s3://bucket[/prefix]` with credentials, region and endpoint from the `AWS_*`
    /// environment. Managers given the same store resume each other's sessions [default:
    /// `session-snapshots` in the cache folder]
    #[arg(long, alias = "snapshot-dir", env = "ARL_STORE")]
    store: Option<String>,
    /// Seconds a session may sit unused before it is suspended to the store (its memory
    /// freed; its next request resumes it under the same id); 0: never. A create may ask
    /// for its own (`suspend_after_secs`).
    #[arg(long, env = "ARL_SUSPEND_AFTER_SECS", default_value_t = 60)]
    suspend_after_secs: u64,
    /// Seconds a suspended session is kept unused before it is ended (reason `idle`).
    #[arg(long, env = "ARL_SUSPENDED_TTL_SECS", default_value_t = 7 * 24 * 3600)]
    suspended_ttl_secs: u64,
    /// Seconds between checkpoints of live sessions that ran a turn since their last one, so
    /// that a manager restarted on the same store brings them back; 0: never.
    #[arg(long, env = "ARL_CHECKPOINT_EVERY_SECS", default_value_t = 30)]
    checkpoint_every_secs: u64,
    /// Let a failed turn (deadline, trap, cancel, memory blow-up) end its session instead of
    /// being rolled back; a create may still ask for either with `rollback`.
    #[arg(long, env = "ARL_NO_ROLLBACK")]
    no_rollback: bool,
    /// Seconds that running executions get to finish on SIGTERM or Ctrl-C before every
    /// session is ended.
    #[arg(long, env = "ARL_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    shutdown_grace_secs: u64,
    /// Put before every session id (`<prefix>.<hex>`) so that a gateway routes by id alone;
    /// pods of a WarmPool get their own name here.
    #[arg(long, env = "ARL_ID_PREFIX", default_value = "")]
    id_prefix: String,
    /// Hosts sessions' guests may reach over brokered HTTP(S), comma-separated
    /// (`api.github.com,*.pypi.org,10.0.0.5:8080`): what a session gets when its create names
    /// no `network`, and the most one may name; `none`: no network for any session [default:
    /// no network by default, and no bound on what a create names]
    #[arg(long, env = "ARL_NETWORK_ALLOW")]
    network_allow: Option<String>,
    /// Body bytes a session's brokered requests may move in all (a create may ask for less)
    #[arg(long, env = "ARL_NETWORK_MAX_BYTES", default_value_t = 64 << 20)]
    network_max_bytes: u64,
    /// Requests (HTTP, tool calls) a session may make in all (a create may ask for fewer)
    #[arg(long, env = "ARL_NETWORK_MAX_REQUESTS", default_value_t = 1000)]
    network_max_requests: u64,
    /// A folder of wheels that `pip install` in any session takes from, whatever its network
    #[arg(long, env = "ARL_WHEELHOUSE")]
    wheelhouse: Option<PathBuf>,
    /// The package index (PEP 691 JSON, as PyPI's `/simple/`) that `pip install` searches for
    /// sessions whose network allows its host; `none` for none
    #[arg(long, env = "ARL_PIP_INDEX", default_value = arl_manager::config::DEFAULT_PIP_INDEX)]
    pip_index: String,
    /// Front the `arl-exec` agent of a container runtime at this address (unix:/path or
    /// host:port) instead of running WebAssembly sessions: the pod is one sandbox, claimed by
    /// a create and reset by its delete; no runtime is loaded.
    #[arg(long, env = "ARL_AGENT")]
    agent: Option<arl_exec::Address>,
    /// With --agent: the workspace folder shared with the runtime container.
    #[arg(long, env = "ARL_WORKSPACE", default_value = "/workspace")]
    workspace: PathBuf,
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
        Command::Serve(serve) => runtime.block_on(run(*serve)),
        Command::Prepare(common) => {
            let config = ManagerConfig::new(cache_dir(common.cache_dir)?);
            let registry = runtime.block_on(async { Registry::new(config) })?;
            for name in &common.runtimes {
                registry.load_named(name, &progress)?;
                eprintln!("arl-manager: the {name} runtime is ready");
            }
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
    config.warm_sessions = serve.warm_sessions;
    config.min_free_bytes = serve.min_free_mib << 20;
    config.id_prefix = serve.id_prefix.clone();
    config.defaults = Limits {
        timeout: Duration::from_millis(serve.timeout_ms),
        memory_bytes: serve.memory_mib << 20,
        output_bytes: serve.output_bytes,
        idle_ttl: Duration::from_secs(serve.idle_ttl_secs),
        lifetime: Duration::from_secs(serve.lifetime_secs),
        workspace_bytes: serve.workspace_mib << 20,
        rollback: !serve.no_rollback,
    };
    config.max_memory_bytes = serve.max_memory_mib << 20;
    config.max_timeout = Duration::from_millis(serve.max_timeout_ms);
    config.data_dir = serve.data_dir.clone();
    config.store = serve.store.clone();
    config.suspend_after = Duration::from_secs(serve.suspend_after_secs);
    config.suspended_ttl = Duration::from_secs(serve.suspended_ttl_secs);
    config.checkpoint_every = Duration::from_secs(serve.checkpoint_every_secs);
    config.network = arl_manager::egress::NetworkLimits {
        ceiling: match &serve.network_allow {
            Some(list) => Some(arl_manager::egress::NetworkLimits::parse_ceiling(list)?),
            None => None,
        },
        max_bytes: serve.network_max_bytes,
        max_requests: serve.network_max_requests,
    };
    config.wheelhouse = serve.wheelhouse.clone();
    config.pip_index = match serve.pip_index.as_str() {
        "" | "none" => None,
        url => Some(url::Url::parse(url).with_context(|| format!("--pip-index {url:?}"))?),
    };
    config.validate()?;
    Ok(config)
}

/// Refuses to expose the API beyond this machine without a token, unless told to.
fn check_exposure(serve: &Serve) -> anyhow::Result<()> {
    if serve.auth_token.is_some() || serve.insecure {
        return Ok(());
    }
    for addr in [serve.listen, serve.grpc_listen] {
        if !addr.ip().is_loopback() {
            anyhow::bail!(
                "refusing to listen on {addr} without --auth-token (ARL_AUTH_TOKEN): anyone who \
                 can reach that address could run code here. Set a token, listen on 127.0.0.1, \
                 or pass --insecure if something in front of the manager authenticates"
            );
        }
    }
    Ok(())
}

/// Descriptors a session holds at rest: its WASI preopens (four for Python).
const FDS_PER_SESSION: u64 = 4;
/// Descriptors kept for everything else: sockets, the module cache, uploads, snapshots.
const FDS_RESERVED: u64 = 1024;

/// The most sessions a process with `open_files` descriptors can hold (at least one).
fn sessions_within(open_files: u64) -> u32 {
    let fit = open_files.saturating_sub(FDS_RESERVED) / FDS_PER_SESSION;
    u32::try_from(fit).unwrap_or(u32::MAX).max(1)
}

/// Raises the open-files limit as far as this process may, and answers the limit it got:
/// each session holds its WASI preopens, so thousands of sessions need tens of thousands.
fn raise_open_files(max_sessions: u32) -> u64 {
    use rlimit::Resource;
    let wanted = u64::from(max_sessions) * FDS_PER_SESSION + FDS_RESERVED;
    let Ok((soft, hard)) = Resource::NOFILE.get() else {
        return u64::MAX;
    };
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    let target = wanted.max(soft);
    let raised = Resource::NOFILE.set(target.min(ceiling), target.min(ceiling).max(hard));
    if raised.is_err() {
        let _ = Resource::NOFILE.set(target.min(hard), hard);
    }
    Resource::NOFILE.get().map_or(soft, |(s, _)| s)
}

async fn run(serve: Serve) -> anyhow::Result<()> {
    check_exposure(&serve)?;
    if let Some(agent) = serve.agent.clone() {
        return run_container(serve, agent).await;
    }
    let open_files = raise_open_files(serve.max_sessions);
    if serve.auth_token.as_deref() == Some("") {
        anyhow::bail!("--auth-token must not be empty");
    }
    let mut config = config(&serve)?;
    // A session the descriptors cannot hold would fail half-made (its bootstrap without a
    // workspace): the capacity is what the open-files limit reaches, and `/v1/load` says so.
    let reachable = sessions_within(open_files);
    if reachable < config.max_sessions {
        tracing::warn!(
            open_files,
            max_sessions = config.max_sessions,
            reachable,
            "the open-files limit holds fewer sessions than --max-sessions: serving {reachable}; \
             raise `ulimit -n` for more"
        );
        config.max_sessions = reachable;
    }
    let registry = Registry::new(config)?;
    let (http, grpc) = bind(&serve).await?;
    tracing::info!(
        http = %http.local_addr()?,
        grpc = %grpc.local_addr()?,
        auth = serve.auth_token.is_some(),
        "arl-manager listening; loading the runtimes"
    );
    match arl_writes::Tracker::get() {
        Ok(_) => tracing::info!(
            "rollback checkpoints copy the pages the kernel reports written (userfaultfd \
             write-protection, PAGEMAP_SCAN)"
        ),
        Err(why) => tracing::info!(
            %why,
            "rollback checkpoints compare every page the guest wrote: the kernel reports no \
             writes to this process"
        ),
    }
    let loader = registry.clone();
    // The quickest first: JavaScript is ready in milliseconds (seconds on a cold cache).
    let mut runtimes = serve.common.runtimes.clone();
    runtimes.sort_by_key(|name| name != "javascript");
    registry.expect_runtimes(&runtimes);
    let load = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for name in &runtimes {
            loader
                .load_named(name, &progress)
                .with_context(|| format!("loading the {name} runtime"))?;
            tracing::info!(runtime = %name, "runtime ready");
        }
        Ok(())
    });
    // Before the reaper: what a dead predecessor left is cleaned before anything is made.
    registry
        .recover()
        .await
        .context("reading the session store")?;
    registry.spawn_reaper();
    let options = ServeOptions {
        body_limit: serve.body_limit_bytes,
        auth_token: serve.auth_token.clone(),
        grace: Duration::from_secs(serve.shutdown_grace_secs),
    };
    let listeners = Listeners {
        http,
        grpc: Some(grpc),
    };
    let served = tokio::spawn(server::run(
        registry.clone(),
        listeners,
        options,
        arl_serve::stop_signal(),
    ));
    load.await??;
    served.await??;
    tracing::info!("stopped");
    Ok(())
}

/// The HTTP and gRPC listeners `serve` asks for.
async fn bind(serve: &Serve) -> anyhow::Result<(tokio::net::TcpListener, tokio::net::TcpListener)> {
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))
    };
    Ok((bind(serve.listen).await?, bind(serve.grpc_listen).await?))
}

/// Serves a container pod: the manager in front of its runtime's agent.
async fn run_container(serve: Serve, agent: arl_exec::Address) -> anyhow::Result<()> {
    let options = arl_manager::container::ContainerOptions {
        agent,
        workspace: serve.workspace.clone(),
        idle_ttl: Duration::from_secs(serve.idle_ttl_secs),
        lifetime: Duration::from_secs(serve.lifetime_secs),
        id_prefix: serve.id_prefix.clone(),
        body_limit: serve.body_limit_bytes,
        auth_token: serve.auth_token.clone(),
    };
    let (http, grpc) = bind(&serve).await?;
    tracing::info!(
        http = %http.local_addr()?,
        grpc = %grpc.local_addr()?,
        agent = %options.agent,
        workspace = %options.workspace.display(),
        "arl-manager fronting a container runtime: this pod is one sandbox"
    );
    arl_manager::container::serve(options, http, grpc, arl_serve::stop_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capacity_is_what_the_descriptors_hold() {
        assert_eq!(sessions_within(20_000), 4_744);
        assert_eq!(sessions_within(1_024), 1, "never none");
        assert_eq!(sessions_within(u64::MAX), u32::MAX);
    }
}
