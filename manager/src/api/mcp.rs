//! ARL as an MCP server (`/mcp`, streamable HTTP, with the official Rust SDK `rmcp`): tools that
//! open sessions, run code in them (images come back as MCP image content) and work on their
//! files. It is served statelessly: every call stands alone, its state is the sessions', so a
//! gateway can route each call by the session it names.

use std::sync::Arc;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, ServerHandler, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::files::FileView;
use super::sessions::ExecuteResponse;
use crate::files::{self, on_workspace};
use crate::registry::{CreateRequest, Registry};
use crate::{Error, Outcome};

/// The biggest file `read_file` answers with, and `write_file` takes.
const MAX_FILE_BYTES: usize = 8 << 20;

/// The MCP service, for `Router::nest_service("/mcp", ...)`. `any_host`: accept any `Host`
/// (behind a token); otherwise only loopback names, against DNS rebinding.
pub fn service(
    registry: Registry,
    any_host: bool,
) -> StreamableHttpService<Tools, LocalSessionManager> {
    let mut config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true);
    if any_host {
        config = config.disable_allowed_hosts();
    }
    StreamableHttpService::new(
        move || Ok(Tools::new(registry.clone())),
        Arc::new(LocalSessionManager::default()),
        config,
    )
}

/// The tools, over one manager's sessions.
#[derive(Clone)]
pub struct Tools {
    registry: Registry,
    tool_router: ToolRouter<Self>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct CreateArgs {
    /// The runtime; `python` when absent.
    pub runtime: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ExecuteArgs {
    /// The code to run, as a notebook cell: the last expression's value is the result.
    pub code: String,
    /// A session from `create_session`, whose variables carry between calls; without one, a
    /// fresh Python session runs this call alone and is deleted after.
    pub session_id: Option<String>,
    /// Deadline in milliseconds; the session's own when absent.
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SessionArgs {
    pub session_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ListArgs {
    pub session_id: String,
    /// A folder relative to the session's /workspace; the workspace itself when absent.
    pub path: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct FileArgs {
    pub session_id: String,
    /// Relative to the session's /workspace.
    pub path: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct WriteArgs {
    pub session_id: String,
    /// Relative to the session's /workspace; missing folders are made.
    pub path: String,
    /// The file's text (UTF-8).
    pub content: String,
}

/// A refusal as the tool's error result, which the model reads (not a protocol error).
fn refused(e: &Error) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(e.public_message())])
}

fn json_text(value: &impl serde::Serialize) -> ContentBlock {
    ContentBlock::text(serde_json::to_string_pretty(value).unwrap_or_default())
}

/// An outcome as MCP content: the execution as JSON text (without its bundles' images), then
/// each PNG or JPEG it displayed as image content.
fn executed(outcome: Outcome) -> CallToolResult {
    let failed = outcome.error.is_some() || outcome.ended.is_some();
    let mut view = ExecuteResponse::from(outcome);
    let mut images = Vec::new();
    for bundle in &mut view.results {
        for mime in ["image/png", "image/jpeg"] {
            if let Some(serde_json::Value::String(data)) = bundle.remove(mime) {
                images.push(ContentBlock::image(data, mime));
                bundle.insert(mime.into(), json!("(sent as image content)"));
            }
        }
    }
    let content = std::iter::once(json_text(&view)).chain(images).collect();
    if failed {
        CallToolResult::error(content)
    } else {
        CallToolResult::success(content)
    }
}

/// A tool's answer: ARL's refusals become error results the model reads.
fn answer(result: crate::Result<CallToolResult>) -> Result<CallToolResult, ErrorData> {
    Ok(result.unwrap_or_else(|e| refused(&e)))
}

#[tool_router]
impl Tools {
    fn new(registry: Registry) -> Self {
        Self {
            registry,
            tool_router: Self::tool_router(),
        }
    }

    /// Opens a session: an interpreter whose variables, imports and files last until it is
    /// deleted (or idles past the manager's TTL).
    #[tool(
        description = "Open a sandboxed Python session whose state (variables, imports, files in /workspace) carries across execute calls. Returns its session_id."
    )]
    async fn create_session(
        &self,
        Parameters(args): Parameters<CreateArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let request = CreateRequest {
            runtime: args.runtime,
            ..CreateRequest::default()
        };
        answer(self.registry.create(request).await.map(|session| {
            let created = json!({ "session_id": session.id, "runtime": session.runtime });
            CallToolResult::success(vec![json_text(&created)])
        }))
    }

    #[tool(
        description = "Run Python code in a sandbox, as a notebook cell. With session_id, in that session (state kept); without, in a fresh session for this call only. Returns stdout, stderr, the last expression's value (result), any error with its traceback, and displayed images."
    )]
    async fn execute(
        &self,
        Parameters(args): Parameters<ExecuteArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        answer(self.run(args).await)
    }

    async fn run(&self, args: ExecuteArgs) -> crate::Result<CallToolResult> {
        let timeout = self.registry.check_timeout(args.timeout_ms)?;
        let Some(id) = &args.session_id else {
            let session = self.registry.create(CreateRequest::default()).await?;
            session.forgo_rollback(); // one call, then it is deleted
            let outcome = session.execute(args.code, timeout, None).await;
            self.registry.discard(&session.id);
            return outcome.map(executed);
        };
        let session = self.registry.get(id).await?;
        session
            .execute(args.code, timeout, None)
            .await
            .map(executed)
    }

    #[tool(
        description = "List the files and folders in a session's /workspace (or a folder in it)."
    )]
    async fn list_files(
        &self,
        Parameters(args): Parameters<ListArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let listed = async {
            let session = self.registry.get(&args.session_id).await?;
            let path = args.path.unwrap_or_default();
            let entries = on_workspace(session.workspace.clone(), move |w| w.list(&path)).await?;
            let views: Vec<FileView> = entries.into_iter().map(Into::into).collect();
            Ok(CallToolResult::success(vec![json_text(&views)]))
        };
        answer(listed.await)
    }

    #[tool(description = "Read a text file from a session's /workspace (at most 8 MiB).")]
    async fn read_file(
        &self,
        Parameters(args): Parameters<FileArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let read = async {
            let session = self.registry.get(&args.session_id).await?;
            let path = args.path.clone();
            let bytes = on_workspace(session.workspace.clone(), move |w| {
                let (mut file, len) = w.open_file(&path)?;
                if len > MAX_FILE_BYTES as u64 {
                    return Err(Error::InvalidRequest(format!(
                        "{path} is {len} bytes, over the {MAX_FILE_BYTES} read_file answers with"
                    )));
                }
                let mut bytes = Vec::with_capacity(len as usize);
                std::io::Read::read_to_end(&mut file, &mut bytes)
                    .map_err(|e| Error::Io("reading a file".into(), e))?;
                Ok(bytes)
            })
            .await?;
            Ok(match String::from_utf8(bytes) {
                Ok(text) => CallToolResult::success(vec![ContentBlock::text(text)]),
                Err(_) => CallToolResult::error(vec![ContentBlock::text(format!(
                    "{} is not UTF-8 text: fetch it through the files API",
                    args.path
                ))]),
            })
        };
        answer(read.await)
    }

    #[tool(
        description = "Write a text file into a session's /workspace (at most 8 MiB), replacing one there."
    )]
    async fn write_file(
        &self,
        Parameters(args): Parameters<WriteArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        if args.content.len() > MAX_FILE_BYTES {
            return Err(ErrorData::invalid_params(
                format!("content is over {MAX_FILE_BYTES} bytes"),
                None,
            ));
        }
        let written = async {
            let session = self.registry.get(&args.session_id).await?;
            let data = bytes::Bytes::from(args.content.into_bytes());
            let once = futures_util::stream::once(async move { Ok(data) });
            let (entry, _) = files::upload(session.workspace.clone(), args.path, once).await?;
            Ok(CallToolResult::success(vec![json_text(&FileView::from(
                entry,
            ))]))
        };
        answer(written.await)
    }

    #[tool(description = "Delete a session, ending its interpreter and removing its files.")]
    async fn delete_session(
        &self,
        Parameters(args): Parameters<SessionArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        answer(self.registry.delete(&args.session_id).await.map(|()| {
            let said = format!("session {} deleted", args.session_id);
            CallToolResult::success(vec![ContentBlock::text(said)])
        }))
    }
}

#[tool_handler(
    router = self.tool_router,
    name = "arl",
    instructions = "Sandboxed, stateful Python sessions (numpy, pandas, scipy, matplotlib). create_session, then execute code in it as notebook cells; files live in /workspace."
)]
impl ServerHandler for Tools {}
