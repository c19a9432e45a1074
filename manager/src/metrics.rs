//! What `/metrics` shows, in the OpenMetrics text format that Prometheus scrapes.
//!
//! The names are the constants below; the README lists them. Counters are recorded where
//! things happen (the registry, the session task, the HTTP layer); gauges are read from the
//! registry's [`Load`] at each scrape.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::session::types::EndReason;

/// How loaded a manager is: what the operator scales and places on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Load {
    /// Live sessions.
    pub sessions: u64,
    /// Sessions this manager can hold at once.
    pub capacity: u64,
    /// Linear memory of the live sessions, summed.
    pub memory_bytes: u64,
    /// Whether new sessions are refused.
    pub draining: bool,
    /// Sessions suspended to the store (no instance; resumed by their next request).
    pub suspended: u64,
}

/// Live sessions.
pub const SESSIONS_ACTIVE: &str = "arl_sessions_active";
/// Sessions this manager can hold at once.
pub const SESSIONS_CAPACITY: &str = "arl_sessions_capacity";
/// Linear memory of the live sessions, in bytes.
pub const MEMORY_BYTES: &str = "arl_memory_bytes";
/// 1 while the manager refuses new sessions (drain), else 0.
pub const DRAINING: &str = "arl_draining";
/// Sessions suspended to the store.
pub const SESSIONS_SUSPENDED: &str = "arl_sessions_suspended";
/// Suspensions and resumes, by `direction` (`suspend`, `resume`).
pub const SUSPENSIONS: &str = "arl_suspensions_total";
/// Writes and reads of the session store that failed (the session stayed as it was).
pub const STORE_FAILURES: &str = "arl_store_failures_total";
/// Sessions created, by `runtime`.
pub const SESSIONS_CREATED: &str = "arl_sessions_created_total";
/// Sessions ended, by `reason` (`deleted`, `idle`, `deadline`, `exit`, `trap`, ...).
pub const SESSIONS_ENDED: &str = "arl_sessions_ended_total";
/// Executions finished, by `outcome`: `ok`, `error` (an exception), `ended` (the turn ended
/// the session) or `cancelled` (the client went away).
pub const EXECUTIONS: &str = "arl_executions_total";
/// How long executions ran, in seconds.
pub const EXECUTION_DURATION: &str = "arl_execution_duration_seconds";
/// HTTP requests answered, by `method`, matched `route` and `status`.
pub const HTTP_REQUESTS: &str = "arl_http_requests_total";
/// Captures that copied a whole memory because `/proc/self/pagemap` could not say which
/// pages were written: above 0, fork, snapshot and rollback cost far more than they should.
pub const WHOLE_MEMORY_CAPTURES: &str = "arl_whole_memory_captures_total";
/// Calls guests made out of their sandbox through the host, by `kind` (`http`, `tool`,
/// `pip`) and `outcome` (`ok`, `refused`, `error`).
pub const EGRESS_REQUESTS: &str = "arl_egress_requests_total";
/// Body bytes guests' brokered calls moved, by `direction` (`sent`, `received`).
pub const EGRESS_BYTES: &str = "arl_egress_bytes_total";

/// Every name above, for documentation and tests.
pub const ALL: [&str; 15] = [
    SESSIONS_ACTIVE,
    SESSIONS_SUSPENDED,
    SUSPENSIONS,
    STORE_FAILURES,
    SESSIONS_CAPACITY,
    MEMORY_BYTES,
    DRAINING,
    SESSIONS_CREATED,
    SESSIONS_ENDED,
    EXECUTIONS,
    EXECUTION_DURATION,
    HTTP_REQUESTS,
    WHOLE_MEMORY_CAPTURES,
    EGRESS_REQUESTS,
    EGRESS_BYTES,
];

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuntimeLabel {
    runtime: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EgressLabels {
    kind: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: String,
    route: String,
    status: u16,
}

/// How an execution ended, as [`EXECUTIONS`] counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutionOutcome {
    Ok,
    Error,
    Ended,
    Cancelled,
    /// It failed and was undone; the session carries on.
    RolledBack,
}

