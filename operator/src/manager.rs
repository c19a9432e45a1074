//! Calls to `arl-manager` pods: load, drain, and the sessions of Sandboxes.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

/// A manager's `/v1/load`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Load {
    pub sessions: u64,
    pub capacity: u64,
    #[serde(default)]
    pub memory_bytes: u64,
    #[serde(default)]
    pub draining: bool,
}

impl Load {
    /// Share of the capacity in use; full when there is none.
    pub fn utilization(&self) -> f64 {
        if self.capacity == 0 {
            1.0
        } else {
            self.sessions as f64 / self.capacity as f64
        }
    }
}

/// Where one manager answers and how to authenticate to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `http://ip:port`, no trailing slash.
    pub http: String,
    /// Bearer token, if the manager wants one.
    pub token: Option<String>,
}

/// A session a manager created.
#[derive(Debug, Clone, Deserialize)]
pub struct Created {
    pub id: String,
}

/// How a session lookup went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    Live,
    /// Ended, with the manager's reason.
    Ended(String),
    /// The manager does not know it.
    Unknown,
    /// A drain moved it through the store: the manager (its id prefix) that holds it now, or
    /// none yet (any manager sharing the store resumes it).
    Moved(Option<String>),
}

/// An HTTP client for managers, with short timeouts: a pod that does not answer is skipped,
/// not waited for.
#[derive(Clone, Debug)]
pub struct Managers {
    http: reqwest::Client,
}

impl Default for Managers {
    fn default() -> Self {
        Self::new()
    }
}

