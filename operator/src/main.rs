//! `arl-operator`: the WarmPool and Sandbox controllers and the gateway, in one process.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use arl_operator::crd::{POOL_LABEL, Sandbox, Task, WarmPool};
use arl_operator::fleet::{Fleet, Member, known_pools};
use arl_operator::gateway::{self, Gateway};
use arl_operator::grpc::{self, GrpcGateway};
use arl_operator::manager::{Endpoint, Managers};
use arl_operator::token::TokenKey;
use arl_operator::{Context, pool, sandbox, task};
use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};

/// ARL's Kubernetes operator: keeps WarmPools of arl-manager pods sized to their session load,
/// places Sandboxes as sessions, and serves one gateway for every session of the cluster.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controllers and/or the gateway in a cluster (in-cluster config or
    /// ~/.kube/config). In a cluster they run as two Deployments (`--components`), so that
    /// the process that parses clients' traffic holds no write access to the API server.
    Run(Box<Run>),
    /// Run only the gateway, over managers given by address (no cluster needed).
    Gateway(GatewayOnly),
}

#[derive(Debug, Args)]
struct Common {
    /// Address of the gateway's HTTP API (the manager's /v1/sessions routes, /healthz, /readyz).
    #[arg(long, env = "ARL_GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    gateway_listen: SocketAddr,
    /// Address of the gateway's gRPC API (arl.v1.Sessions and grpc.health.v1.Health).
    #[arg(
        long,
        env = "ARL_GATEWAY_GRPC_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    gateway_grpc_listen: SocketAddr,
    /// Bearer token the gateway's clients must send. Prefer the environment variable.
    #[arg(long, env = "ARL_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Listen on a non-loopback address without --auth-token.
    #[arg(long, env = "ARL_INSECURE")]
    insecure: bool,
    /// Seconds between two reads of every manager's /v1/load.
    #[arg(long, env = "ARL_LOAD_INTERVAL_SECS", default_value_t = 3)]
    load_interval_secs: u64,
    /// Seconds that open connections get to finish on SIGTERM or Ctrl-C before the gateway
    /// exits anyway.
    #[arg(long, env = "ARL_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    shutdown_grace_secs: u64,
    /// Log filter (tracing-subscriber syntax).
    #[arg(long, env = "ARL_LOG", default_value = "info")]
    log: String,
}

/// What `run` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Component {
    /// The WarmPool and Sandbox controllers and the autoscaler (writes pods, Secrets,
    /// NetworkPolicies and status; serves no client).
    Controllers,
    /// The HTTP and gRPC gateway (reads pods and WarmPools only).
    Gateway,
}

#[derive(Debug, Args)]
struct Run {
    #[command(flatten)]
    common: Common,
    /// What this process runs: `controllers`, `gateway`, or both (comma-separated).
    #[arg(
        long,
        env = "ARL_COMPONENTS",
        value_enum,
        value_delimiter = ',',
        default_value = "controllers,gateway"
    )]
    components: Vec<Component>,
    /// The namespace the controllers and the gateway run in: each pool's NetworkPolicy lets
    /// only their pods (`app.kubernetes.io/name` arl-operator or arl-gateway) there reach its
    /// managers.
    #[arg(long, env = "ARL_SYSTEM_NAMESPACE", default_value = "arl-system")]
    system_namespace: String,
    /// Watch only this namespace [default: all].
    #[arg(long, env = "ARL_NAMESPACE")]
    namespace: Option<String>,
    /// Image of the arl-manager container of pool pods whose template names none.
    #[arg(
        long,
        env = "ARL_MANAGER_IMAGE",
        default_value = "ghcr.io/arl-dev/arl-manager:0.1.0"
    )]
    manager_image: String,
    /// Key (at least 16 bytes) from which every pool's manager token is derived.
    #[arg(long, env = "ARL_TOKEN_KEY", hide_env_values = true)]
    token_key: String,
}

#[derive(Debug, Args)]
struct GatewayOnly {
    #[command(flatten)]
    common: Common,
    /// A manager as NAME=URL[+GRPC_ADDR], e.g. `m1=http://127.0.0.1:8081+127.0.0.1:50052`;
    /// NAME must be its --id-prefix, and without GRPC_ADDR it is reached over HTTP only.
    #[arg(
        long = "backend",
        env = "ARL_BACKENDS",
        value_delimiter = ',',
        required = true
    )]
    backends: Vec<String>,
    /// Bearer token of the managers.
    #[arg(long, env = "ARL_BACKEND_TOKEN", hide_env_values = true)]
    backend_token: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let common = match &cli.command {
        Command::Run(run) => &run.common,
        Command::Gateway(g) => &g.common,
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&common.log).context("--log")?)
        .init();
    let gateway = match &cli.command {
        Command::Run(run) => run.components.contains(&Component::Gateway),
        Command::Gateway(_) => true,
    };
    let listens = [common.gateway_listen, common.gateway_grpc_listen];
    for addr in listens.into_iter().filter(|_| gateway) {
        if !addr.ip().is_loopback() && common.auth_token.is_none() && !common.insecure {
            anyhow::bail!(
                "refusing to serve the gateway on {addr} without --auth-token (ARL_AUTH_TOKEN): \
                 anyone who reaches it could run code; set a token, or --insecure behind \
                 something that authenticates"
            );
        }
    }
    if common.auth_token.as_deref() == Some("") {
        anyhow::bail!("--auth-token must not be empty");
    }
    if common.load_interval_secs == 0 {
        anyhow::bail!("--load-interval-secs must be at least 1");
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Run(run) => run_cluster(*run).await,
            Command::Gateway(g) => run_gateway(g).await,
        }
    })
}

