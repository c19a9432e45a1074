//! Everything a guest reaches outside its sandbox, brokered by the host: a WASM guest has no
//! sockets, so each byte that leaves goes through the door (`host::call`) as a request the
//! manager checks and makes itself.
//!
//! | module | what it holds |
//! |---|---|
//! | this one | the [`Door`] a session's store answers calls through, its grants, budget and record |
//! | [`policy`] | allow-lists and budgets: parsing, matching, the manager's ceiling |
//! | [`broker`] | the one HTTP client, which connects only where a policy allows |
//! | [`wheels`] | `pip install` of pure-Python wheels into a session |
//!
//! A call is one JSON frame from the guest, `{"call": "http" | "tool" | "pip", ...}`, and one
//! JSON answer: the call's value, or `{"error": {"kind", "message"}}`, which the guest's
//! driver raises as a Python exception (see `runtimes/src/python/driver.py`).

pub mod broker;
pub mod policy;
pub mod wheels;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

pub use broker::Broker;
pub use policy::{NetworkLimits, NetworkRequest, Policy};

use crate::metrics::Metrics;
use crate::{Error, Result};

/// A tool of the caller that guest code may call (`llm_query(...)`), as a create names it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolSpec {
    /// Where the call is POSTed: `{"tool", "session_id", "args", "kwargs"}` in, any JSON (the
    /// call's value) out.
    #[schema(
        example = "http://127.0.0.1:8000/llm",
        pattern = "^https?://[^/?#@\\s]+([/?#].*)?$"
    )]
    pub url: String,
    /// Sent with every call (a token for the caller's endpoint, say); never shown to the guest.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// Tools a session may have.
pub const MAX_TOOLS: usize = 32;

/// A session's tools, checked.
#[derive(Debug, Clone, Default)]
pub struct Tools(BTreeMap<String, (url::Url, Vec<(String, String)>)>);

impl Tools {
    /// Checks a create's `tools`: identifiers for names, http(s) URLs with a host.
    pub fn from_request(tools: &BTreeMap<String, ToolSpec>) -> Result<Tools> {
        if tools.len() > MAX_TOOLS {
            return Err(Error::InvalidRequest(format!(
                "tools may have at most {MAX_TOOLS} entries"
            )));
        }
        let mut checked = BTreeMap::new();
        for (name, spec) in tools {
            let ident = name.len() <= 64
                && name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ident {
                return Err(Error::InvalidRequest(format!(
                    "tools.{name}: a tool's name must be a Python identifier of at most 64 \
                     characters"
                )));
            }
            let url = url::Url::parse(&spec.url)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                .ok_or_else(|| {
                    Error::InvalidRequest(format!(
                        "tools.{name}.url ({:?}) must be an http:// or https:// URL with a host",
                        spec.url
                    ))
                })?;
            let headers = spec
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            checked.insert(name.clone(), (url, headers));
        }
        Ok(Tools(checked))
    }

    pub fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}

/// What a session's guest is granted: its network policy and its tools.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    pub policy: Policy,
    pub tools: Tools,
}

/// Requests and bytes a session has spent, over its life.
#[derive(Debug, Default)]
pub struct Usage {
    spent: Mutex<(u64, u64)>,
}

impl Usage {
    /// Counts one more request of `bytes` bytes, or refuses it past the policy's budget.
    fn spend_request(&self, policy: &Policy, bytes: u64) -> std::result::Result<(), Failure> {
        let mut spent = self.spent.lock().unwrap_or_else(PoisonError::into_inner);
        if spent.0 >= policy.max_requests {
            return Err(Failure::Refused(format!(
                "this session has made its {} requests (network.max_requests)",
                policy.max_requests
            )));
        }
        if spent.1 >= policy.max_bytes {
            return Err(Failure::Refused(format!(
                "this session has moved its {} bytes (network.max_bytes)",
                policy.max_bytes
            )));
        }
        if spent.1.saturating_add(bytes) > policy.max_bytes {
            return Err(Failure::Refused(format!(
                "this request's {bytes} bytes would pass the session's {} (network.max_bytes)",
                policy.max_bytes
            )));
        }
        spent.0 += 1;
        spent.1 += bytes;
        Ok(())
    }

    fn spend_bytes(&self, bytes: u64) {
        let mut spent = self.spent.lock().unwrap_or_else(PoisonError::into_inner);
        spent.1 = spent.1.saturating_add(bytes);
    }

