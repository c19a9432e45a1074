//! `arl-exec`: the executor agent inside a container runtime, for what cannot be WebAssembly
//! (a toolchain, a repository's test suite, native wheels).
//!
//! It serves the seeds' sidecar contract, `arl.sidecar.AgentService`, over gRPC and the same
//! operations over HTTP (`/files`, `/execute`, `/signal`, `/reset`, `/health`), both on one
//! listener (a Unix socket in the pod's shared volume, or TCP). The `arl-manager` in front of
//! it claims the pod as one session and forwards to it with [`grpc::RemoteAgent`].
//!
//! | module | what it holds |
//! |---|---|
//! | [`agent`] | the [`Executor`] trait and [`LocalAgent`], which does the work here |
//! | [`process`] | process groups, deadlines, output caps, services, signals |
//! | [`workspace`] | paths confined to the workspace; files and patches, all or nothing |
//! | [`patch`] | unified diffs cut into files (applied by `diffy`) |
//! | [`shell`] | an interactive shell on a pseudo-terminal |
//! | [`grpc`] | the gRPC service over any executor, and the remote executor |
//! | [`http`] | the HTTP routes over any executor |

pub mod agent;
pub mod error;
pub mod grpc;
pub mod http;
pub mod patch;
pub mod process;
pub mod shell;
pub mod workspace;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub use agent::{Executor, LocalAgent};
pub use error::{ExecError, Result};

/// Where an agent listens, or is reached: `unix:/path/to/socket` or `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::str::FromStr for Address {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Ok(Address::Unix(PathBuf::from(path))),
            Some(_) => Err("unix: needs a socket path, e.g. unix:/arl/run/agent.sock".into()),
            None => s
                .parse()
                .map(Address::Tcp)
                .map_err(|_| format!("`{s}` is neither unix:/path nor host:port")),
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

/// Largest message or body the agent takes: a file update carries whole files.
pub const MAX_MESSAGE: usize = 64 << 20;

/// A bound listener of either kind.
#[derive(Debug)]
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// Binds `address`; a socket file left by an earlier run is replaced.
    pub async fn bind(address: &Address) -> std::io::Result<Self> {
        match address {
            Address::Tcp(addr) => Ok(Listener::Tcp(tokio::net::TcpListener::bind(addr).await?)),
            Address::Unix(path) => {
                let _ = std::fs::remove_file(path);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                Ok(Listener::Unix(tokio::net::UnixListener::bind(path)?))
            }
        }
    }
}

/// Serves `executor` on `listener`, gRPC and HTTP alike, until `shutdown`.
pub async fn serve<E: Executor>(
    executor: Arc<E>,
    listener: Listener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<arl_proto::sidecar::agent_service_server::AgentServiceServer<grpc::AgentGrpc<E>>>()
        .await;
    let grpc = tonic::service::Routes::new(health)
        .add_service(grpc::AgentGrpc::server(executor.clone(), MAX_MESSAGE))
        .into_axum_router();
    let app = http::router(executor).merge(grpc);
    match listener {
        Listener::Tcp(listener) => arl_serve::serve_http(listener, app, shutdown).await,
        Listener::Unix(listener) => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}
