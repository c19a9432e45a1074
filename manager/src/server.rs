//! One manager's servers: HTTP (axum) and gRPC (tonic) over the same registry, started
//! together and stopped gracefully.
//!
//! Stopping goes: stop accepting connections and new sessions; give running executions up to
//! the grace period to finish (their answers still go out); then end every session, which
//! stops what still runs with the reason `shutdown`; then wait for the servers to close.

use std::io;
use std::time::Duration;

use arl_serve::Bearer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, RouterOptions};
use crate::grpc::{self, SessionService};
use crate::registry::Registry;

/// How long the servers get to close once every session has ended.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a manager serves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Largest JSON request body (and gRPC message), in bytes.
    pub body_limit: usize,
    /// When set, every route but the probes needs `Authorization: Bearer <token>`.
    pub auth_token: Option<String>,
    /// How long running executions get to finish once stopping starts.
    pub grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            body_limit: api::DEFAULT_BODY_LIMIT,
            auth_token: None,
            grace: Duration::from_secs(10),
        }
    }
}

/// The sockets a manager serves on; gRPC is optional.
#[derive(Debug)]
pub struct Listeners {
    pub http: TcpListener,
    pub grpc: Option<TcpListener>,
}

/// Serves `registry` on `listeners` until `shutdown` resolves, then stops as the module says.
pub async fn run(
    registry: Registry,
    listeners: Listeners,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let auth = Bearer::new(options.auth_token.as_deref());
    let (stop, stopping) = watch::channel(false);
    let stopped = move || {
        let mut stopping = stopping.clone();
        async move {
            let _ = stopping.wait_for(|s| *s).await;
        }
    };
    let router = api::router(
        registry.clone(),
        RouterOptions {
            body_limit: options.body_limit,
            auth,
        },
    );
    let http = tokio::spawn(arl_serve::serve_http(listeners.http, router, stopped()));
    let grpc = listeners.grpc.map(|listener| {
        let (reporter, health) = tonic_health::server::health_reporter();
        tokio::spawn(grpc::report_health(registry.clone(), reporter, stopped()));
        let sessions = SessionService::new(registry.clone()).server(auth, options.body_limit);
        let incoming = arl_serve::grpc_incoming(listener);
        let served = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(sessions)
            .serve_with_incoming_shutdown(incoming, stopped());
        tokio::spawn(served)
    });
    let mut servers = tokio::spawn(async move {
        let http = http.await.map_err(io::Error::other)?;
        let grpc = match grpc {
            Some(grpc) => grpc
                .await
                .map_err(io::Error::other)?
                .map_err(io::Error::other),
            None => Ok(()),
        };
        http.and(grpc)
    });
    tokio::select! {
        () = shutdown => {}
        done = &mut servers => return done.map_err(io::Error::other)?,
    }
    tracing::info!(
        grace_s = options.grace.as_secs_f64(),
        "stopping: no new connections or sessions; running executions may finish"
    );
    registry.stop_accepting();
    let _ = stop.send(true);
    if let Ok(done) = tokio::time::timeout(options.grace, &mut servers).await {
        registry.shutdown(CLOSE_TIMEOUT).await;
        return done.map_err(io::Error::other)?;
    }
    tracing::warn!("grace period over: ending the sessions that still run");
    registry.shutdown(CLOSE_TIMEOUT).await;
    match tokio::time::timeout(CLOSE_TIMEOUT, servers).await {
        Ok(done) => done.map_err(io::Error::other)?,
        Err(_) => {
            tracing::warn!("connections still open after every session ended; closing anyway");
            Ok(())
        }
    }
}