    /// Bytes the session may still move.
    fn room(&self, policy: &Policy) -> u64 {
        let spent = self.spent.lock().unwrap_or_else(PoisonError::into_inner);
        policy.max_bytes.saturating_sub(spent.1)
    }

    /// (requests, bytes) so far.
    pub fn spent(&self) -> (u64, u64) {
        *self.spent.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a call failed, as the guest's exception shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The policy or budget does not allow it (`arl.NetworkRefused`, a `PermissionError`).
    Refused(String),
    /// A response passed the byte cap.
    TooLarge(String),
    Timeout(String),
    Connect(String),
    /// The tool's endpoint failed or answered something else than JSON (`arl.ToolError`).
    Tool(String),
    /// `pip install` could not (`arl.InstallError`).
    Install(String),
    /// The frame itself was wrong: the driver's fault or code that calls the door by hand.
    BadCall(String),
}

impl Failure {
    fn kind(&self) -> &'static str {
        match self {
            Failure::Refused(_) => "refused",
            Failure::TooLarge(_) => "too_large",
            Failure::Timeout(_) => "timeout",
            Failure::Connect(_) => "connect",
            Failure::Tool(_) => "tool",
            Failure::Install(_) => "install",
            Failure::BadCall(_) => "bad_call",
        }
    }

    fn message(&self) -> &str {
        match self {
            Failure::Refused(m)
            | Failure::TooLarge(m)
            | Failure::Timeout(m)
            | Failure::Connect(m)
            | Failure::Tool(m)
            | Failure::Install(m)
            | Failure::BadCall(m) => m,
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            Failure::Refused(_) | Failure::TooLarge(_) => "refused",
            _ => "error",
        }
    }
}

/// One call out of the sandbox, as the session's history keeps it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Record {
    /// `http`, `tool` or `pip`.
    pub kind: String,
    pub method: String,
    /// The URL (a tool's name for tools, the requirements for pip).
    pub url: String,
    /// The response's status, when one came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: f64,
    /// Why it was refused or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Record {
    fn new(kind: &str, method: &str, url: &str) -> Self {
        Record {
            kind: kind.to_owned(),
            method: method.chars().take(32).collect(),
            url: url.chars().take(2048).collect(),
            status: None,
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: 0.0,
            error: None,
        }
    }

    fn finish<T>(&mut self, started: Instant, result: &std::result::Result<T, Failure>) {
        self.duration_ms = started.elapsed().as_secs_f64() * 1e3;
        if let Err(failure) = result {
            self.error = Some(format!("{}: {}", failure.kind(), failure.message()));
        }
    }
}

/// A session's egress as its view shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Summary {
    /// The rules of its allow-list; empty: no network.
    pub allow: Vec<String>,
    pub max_bytes: u64,
    pub max_requests: u64,
    /// Requests made so far (HTTP and tool calls, refused ones not counted).
    pub requests: u64,
    /// Body bytes moved so far.
    pub bytes: u64,
    /// The names of its host tools.
    pub tools: Vec<String>,
}

/// Calls a turn may record; past this the rest are counted in metrics only.
const RECORDS_PER_TURN: usize = 256;

/// A session's door to the host: what its store answers `host::call` frames with. Made empty
/// (no network, no tools) when the session starts, granted at its create (a warm session's
/// at its claim), shared by the session's handle and every store it has (a rollback makes a
/// new one).
pub struct Door {
    broker: Arc<Broker>,
    wheels: Arc<wheels::Installer>,
    metrics: Arc<Metrics>,
    session: String,
    /// The session's `/workspace` on the host, where `pip install` puts packages.
    workspace: std::path::PathBuf,
    grants: RwLock<Arc<Grants>>,
    usage: Usage,
    /// This turn's calls, taken into its history entry.
    records: Mutex<Vec<Record>>,
}

impl Door {
    pub fn new(
        egress: &Egress,
        metrics: Arc<Metrics>,
        session: String,
        workspace: std::path::PathBuf,
    ) -> Self {
        Door {
            broker: egress.broker.clone(),
            wheels: egress.wheels.clone(),
            metrics,
            session,
            workspace,
            grants: RwLock::default(),
            usage: Usage::default(),
            records: Mutex::default(),
        }
    }

    pub fn grant(&self, grants: Grants) {
        *self.grants.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(grants);
    }