/// Serves the gateway over `fleet`, HTTP and gRPC, until SIGTERM or Ctrl-C.
async fn serve_gateway(fleet: Fleet, common: &Common) -> anyhow::Result<()> {
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))
    };
    let (http, grpc) = (
        bind(common.gateway_listen).await?,
        bind(common.gateway_grpc_listen).await?,
    );
    tracing::info!(http = %common.gateway_listen, grpc = %common.gateway_grpc_listen, "gateway listening");
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut stopping = stopping.clone();
        async move {
            let _ = stopping.wait_for(|s| *s).await;
        }
    };
    let token = common.auth_token.as_deref();
    let router = gateway::router(Gateway::new(fleet.clone(), token));
    let http = arl_serve::serve_http(http, router, stopped());
    let grpc = grpc::serve(grpc, GrpcGateway::new(fleet), token, stopped());
    let grace = Duration::from_secs(common.shutdown_grace_secs);
    let deadline = async move {
        arl_serve::stop_signal().await;
        let _ = stop.send(true);
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        (http, grpc) = async { tokio::join!(http, grpc) } => {
            http.context("the gateway's HTTP server")?;
            grpc.context("the gateway's gRPC server")?;
        }
        () = deadline => tracing::warn!(?grace, "connections still open after the grace period; exiting"),
    }
    Ok(())
}

async fn run_gateway(g: GatewayOnly) -> anyhow::Result<()> {
    let fleet = Fleet::default();
    for backend in &g.backends {
        let (name, address) = backend
            .split_once('=')
            .with_context(|| format!("--backend {backend}: expected NAME=URL[+GRPC_ADDR]"))?;
        let (url, grpc) = match address.split_once('+') {
            Some((url, grpc)) => (url, Some(grpc.to_owned())),
            None => (address, None),
        };
        if let Some(grpc) = &grpc
            && grpc.parse::<SocketAddr>().is_err()
        {
            anyhow::bail!("--backend {backend}: the gRPC address must be IP:PORT");
        }
        let url = url.trim_end_matches('/');
        if !url.starts_with("http://") && !url.starts_with("https://") {
            anyhow::bail!("--backend {backend}: the URL must start with http:// or https://");
        }
        fleet.upsert(Member {
            name: name.to_owned(),
            namespace: String::new(),
            pool: String::new(),
            runtime: None,
            endpoint: Endpoint {
                http: url.to_owned(),
                token: g.backend_token.clone(),
            },
            grpc,
            ready: true,
            draining: false,
            load: None,
        });
    }
    let managers = Managers::new();
    fleet.poll(&managers).await;
    let interval = Duration::from_secs(g.common.load_interval_secs);
    let poller = tokio::spawn(fleet.clone().poll_every(managers, interval));
    let served = serve_gateway(fleet, &g.common).await;
    poller.abort();
    served
}

async fn run_cluster(run: Run) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let tokens = TokenKey::new(run.token_key.as_bytes().to_vec())?;
    let (pools, pods, sandboxes, task_api): (Api<WarmPool>, Api<Pod>, Api<Sandbox>, Api<Task>) =
        match &run.namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        };
    let fleet = Fleet::default();
    let managers = Managers::new();
    let interval = Duration::from_secs(run.common.load_interval_secs);

    // Every pool pod that a watched WarmPool controls, as a fleet member, kept current by a
    // watch of both.
    let (pod_store, pod_writer) = reflector::store::<Pod>();
    let pod_events = reflector(
        pod_writer,
        watcher(pods.clone(), watcher::Config::default().labels(POOL_LABEL)),
    )
    .default_backoff()
    .touched_objects()
    .map(|event| event.map(drop));
    let (pool_store, pool_writer) = reflector::store::<WarmPool>();
    let pool_events = reflector(
        pool_writer,
        watcher(pools.clone(), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects()
    .map(|event| event.map(drop));
    let (fleet_w, tokens_w) = (fleet.clone(), tokens.clone());
    let pod_watch = tokio::spawn(async move {
        let mut events = std::pin::pin!(futures_util::stream::select(pod_events, pool_events));
        while let Some(event) = events.next().await {
            if let Err(e) = event {
                tracing::warn!(error = %e, "pod or pool watch");
                continue;
            }
            let pools = known_pools(pool_store.state().iter().map(|p| &**p));
            fleet_w.replace(
                pod_store
                    .state()
                    .iter()
                    .filter_map(|p| Member::from_pod(p, &tokens_w, &pools)),
            );
        }
    });
    let poller = tokio::spawn(fleet.clone().poll_every(managers.clone(), interval));

    let mut tasks = vec![pod_watch, poller];
    if run.components.contains(&Component::Controllers) {
        let ctx = Context {
            client,
            fleet: fleet.clone(),
            managers,
            tokens,
            manager_image: run.manager_image,
            interval,
            system_namespace: run.system_namespace,
        }
        .shared();
        tasks.push(tokio::spawn(pool::run(ctx.clone(), pools, pods)));
        tasks.push(tokio::spawn(sandbox::run(ctx.clone(), sandboxes)));
        tasks.push(tokio::spawn(task::run(ctx, task_api)));
    }
    let served = if run.components.contains(&Component::Gateway) {
        serve_gateway(fleet, &run.common).await
    } else {
        tracing::info!("controllers running; no gateway in this process");
        arl_serve::stop_signal().await;
        Ok(())
    };
    for task in tasks {
        task.abort();
    }
    served
}
