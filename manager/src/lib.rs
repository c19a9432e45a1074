//! `arl-manager`: many stateful WASI sandboxes in one process, keyed by session.
//!
//! The core ([`engine`], [`runtime`], [`session`], [`registry`], [`image`], [`snapshots`])
//! knows nothing of HTTP; [`api`] (HTTP, axum) and [`grpc`] (tonic) are adapters over it,
//! [`server`] runs both, and `main.rs` only parses flags and wires them.
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod container;
pub mod egress;
pub mod engine;
pub mod error;
pub mod files;
pub mod grpc;
pub mod image;
pub mod metrics;
pub mod output;
pub mod preinit;
pub mod registry;
pub mod runtime;
pub mod server;
pub mod session;
pub mod snapshots;

pub use config::ManagerConfig;
pub use error::{Error, Result};
pub use registry::Registry;
pub use server::ServeOptions;
pub use session::{EndReason, Limits, Outcome, rfc3339};
