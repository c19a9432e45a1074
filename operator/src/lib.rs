//! ARL's control plane: the WarmPool, Sandbox and Task custom resources, their controllers, the
//! autoscaler they scale pools with, and the gateway that routes sessions to pods.
//!
//! - [`crd`]: the resource types; `crdgen` writes `deploy/crds/` from them.
//! - [`autoscale`]: pods needed and pods to drain, a pure function of observed load.
//! - [`fleet`]: every manager pod with its last `/v1/load`, shared by controllers and gateway.
//! - [`pool`], [`sandbox`] and [`task`]: the reconcilers.
//! - [`gateway`] and [`grpc`]: one HTTP and one gRPC entry for the cluster's sessions.
#![forbid(unsafe_code)]

pub mod autoscale;
pub mod crd;
pub mod fleet;
pub mod gateway;
pub mod grpc;
pub mod manager;
pub mod pods;
pub mod pool;
pub mod sandbox;
pub mod task;
pub mod token;

use std::sync::Arc;

/// What the operator's steps fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("manager at {url}: {message}")]
    Manager {
        url: String,
        status: Option<u16>,
        code: String,
        message: String,
    },
    #[error("{0} has no namespace")]
    NoNamespace(String),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(
        "the Secret {0} exists and is not this pool's (no owner reference to it): refusing to \
         overwrite it; delete or rename it, or rename the pool"
    )]
    ForeignSecret(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What every reconciler shares.
#[derive(Clone)]
pub struct Context {
    pub client: kube::Client,
    /// Manager pods and their loads.
    pub fleet: fleet::Fleet,
    /// Talks to managers.
    pub managers: manager::Managers,
    /// Derives each pool's manager token.
    pub tokens: token::TokenKey,
    /// Image of the `arl-manager` container when a pool names none.
    pub manager_image: String,
    /// How often loads are read and pools reconsidered.
    pub interval: std::time::Duration,
    /// The namespace the operator and the gateway run in: the only one whose pods each pool's
    /// NetworkPolicy lets reach its managers.
    pub system_namespace: String,
}

impl Context {
    pub fn shared(self) -> Arc<Self> {
        Arc::new(self)
    }
}

/// RFC 3339 with seconds, UTC: what Kubernetes timestamps look like.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(t)
        .map(|ts| {
            ts.round(k8s_openapi::jiff::Unit::Second)
                .unwrap_or(ts)
                .to_string()
        })
        .unwrap_or_default()
}
