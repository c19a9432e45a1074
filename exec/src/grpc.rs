//! `arl.sidecar.AgentService` over tonic: [`AgentGrpc`] serves any [`Executor`], and
//! [`RemoteAgent`] is an [`Executor`] that asks an agent over gRPC (a Unix socket or TCP).
//! The manager in front of a container runtime serves a `RemoteAgent` with the same
//! `AgentGrpc`, so the seeds' clients reach the agent through it unchanged.

use std::path::PathBuf;
use std::sync::Arc;

use arl_proto::sidecar::agent_service_client::AgentServiceClient;
use arl_proto::sidecar::agent_service_server::{AgentService, AgentServiceServer};
use arl_proto::sidecar::{
    ExecLog, ExecRequest, FileRequest, FileResponse, ResetRequest, ResetResponse, ShellInput,
    ShellOutput, SignalRequest, SignalResponse,
};
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, future};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status, Streaming};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::Address;
use crate::agent::{ExecStream, Executor, ShellStream};
use crate::error::{ExecError, Kind, Result};

/// Serves an [`Executor`] as `arl.sidecar.AgentService`.
pub struct AgentGrpc<E>(pub Arc<E>);

impl<E: Executor> AgentGrpc<E> {
    /// The tonic service, taking messages of up to `max_message` bytes.
    pub fn server(executor: Arc<E>, max_message: usize) -> AgentServiceServer<Self> {
        AgentServiceServer::new(Self(executor))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message)
    }
}

type StatusStream<T> = BoxStream<'static, Result<T, Status>>;

#[tonic::async_trait]
impl<E: Executor> AgentService for AgentGrpc<E> {
    async fn update_files(
        &self,
        request: Request<FileRequest>,
    ) -> Result<Response<FileResponse>, Status> {
        Ok(Response::new(
            self.0.update_files(request.into_inner()).await?,
        ))
    }

    type ExecuteStream = StatusStream<ExecLog>;

    async fn execute(
        &self,
        request: Request<ExecRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let log = self.0.execute(request.into_inner()).await?;
        Ok(Response::new(log.map(|r| r.map_err(Status::from)).boxed()))
    }

    async fn signal_process(
        &self,
        request: Request<SignalRequest>,
    ) -> Result<Response<SignalResponse>, Status> {
        Ok(Response::new(self.0.signal(request.into_inner()).await?))
    }

    async fn reset(
        &self,
        request: Request<ResetRequest>,
    ) -> Result<Response<ResetResponse>, Status> {
        Ok(Response::new(self.0.reset(request.into_inner()).await?))
    }

    type InteractiveShellStream = StatusStream<ShellOutput>;

    async fn interactive_shell(
        &self,
        request: Request<Streaming<ShellInput>>,
    ) -> Result<Response<Self::InteractiveShellStream>, Status> {
        let input = request
            .into_inner()
            .take_while(|m| future::ready(m.is_ok()))
            .filter_map(|m| future::ready(m.ok()))
            .boxed();
        let output = self.0.shell(input).await?;
        Ok(Response::new(
            output.map(|r| r.map_err(Status::from)).boxed(),
        ))
    }
}

/// An agent reached over gRPC. Connects lazily: made before the agent is up, it answers
/// `agent_unavailable` (503) until it is.
#[derive(Debug, Clone)]
pub struct RemoteAgent {
    client: AgentServiceClient<Channel>,
    health: HealthClient<Channel>,
}

impl RemoteAgent {
    pub fn new(address: &Address) -> Result<Self> {
        let channel = match address {
            Address::Tcp(addr) => Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| ExecError::invalid("invalid_request", e.to_string()))?
                .tcp_nodelay(true)
                .connect_lazy(),
            Address::Unix(path) => {
                let path: Arc<PathBuf> = Arc::new(path.clone());
                // The URI is not used: every connection is to the socket.
                Endpoint::from_static("http://agent.local").connect_with_connector_lazy(
                    tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(&*path).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(stream))
                        }
                    }),
                )
            }
        };
        Ok(Self {
            client: AgentServiceClient::new(channel.clone())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
            health: HealthClient::new(channel),
        })
    }
}

impl Executor for RemoteAgent {
    async fn update_files(&self, request: FileRequest) -> Result<FileResponse> {
        Ok(self
            .client
            .clone()
            .update_files(request)
            .await?
            .into_inner())
    }

    async fn execute(&self, request: ExecRequest) -> Result<ExecStream> {
        let log = self.client.clone().execute(request).await?.into_inner();
        Ok(log.map(|r| r.map_err(ExecError::from)).boxed())
    }

    async fn signal(&self, request: SignalRequest) -> Result<SignalResponse> {
        Ok(self
            .client
            .clone()
            .signal_process(request)
            .await?
            .into_inner())
    }

    async fn reset(&self, request: ResetRequest) -> Result<ResetResponse> {
        Ok(self.client.clone().reset(request).await?.into_inner())
    }

    async fn shell(&self, input: BoxStream<'static, ShellInput>) -> Result<ShellStream> {
        // Through a channel: tonic's request stream must be `Sync`, a boxed stream is not.
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut input = input;
        tokio::spawn(async move {
            while let Some(message) = input.next().await {
                if tx.send(message).await.is_err() {
                    break;
                }
            }
        });
        let input = tokio_stream::wrappers::ReceiverStream::new(rx);
        let output = self
            .client
            .clone()
            .interactive_shell(input)
            .await?
            .into_inner();
        Ok(output.map(|r| r.map_err(ExecError::from)).boxed())
    }

    async fn health(&self) -> Result<()> {
        let answer = self
            .health
            .clone()
            .check(HealthCheckRequest::default())
            .await?
            .into_inner();
        match answer.status {
            1 => Ok(()), // SERVING
            _ => Err(ExecError::new(
                Kind::Unavailable,
                "agent_unavailable",
                "the agent is not serving",
            )),
        }
    }
}
