//! The manager's one HTTP client for every guest: it makes the requests guests ask for
//! through the door, after the session's policy allows them, and connects only to addresses
//! that the policy allows (names resolve to public addresses only; a private address is
//! reached only where a rule names it).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use futures_util::StreamExt;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::policy::{Host, Policy, is_public};
use super::{Failure, Record, Usage};

/// The largest body one response may bring back, whatever the session's budget: it crosses
/// into the guest's memory at once.
pub const MAX_BODY: u64 = 32 << 20;
/// What the broker's requests say they are, unless the guest names itself.
const USER_AGENT: &str = concat!("arl-manager/", env!("CARGO_PKG_VERSION"));

/// One HTTP request as the guest asks it.
#[derive(Debug, serde::Deserialize)]
pub struct HttpCall {
    pub method: String,
    pub url: String,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Base64.
    #[serde(default)]
    pub body: Option<String>,
    /// Seconds the guest's library allows (`urlopen(timeout=...)`); the turn's deadline bounds
    /// it anyway.
    #[serde(default)]
    pub timeout: Option<f64>,
}

/// The answer the guest reads back.
#[derive(Debug, serde::Serialize)]
pub struct HttpAnswer {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    /// Base64.
    pub body: String,
    pub url: String,
}

/// Why a name was not resolved: every address it has is one a name may not lead to.
#[derive(Debug, thiserror::Error)]
#[error(
    "{host} resolves to {addresses}, which is not a public address; only a rule that names an address (as `10.0.0.5:8080`) allows a private one"
)]
struct PrivateName {
    host: String,
    addresses: String,
}

/// Resolves names to their public addresses only, so that hyper connects to nothing else:
/// the check and the connection use the same answer (no DNS rebinding between them).
struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> =
                all.iter().copied().filter(|a| is_public(a.ip())).collect();
            if public.is_empty() && !all.is_empty() {
                let addresses = all
                    .iter()
                    .map(|a| a.ip().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(Box::new(PrivateName { host, addresses }) as _);
            }
            Ok(Box::new(public.into_iter()) as Addrs)
        })
    }
}

/// The shared client.
pub struct Broker {
    client: reqwest::Client,
}