    pub fn grants(&self) -> Arc<Grants> {
        self.grants
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What the session may reach and has spent, as its view shows it.
    pub fn summary(&self) -> Summary {
        let grants = self.grants();
        let (requests, bytes) = self.usage.spent();
        Summary {
            allow: grants.policy.allow_list(),
            max_bytes: grants.policy.max_bytes,
            max_requests: grants.policy.max_requests,
            requests,
            bytes,
            tools: grants.tools.names(),
        }
    }

    /// The calls made since the last take.
    pub fn take_records(&self) -> Vec<Record> {
        std::mem::take(&mut *self.records.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Answers one call frame.
    pub async fn answer(&self, frame: &[u8]) -> Vec<u8> {
        let (result, record) = self.dispatch(frame).await;
        if let Some(record) = record {
            let outcome = match &result {
                Ok(_) => "ok",
                Err(f) => f.outcome(),
            };
            self.metrics.egress(
                &record.kind,
                outcome,
                record.bytes_sent,
                record.bytes_received,
            );
            let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
            if records.len() < RECORDS_PER_TURN {
                records.push(record);
            }
        }
        let answer = match result {
            Ok(value) => value,
            Err(failure) => serde_json::json!({
                "error": {"kind": failure.kind(), "message": failure.message()}
            }),
        };
        serde_json::to_vec(&answer).unwrap_or_default()
    }

    async fn dispatch(
        &self,
        frame: &[u8],
    ) -> (
        std::result::Result<serde_json::Value, Failure>,
        Option<Record>,
    ) {
        #[derive(serde::Deserialize)]
        #[serde(tag = "call", rename_all = "lowercase")]
        enum Call {
            Http(broker::HttpCall),
            Tool {
                name: String,
                #[serde(default)]
                args: Vec<serde_json::Value>,
                #[serde(default)]
                kwargs: serde_json::Map<String, serde_json::Value>,
            },
            Pip(wheels::PipCall),
        }
        let call: Call = match serde_json::from_slice(frame) {
            Ok(call) => call,
            Err(e) => return (Err(Failure::BadCall(format!("not a door call: {e}"))), None),
        };
        let grants = self.grants();
        match call {
            Call::Http(call) => {
                let (answer, record) = self
                    .broker
                    .http(&grants.policy, &self.usage, call, None)
                    .await;
                let value = answer.map(|a| serde_json::to_value(a).unwrap_or_default());
                (value, Some(record))
            }
            Call::Tool { name, args, kwargs } => {
                let Some((url, headers)) = grants.tools.0.get(&name) else {
                    let known = grants.tools.names();
                    let failure = Failure::Tool(format!(
                        "this session has no tool `{name}` (it has {known:?}; name tools at create with `tools`)"
                    ));
                    return (Err(failure), None);
                };
                let payload = serde_json::json!({
                    "tool": name, "session_id": self.session, "args": args, "kwargs": kwargs,
                });
                let (value, mut record) = self
                    .broker
                    .post_json(&grants.policy, &self.usage, url, headers, &payload)
                    .await;
                record.method = name;
                (
                    value.map(|v| serde_json::json!({ "value": v })),
                    Some(record),
                )
            }
            Call::Pip(call) => {
                let started = Instant::now();
                let mut record = Record::new("pip", "install", &call.requirements.join(" "));
                let ctx = wheels::Context {
                    broker: &self.broker,
                    policy: &grants.policy,
                    usage: &self.usage,
                    workspace: &self.workspace,
                };
                let result = self.wheels.install(&ctx, &call).await;
                record.finish(started, &result);
                (result, Some(record))
            }
        }
    }
}

/// The manager's side of every door: the client, the installer and the bounds.
pub struct Egress {
    pub broker: Arc<Broker>,
    pub wheels: Arc<wheels::Installer>,
    pub limits: NetworkLimits,
}

impl Egress {
    pub fn new(limits: NetworkLimits, wheels: wheels::Installer) -> Result<Self> {
        Ok(Self {
            broker: Arc::new(Broker::new()?),
            wheels: Arc::new(wheels),
            limits,
        })
    }

    /// A create's `network` and `tools`, checked into the grants its session gets.
    pub fn grants(
        &self,
        network: Option<&NetworkRequest>,
        tools: Option<&BTreeMap<String, ToolSpec>>,
    ) -> Result<Grants> {
        let policy = match network {
            Some(asked) => Policy::from_request(asked, &self.limits)?,
            None => self.limits.default_policy(),
        };
        Ok(Grants {
            policy,
            tools: Tools::from_request(tools.unwrap_or(&BTreeMap::new()))?,
        })
    }
}
