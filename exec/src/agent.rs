//! The agent's operations, as one trait served over gRPC and HTTP alike: [`LocalAgent`] does
//! them here, [`crate::grpc::RemoteAgent`] asks an agent elsewhere (the manager's side).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use arl_proto::sidecar::{
    ExecLog, ExecRequest, FileRequest, FileResponse, ResetRequest, ResetResponse, ShellInput,
    ShellOutput, SignalRequest, SignalResponse,
};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{ExecError, Result};
use crate::process::{Command, Limits, Processes};
use crate::workspace::Workspace;

/// A command's log as it runs.
pub type ExecStream = BoxStream<'static, Result<ExecLog>>;
/// A terminal's output.
pub type ShellStream = BoxStream<'static, Result<ShellOutput>>;

/// What an agent does.
pub trait Executor: Send + Sync + 'static {
    /// Writes files and applies a unified diff, all or nothing.
    fn update_files(
        &self,
        request: FileRequest,
    ) -> impl Future<Output = Result<FileResponse>> + Send;
    /// Runs a command; its log.
    fn execute(&self, request: ExecRequest) -> impl Future<Output = Result<ExecStream>> + Send;
    /// Signals the group of a process the agent started.
    fn signal(&self, request: SignalRequest)
    -> impl Future<Output = Result<SignalResponse>> + Send;
    /// Kills every process the agent started and, unless asked not to, empties the workspace.
    fn reset(&self, request: ResetRequest) -> impl Future<Output = Result<ResetResponse>> + Send;
    /// A shell on a terminal.
    fn shell(
        &self,
        input: BoxStream<'static, ShellInput>,
    ) -> impl Future<Output = Result<ShellStream>> + Send;
    /// Whether the agent answers.
    fn health(&self) -> impl Future<Output = Result<()>> + Send;
}

/// The agent inside the runtime container: processes started here, files in its workspace.
#[derive(Debug)]
pub struct LocalAgent {
    workspace: Workspace,
    processes: Arc<Processes>,
    shell: String,
}

impl LocalAgent {
    /// An agent over the folder `workspace` (created if needed).
    pub fn new(
        workspace: &std::path::Path,
        limits: Limits,
        shell: String,
    ) -> std::io::Result<Self> {
        Ok(Self {
            workspace: Workspace::open(workspace)?,
            processes: Arc::new(Processes::new(limits)),
            shell,
        })
    }

    pub fn workspace(&self) -> &Workspace {
        &self.workspace
    }

    pub fn processes(&self) -> &Processes {
        &self.processes
    }

    /// `request` as a command, checked: argv, env, folder and deadline.
    fn command(&self, request: ExecRequest) -> Result<Command> {
        if request.command.is_empty() || request.command[0].is_empty() {
            return Err(ExecError::invalid(
                "invalid_command",
                "command is empty: give argv, e.g. [\"bash\", \"-lc\", \"make test\"]",
            ));
        }
        if request.command.iter().any(|a| a.contains('\0')) {
            return Err(ExecError::invalid(
                "invalid_command",
                "an argument holds a NUL byte",
            ));
        }
        for (key, value) in &request.env {
            if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
                return Err(ExecError::invalid(
                    "invalid_env",
                    format!("env name `{key}` must be non-empty, without `=` or NUL"),
                ));
            }
        }
        let timeout = self
            .processes
            .timeout(request.timeout_seconds, request.timeout_ms)?;
        let cwd: PathBuf = self.workspace.folder(&request.working_dir)?;
        let env: BTreeMap<String, String> = request.env.into_iter().collect();
        Ok(Command {
            argv: request.command,
            env: env.into_iter().collect(),
            cwd,
            timeout,
            background: request.background,
        })
    }
}

impl Executor for LocalAgent {
    async fn update_files(&self, request: FileRequest) -> Result<FileResponse> {
        let files: BTreeMap<String, String> = request.files.into_iter().collect();
        let message = self
            .workspace
            .update(&request.base_path, &files, &request.patch)?;
        Ok(FileResponse {
            success: true,
            message,
        })
    }

    async fn execute(&self, request: ExecRequest) -> Result<ExecStream> {
        let command = self.command(request)?;
        let log = self.processes.run(command);
        Ok(ReceiverStream::new(log).map(Ok).boxed())
    }

    async fn signal(&self, request: SignalRequest) -> Result<SignalResponse> {
        let message = self.processes.signal(request.pid, &request.signal)?;
        Ok(SignalResponse {
            success: true,
            message,
        })
    }

    async fn reset(&self, request: ResetRequest) -> Result<ResetResponse> {
        let killed = self.processes.kill_all().await;
        let message = if request.preserve_files {
            format!("killed {killed} process group(s); files kept")
        } else {
            let removed = self.workspace.empty()?;
            format!("killed {killed} process group(s); removed {removed} workspace entries")
        };
        tracing::info!(%message, "reset");
        Ok(ResetResponse {
            success: true,
            message,
        })
    }

    async fn shell(&self, input: BoxStream<'static, ShellInput>) -> Result<ShellStream> {
        let output = crate::shell::open(
            &self.shell,
            self.workspace.root(),
            self.processes.clone(),
            input,
        )?;
        Ok(ReceiverStream::new(output).map(Ok).boxed())
    }

    async fn health(&self) -> Result<()> {
        Ok(())
    }
}