impl Managers {
    pub fn new() -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .build()
            .unwrap_or_default();
        Self { http }
    }

    fn request(
        &self,
        method: reqwest::Method,
        at: &Endpoint,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", at.http));
        match &at.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    async fn send(&self, at: &Endpoint, builder: reqwest::RequestBuilder) -> Result<(u16, Value)> {
        let response = builder.send().await.map_err(|e| Error::Manager {
            url: at.http.clone(),
            status: None,
            code: "unreachable".into(),
            message: e.to_string(),
        })?;
        let status = response.status().as_u16();
        let body = response.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    fn refused(at: &Endpoint, status: u16, body: &Value) -> Error {
        let error = &body["error"];
        Error::Manager {
            url: at.http.clone(),
            status: Some(status),
            code: error["code"].as_str().unwrap_or("unexpected").to_owned(),
            message: error["message"]
                .as_str()
                .map_or_else(|| body.to_string(), str::to_owned),
        }
    }

    /// `GET /v1/load`.
    pub async fn load(&self, at: &Endpoint) -> Result<Load> {
        let (status, body) = self
            .send(at, self.request(reqwest::Method::GET, at, "/v1/load"))
            .await?;
        if status != 200 {
            return Err(Self::refused(at, status, &body));
        }
        serde_json::from_value(body).map_err(|e| Error::Manager {
            url: at.http.clone(),
            status: Some(status),
            code: "bad_load".into(),
            message: e.to_string(),
        })
    }

    /// `POST /v1/drain` (`on`; with `move_sessions`, the sessions move out through the store
    /// the pool's managers share) or `DELETE /v1/drain`.
    pub async fn drain(&self, at: &Endpoint, on: bool, move_sessions: bool) -> Result<()> {
        let (method, path) = match (on, move_sessions) {
            (true, true) => (reqwest::Method::POST, "/v1/drain?move_sessions=true"),
            (true, false) => (reqwest::Method::POST, "/v1/drain"),
            (false, _) => (reqwest::Method::DELETE, "/v1/drain"),
        };
        let (status, body) = self.send(at, self.request(method, at, path)).await?;
        if !(200..300).contains(&status) {
            return Err(Self::refused(at, status, &body));
        }
        Ok(())
    }

    /// `POST /v1/sessions` with `request` as the body.
    pub async fn create_session(&self, at: &Endpoint, request: &Value) -> Result<Created> {
        let builder = self
            .request(reqwest::Method::POST, at, "/v1/sessions")
            .json(request);
        let (status, body) = self.send(at, builder).await?;
        if status != 201 {
            return Err(Self::refused(at, status, &body));
        }
        serde_json::from_value(body.clone()).map_err(|_| Self::refused(at, status, &body))
    }

    /// `GET /v1/sessions/{id}`.
    pub async fn session(&self, at: &Endpoint, id: &str) -> Result<SessionState> {
        let path = format!("/v1/sessions/{id}");
        let (status, body) = self
            .send(at, self.request(reqwest::Method::GET, at, &path))
            .await?;
        match status {
            200 => Ok(SessionState::Live),
            404 => Ok(SessionState::Unknown),
            421 => Ok(SessionState::Moved(
                body["error"]["reason"]
                    .as_str()
                    .filter(|owner| !owner.is_empty())
                    .map(str::to_owned),
            )),
            410 => Ok(SessionState::Ended(
                body["error"]["message"]
                    .as_str()
                    .unwrap_or("ended")
                    .to_owned(),
            )),
            _ => Err(Self::refused(at, status, &body)),
        }
    }

    /// `DELETE /v1/sessions/{id}`; a session already gone counts as deleted.
    pub async fn delete_session(&self, at: &Endpoint, id: &str) -> Result<()> {
        let path = format!("/v1/sessions/{id}");
        let (status, body) = self
            .send(at, self.request(reqwest::Method::DELETE, at, &path))
            .await?;
        match status {
            200..=299 | 404 | 410 => Ok(()),
            _ => Err(Self::refused(at, status, &body)),
        }
    }

    /// A call to a session route with a JSON body (or none), with its own deadline: a step of
    /// a Task may run for minutes. Answers the status and the JSON body (`null` if none).
    pub async fn call(
        &self,
        at: &Endpoint,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(u16, Value)> {
        let mut builder = self.request(method, at, path).timeout(timeout);
        if let Some(body) = body {
            builder = builder.json(body);
        }
        self.send(at, builder).await
    }

    /// `GET /v1/sessions/{id}/files/{path}` as text; `None` when there is no such file.
    pub async fn read_file(
        &self,
        at: &Endpoint,
        id: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<Option<String>> {
        let url = format!("/v1/sessions/{id}/files/{}", encode_path(path));
        let response = self
            .request(reqwest::Method::GET, at, &url)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| unreachable(at, &e))?;
        let status = response.status().as_u16();
        if status == 200 {
            let text = response.text().await.map_err(|e| unreachable(at, &e))?;
            return Ok(Some(text));
        }
        let body = response.json::<Value>().await.unwrap_or(Value::Null);
        match (status, body["error"]["code"].as_str()) {
            (404, Some("file_not_found")) => Ok(None),
            _ => Err(Self::refused(at, status, &body)),
        }
    }

    /// `PUT /v1/sessions/{id}/files/{path}` with `content`.
    pub async fn write_file(
        &self,
        at: &Endpoint,
        id: &str,
        path: &str,
        content: String,
        timeout: Duration,
    ) -> Result<()> {
        let url = format!("/v1/sessions/{id}/files/{}", encode_path(path));
        let builder = self
            .request(reqwest::Method::PUT, at, &url)
            .timeout(timeout)
            .body(content);
        let (status, body) = self.send(at, builder).await?;
        if !(200..300).contains(&status) {
            return Err(Self::refused(at, status, &body));
        }
        Ok(())
    }
}

fn unreachable(at: &Endpoint, e: &reqwest::Error) -> Error {
    Error::Manager {
        url: at.http.clone(),
        status: None,
        code: "unreachable".into(),
        message: e.to_string(),
    }
}

/// A workspace path as URL path segments: each segment percent-encoded, `/` kept.
fn encode_path(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            percent_encoding::utf8_percent_encode(seg, percent_encoding::NON_ALPHANUMERIC)
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("/")
}