impl ExecutionOutcome {
    fn label(self) -> &'static str {
        match self {
            ExecutionOutcome::Ok => "ok",
            ExecutionOutcome::Error => "error",
            ExecutionOutcome::Ended => "ended",
            ExecutionOutcome::Cancelled => "cancelled",
            ExecutionOutcome::RolledBack => "rolled_back",
        }
    }
}

/// The manager's metrics.
pub struct Metrics {
    registry: prometheus_client::registry::Registry,
    created: Family<RuntimeLabel, Counter>,
    ended: Family<ReasonLabel, Counter>,
    executions: Family<OutcomeLabel, Counter>,
    duration: Histogram,
    http: Family<HttpLabels, Counter>,
    whole_memory: Counter,
    suspensions: Family<DirectionLabel, Counter>,
    store_failures: Counter,
    suspended: Gauge,
    egress: Family<EgressLabels, Counter>,
    egress_bytes: Family<DirectionLabel, Counter>,
    active: Gauge,
    capacity: Gauge,
    memory: Gauge,
    draining: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = prometheus_client::registry::Registry::default();
        let this = Self {
            created: Family::default(),
            ended: Family::default(),
            executions: Family::default(),
            duration: Histogram::new(exponential_buckets(0.000_25, 2.0, 20)),
            http: Family::default(),
            whole_memory: Counter::default(),
            suspensions: Family::default(),
            store_failures: Counter::default(),
            suspended: Gauge::default(),
            egress: Family::default(),
            egress_bytes: Family::default(),
            active: Gauge::default(),
            capacity: Gauge::default(),
            memory: Gauge::default(),
            draining: Gauge::default(),
            registry: prometheus_client::registry::Registry::default(),
        };
        // OpenMetrics adds `_total` to a counter's name itself.
        let counter = |name: &'static str| name.trim_end_matches("_total");
        registry.register(SESSIONS_ACTIVE, "Live sessions", this.active.clone());
        registry.register(
            SESSIONS_CAPACITY,
            "Sessions this manager can hold at once",
            this.capacity.clone(),
        );
        registry.register(
            MEMORY_BYTES,
            "Linear memory of the live sessions, in bytes",
            this.memory.clone(),
        );
        registry.register(
            DRAINING,
            "1 while new sessions are refused",
            this.draining.clone(),
        );
        registry.register(
            counter(SESSIONS_CREATED),
            "Sessions created, by runtime",
            this.created.clone(),
        );
        registry.register(
            counter(SESSIONS_ENDED),
            "Sessions ended, by reason",
            this.ended.clone(),
        );
        registry.register(
            counter(EXECUTIONS),
            "Executions finished, by outcome",
            this.executions.clone(),
        );
        registry.register(
            EXECUTION_DURATION,
            "How long executions ran, in seconds",
            this.duration.clone(),
        );
        registry.register(
            counter(HTTP_REQUESTS),
            "HTTP requests answered, by method, route and status",
            this.http.clone(),
        );
        registry.register(
            counter(WHOLE_MEMORY_CAPTURES),
            "Captures that copied a whole memory for want of /proc/self/pagemap",
            this.whole_memory.clone(),
        );
        registry.register(
            SESSIONS_SUSPENDED,
            "Sessions suspended to the store",
            this.suspended.clone(),
        );
        registry.register(
            counter(SUSPENSIONS),
            "Suspensions and resumes, by direction",
            this.suspensions.clone(),
        );
        registry.register(
            counter(STORE_FAILURES),
            "Session store writes and reads that failed",
            this.store_failures.clone(),
        );
        registry.register(
            counter(EGRESS_REQUESTS),
            "Calls guests made out of their sandbox, by kind and outcome",
            this.egress.clone(),
        );
        registry.register(
            counter(EGRESS_BYTES),
            "Body bytes of guests' brokered calls, by direction",
            this.egress_bytes.clone(),
        );
        // Series at 0 from the start, so that a rate over them is defined before the first call.
        for kind in ["http", "tool", "pip"] {
            for outcome in ["ok", "refused", "error"] {
                let kind = kind.to_owned();
                let _ = this.egress.get_or_create(&EgressLabels { kind, outcome });
            }
        }
        for direction in ["suspend", "resume"] {
            let _ = this
                .suspensions
                .get_or_create(&DirectionLabel { direction });
        }
        for direction in ["sent", "received"] {
            let _ = this
                .egress_bytes
                .get_or_create(&DirectionLabel { direction });
        }
        Self { registry, ..this }
    }

    /// A guest's call out of its sandbox (`kind`: http, tool, pip) and how it went
    /// (`outcome`: ok, refused, error), with the body bytes it moved.
    pub fn egress(&self, kind: &str, outcome: &'static str, sent: u64, received: u64) {
        let kind = kind.to_owned();
        self.egress
            .get_or_create(&EgressLabels { kind, outcome })
            .inc();
        for (direction, bytes) in [("sent", sent), ("received", received)] {
            self.egress_bytes
                .get_or_create(&DirectionLabel { direction })
                .inc_by(bytes);
        }
    }

    pub fn session_created(&self, runtime: &str) {
        self.created
            .get_or_create(&RuntimeLabel {
                runtime: runtime.to_owned(),
            })
            .inc();
    }

    /// A session went to the store.
    pub fn suspended(&self) {
        let direction = "suspend";
        self.suspensions
            .get_or_create(&DirectionLabel { direction })
            .inc();
    }

    /// A session came back from the store.
    pub fn resumed(&self) {
        let direction = "resume";
        self.suspensions
            .get_or_create(&DirectionLabel { direction })
            .inc();
    }

    /// A write or read of the session store failed.
    pub fn store_failure(&self) {
        self.store_failures.inc();
    }

    pub fn session_ended(&self, reason: &EndReason) {
        self.ended
            .get_or_create(&ReasonLabel {
                reason: reason.code(),
            })
            .inc();
    }

    pub fn execution(&self, outcome: ExecutionOutcome, duration: Duration) {
        self.executions
            .get_or_create(&OutcomeLabel {
                outcome: outcome.label(),
            })
            .inc();
        self.duration.observe(duration.as_secs_f64());
    }

    pub fn http_request(&self, method: &str, route: &str, status: u16) {
        self.http
            .get_or_create(&HttpLabels {
                method: method.to_owned(),
                route: route.to_owned(),
                status,
            })
            .inc();
    }

    /// The text a scrape gets, with the gauges read from `load`.
    pub fn render(&self, load: &Load) -> String {
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.active.set(gauge(load.sessions));
        self.capacity.set(gauge(load.capacity));
        self.memory.set(gauge(load.memory_bytes));
        self.draining.set(i64::from(load.draining));
        self.suspended.set(gauge(load.suspended));
        let whole = crate::image::pages::whole_memory_captures();
        self.whole_memory
            .inc_by(whole.saturating_sub(self.whole_memory.get()));
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_name_is_exposed() {
        let m = Metrics::new();
        m.session_created("python");
        m.session_ended(&EndReason::Idle);
        m.execution(ExecutionOutcome::Ok, Duration::from_millis(2));
        m.http_request("GET", "/v1/load", 200);
        let text = m.render(&Load {
            sessions: 3,
            capacity: 10,
            memory_bytes: 1 << 20,
            draining: true,
            suspended: 2,
        });
        for name in ALL {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(text.contains("arl_sessions_active 3"), "{text}");
        assert!(text.contains("arl_draining 1"), "{text}");
        assert!(
            text.contains(r#"arl_sessions_ended_total{reason="idle"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"arl_http_requests_total{method="GET",route="/v1/load",status="200"} 1"#
            )
        );
    }
}