impl Broker {
    pub fn new() -> crate::Result<Self> {
        let client = reqwest::Client::builder()
            .dns_resolver(std::sync::Arc::new(PublicOnly))
            // Redirects are the guest's to follow: each hop is a new request, checked again.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(USER_AGENT)
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| {
                crate::Error::Io("making the egress client".into(), std::io::Error::other(e))
            })?;
        Ok(Self { client })
    }

    /// Makes `call` if `policy` allows it and the session's budget has room, recording it.
    /// `extra` is a URL allowed besides the policy's rules (a host tool's), with a private
    /// address only where it is one.
    pub async fn http(
        &self,
        policy: &Policy,
        usage: &Usage,
        call: HttpCall,
        tool_url: Option<&url::Url>,
    ) -> (std::result::Result<HttpAnswer, Failure>, Record) {
        let started = Instant::now();
        let mut record = Record::new("http", &call.method, &call.url);
        let result = self.make(policy, usage, call, tool_url, &mut record).await;
        record.finish(started, &result);
        (result, record)
    }

    async fn make(
        &self,
        policy: &Policy,
        usage: &Usage,
        call: HttpCall,
        tool_url: Option<&url::Url>,
        record: &mut Record,
    ) -> std::result::Result<HttpAnswer, Failure> {
        let url = url::Url::parse(&call.url)
            .map_err(|e| Failure::BadCall(format!("`{}` is not a URL: {e}", call.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Failure::Refused(format!(
                "`{}`: only http:// and https:// URLs are brokered",
                call.url
            )));
        }
        let (Some(host), Some(port)) = (Host::of(&url), url.port_or_known_default()) else {
            return Err(Failure::BadCall(format!("`{}` has no host", call.url)));
        };
        let by_tool = tool_url.is_some_and(|t| {
            Host::of(t).as_ref() == Some(&host) && t.port_or_known_default() == Some(port)
        });
        if !by_tool && policy.find(&host, port).is_none() {
            let rules = policy.allow_list();
            return Err(Failure::Refused(if rules.is_empty() {
                format!(
                    "{host}:{port}: this session has no network (create it with `network: {{\"allow\": [...]}}`)"
                )
            } else {
                format!("{host}:{port} is not in this session's network allow-list {rules:?}")
            }));
        }
        let method = reqwest::Method::from_bytes(call.method.as_bytes())
            .map_err(|_| Failure::BadCall(format!("`{}` is not an HTTP method", call.method)))?;
        let body = match &call.body {
            Some(b64) => STANDARD
                .decode(b64)
                .map_err(|e| Failure::BadCall(format!("the request body is not base64: {e}")))?,
            None => Vec::new(),
        };
        usage.spend_request(policy, body.len() as u64)?;
        record.bytes_sent = body.len() as u64;
        let mut request = self.client.request(method.clone(), url.clone());
        for (name, value) in &call.headers {
            // The client sets these from the request itself.
            if ["host", "content-length", "transfer-encoding", "connection"]
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h))
            {
                continue;
            }
            request = request.header(name.as_str(), value.as_str());
        }
        if let Some(secs) = call.timeout.filter(|s| s.is_finite() && *s > 0.0) {
            request = request.timeout(Duration::from_secs_f64(secs.min(86_400.0)));
        }
        if !body.is_empty() {
            request = request.body(body);
        }
        let response = request.send().await.map_err(failure)?;
        let status = response.status();
        record.status = Some(status.as_u16());
        let headers = response
            .headers()
            .iter()
            .filter(|(name, _)| *name != reqwest::header::TRANSFER_ENCODING)
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect();
        let room = usage.room(policy).min(MAX_BODY);
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(failure)?;
            if (body.len() + chunk.len()) as u64 > room {
                usage.spend_bytes(body.len() as u64 + chunk.len() as u64);
                record.bytes_received = body.len() as u64 + chunk.len() as u64;
                return Err(Failure::TooLarge(format!(
                    "the response from {host}:{port} passed {room} bytes, the most this session \
                     may still receive (network.max_bytes, and at most {MAX_BODY} per response)"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        usage.spend_bytes(body.len() as u64);
        record.bytes_received = body.len() as u64;
        Ok(HttpAnswer {
            status: status.as_u16(),
            reason: status.canonical_reason().unwrap_or("").to_owned(),
            headers,
            body: STANDARD.encode(&body),
            url: url.to_string(),
        })
    }

    /// POSTs `payload` as JSON to a host tool's `url` (allowed by being the tool's) and returns
    /// the JSON it answers.
    pub async fn post_json(
        &self,
        policy: &Policy,
        usage: &Usage,
        url: &url::Url,
        headers: &[(String, String)],
        payload: &serde_json::Value,
    ) -> (std::result::Result<serde_json::Value, Failure>, Record) {
        let body = serde_json::to_vec(payload).unwrap_or_default();
        let mut all = vec![("content-type".to_owned(), "application/json".to_owned())];
        all.extend(headers.iter().cloned());
        let call = HttpCall {
            method: "POST".into(),
            url: url.to_string(),
            headers: all,
            body: Some(STANDARD.encode(&body)),
            timeout: None,
        };
        let (answer, mut record) = self.http(policy, usage, call, Some(url)).await;
        record.kind = "tool".into();
        let value = answer.and_then(|answer| {
            let body = STANDARD.decode(&answer.body).unwrap_or_default();
            if !(200..300).contains(&answer.status) {
                return Err(Failure::Tool(format!(
                    "{url} answered {} {}: {}",
                    answer.status,
                    answer.reason,
                    String::from_utf8_lossy(&body[..body.len().min(2048)])
                )));
            }
            serde_json::from_slice(&body)
                .map_err(|e| Failure::Tool(format!("{url} did not answer JSON: {e}")))
        });
        (value, record)
    }
}

/// A client error as the guest reads it: refused (by our resolver), timed out, or a
/// connection failure.
fn failure(e: reqwest::Error) -> Failure {
    let chain: Vec<&(dyn std::error::Error + 'static)> =
        std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |err| {
            err.source()
        })
        .collect();
    if let Some(private) = chain
        .iter()
        .find_map(|err| err.downcast_ref::<PrivateName>())
    {
        return Failure::Refused(private.to_string());
    }
    if e.is_timeout() {
        return Failure::Timeout(format!("the request timed out: {e}"));
    }
    let text = chain
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ");
    Failure::Connect(text)
}
