//! The gateway's gRPC side: `arl.v1.Sessions` for every session of the cluster, routed like
//! the HTTP side. A create goes to the least-utilised manager that takes it (of the
//! `arl-pool` metadata's pool, if sent); every other call goes to the manager its session id
//! names. Streams pass through message by message. A session whose manager is gone answers
//! `FAILED_PRECONDITION` (`session_gone`), as an ended session does on a manager.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use arl_proto::v1 as pb;
use arl_proto::v1::sessions_client::SessionsClient;
use arl_proto::v1::sessions_server::{Sessions, SessionsServer};
use arl_serve::Bearer;
use futures_util::{Stream, StreamExt as _};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::fleet::{Fleet, Member, Unplaced};
use crate::gateway::{IMPORT_SPOOL, IMPORTS, LISTING_TIME, owner};

/// Largest gRPC message passed through (a manager's default body limit).
const MAX_MESSAGE: usize = 16 << 20;
/// Metadata key that limits a create to one WarmPool's pods.
pub const POOL_METADATA: &str = "arl-pool";
/// Names the runtime of an import through the gateway (`python` without it).
pub const RUNTIME_METADATA: &str = "arl-runtime";

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// `arl.v1.Sessions` over the fleet. Cheap to clone.
#[derive(Clone)]
pub struct GrpcGateway {
    fleet: Fleet,
    /// One lazily connected channel per manager address.
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// Turns to pass an import on, as over HTTP.
    imports: Arc<tokio::sync::Semaphore>,
}

impl GrpcGateway {
    pub fn new(fleet: Fleet) -> Self {
        Self {
            fleet,
            channels: Arc::default(),
            imports: Arc::new(tokio::sync::Semaphore::new(IMPORTS)),
        }
    }

    /// The service, behind a check of the gateway's bearer `token` when one is set.
    pub fn server(
        self,
        token: Option<&str>,
    ) -> tonic::service::interceptor::InterceptedService<
        SessionsServer<GrpcGateway>,
        impl tonic::service::Interceptor + Clone + use<>,
    > {
        let server = SessionsServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let check = Bearer::new(token)
            .interceptor("send the gateway's token as `authorization: Bearer <token>` metadata");
        tonic::service::interceptor::InterceptedService::new(server, check)
    }

    /// A client for `member`'s gRPC API.
    fn client(&self, member: &Member) -> Result<SessionsClient<Channel>, Status> {
        let addr = member.grpc.as_deref().ok_or_else(|| {
            Status::unavailable(format!("manager {} has no gRPC address", member.name))
        })?;
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let channel = match channels.get(addr) {
            Some(channel) => channel.clone(),
            None => {
                let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| Status::internal(format!("manager address {addr}: {e}")))?
                    .connect_timeout(std::time::Duration::from_secs(2))
                    .tcp_nodelay(true);
                let channel = endpoint.connect_lazy();
                channels.insert(addr.to_owned(), channel.clone());
                channel
            }
        };
        Ok(SessionsClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    /// `message` as a request to `member`, with its token.
    fn to<T>(member: &Member, message: T) -> Result<Request<T>, Status> {
        let mut request = Request::new(message);
        if let Some(token) = &member.endpoint.token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| Status::internal("a manager token is not valid metadata"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }

    /// The manager that owns session `id`, and a client for it.
    fn owner_of(&self, id: &str) -> Result<(Member, SessionsClient<Channel>), Status> {
        let pod = owner(id).ok_or_else(|| {
            Status::not_found(format!(
                "`{id}` is not a session id this gateway handed out (`<namespace>.<pod>.<hex>`)"
            ))
        })?;
        let member = self
            .fleet
            .get(pod)
            .ok_or_else(|| gone(pod, id, "is gone"))?;
        let client = self.client(&member)?;
        Ok((member, client))
    }

    /// Makes `call` with `message` on the manager that owns session `id`: every routed call
    /// but a client-streamed upload goes through here.
    async fn relay<M, T, F, Fut>(
        &self,
        id: &str,
        message: M,
        call: F,
    ) -> Result<Response<T>, Status>
    where
        F: FnOnce(SessionsClient<Channel>, Request<M>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let (member, client) = self.owner_of(id)?;
        let result = call(client, Self::to(&member, message)?).await;
        relayed(result, &member, &self.fleet, id)
    }
}

/// A manager's server stream, passed on message by message.
fn streamed<T: Send + 'static>(response: Response<Streaming<T>>) -> Response<EventStream<T>> {
    Response::new(Box::pin(response.into_inner()))
}

fn gone(pod: &str, id: &str, what: &str) -> Status {
    Status::failed_precondition(format!(
        "session_gone: pod {pod}, which held session {id}, {what}; its sessions are lost"
    ))
}

/// A manager's answer, with a connection failure told as the loss of its sessions.
fn relayed<T>(
    result: Result<Response<T>, Status>,
    member: &Member,
    fleet: &Fleet,
    id: &str,
) -> Result<Response<T>, Status> {
    match result {
        Err(status) if unreachable(&status) => {
            fleet.set_load(&member.key(), None);
            Err(gone(&member.key(), id, "does not answer"))
        }
        other => other.map(|r| Response::new(r.into_inner())),
    }
}

/// A manager's listing, given up after [`LISTING_TIME`] (its size is bounded by the
/// channel's message limit).
async fn bounded<T>(
    call: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<Response<T>, Status> {
    tokio::time::timeout(LISTING_TIME, call)
        .await
        .map_err(|_| Status::deadline_exceeded("the manager's listing took too long"))?
}

/// Whether `status` says the manager could not be reached (a transport error), rather than
/// that it answered.
fn unreachable(status: &Status) -> bool {
    status.code() == Code::Unavailable && std::error::Error::source(status).is_some()
}

#[tonic::async_trait]
impl Sessions for GrpcGateway {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let pool = pool_of(&request);
        let message = request.into_inner();
        let runtime = match message.runtime.as_str() {
            "" => "python".to_owned(),
            named => named.to_owned(),
        };
        self.place(&runtime, pool.as_deref(), |member, mut client| {
            let message = message.clone();
            async move { client.create_session(Self::to(&member, message)?).await }
        })
        .await
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let message = request.into_inner();
        let id = message.id.clone();
        self.relay(
            &id,
            message,
            |mut c, r| async move { c.get_session(r).await },
        )
        .await
    }

    async fn list_sessions(
        &self,
        _: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let members: Vec<Member> = self
            .fleet
            .members()
            .into_iter()
            .filter(|m| m.ready && m.grpc.is_some())
            .collect();
        let calls = members.iter().map(|m| async move {
            let mut client = self.client(m)?;
            let call = client.list_sessions(Self::to(m, pb::ListSessionsRequest {})?);
            bounded(call).await
        });
        let mut sessions = Vec::new();
        for (member, listed) in members
            .iter()
            .zip(futures_util::future::join_all(calls).await)
        {
            match listed {
                Ok(listed) => sessions.extend(listed.into_inner().sessions),
                Err(e) => tracing::warn!(pod = %member.key(), error = %e, "not listed"),
            }
        }
        Ok(Response::new(pb::ListSessionsResponse { sessions }))
    }

    async fn delete_session(
        &self,
        request: Request<pb::DeleteSessionRequest>,
    ) -> Result<Response<pb::DeleteSessionResponse>, Status> {
        let message = request.into_inner();
        let id = message.id.clone();
        self.relay(
            &id,
            message,
            |mut c, r| async move { c.delete_session(r).await },
        )
        .await
    }

    type ExecuteStream = EventStream<pb::ExecuteEvent>;

    async fn execute(
        &self,
        request: Request<pb::ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let message = request.into_inner();
        let id = message.session_id.clone();
        self.relay(&id, message, |mut c, r| async move { c.execute(r).await })
            .await
            .map(streamed)
    }

    async fn write_file(
        &self,
        request: Request<Streaming<pb::WriteFileRequest>>,
    ) -> Result<Response<pb::FileEntry>, Status> {
        let mut incoming = request.into_inner();
        let first = incoming.message().await?.ok_or_else(|| {
            Status::invalid_argument("WriteFile needs a first message naming the session and path")
        })?;
        let id = first.session_id.clone();
        let (member, mut client) = self.owner_of(&id)?;
        // A client stream that breaks must not end the upload as if complete: it cancels the
        // call instead, so the manager keeps no half-written file.
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::WriteFileRequest>(8);
        let (broke, broken) = tokio::sync::oneshot::channel::<Status>();
        tokio::spawn(async move {
            if tx.send(first).await.is_err() {
                return;
            }
            loop {
                match incoming.message().await {
                    Ok(Some(message)) => {
                        if tx.send(message).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        let _ = broke.send(status);
                        // The stream stays open until the call is dropped.
                        tx.closed().await;
                        return;
                    }
                }
            }
        });
        let outgoing = tokio_stream::wrappers::ReceiverStream::new(rx);
        let call = client.write_file(Self::to(&member, outgoing)?);
        tokio::select! {
            result = call => relayed(result, &member, &self.fleet, &id),
            Ok(status) = broken => Err(status),
        }
    }

    type ReadFileStream = EventStream<pb::FileChunk>;

    async fn read_file(
        &self,
        request: Request<pb::ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let message = request.into_inner();
        let id = message.session_id.clone();
        self.relay(&id, message, |mut c, r| async move { c.read_file(r).await })
            .await
            .map(streamed)
    }

    async fn list_files(
        &self,
        request: Request<pb::ListFilesRequest>,
    ) -> Result<Response<pb::ListFilesResponse>, Status> {
        let message = request.into_inner();
        let id = message.session_id.clone();
        self.relay(
            &id,
            message,
            |mut c, r| async move { c.list_files(r).await },
        )
        .await
    }

    async fn delete_file(
        &self,
        request: Request<pb::DeleteFileRequest>,
    ) -> Result<Response<pb::DeleteFileResponse>, Status> {
        let message = request.into_inner();
        let id = message.session_id.clone();
        self.relay(
            &id,
            message,
            |mut c, r| async move { c.delete_file(r).await },
        )
        .await
    }

    async fn get_load(&self, _: Request<pb::GetLoadRequest>) -> Result<Response<pb::Load>, Status> {
        let total = self.fleet.total_load();
        Ok(Response::new(pb::Load {
            sessions: total.sessions,
            capacity: total.capacity,
            memory_bytes: total.memory_bytes,
            draining: false,
        }))
    }

    async fn drain(&self, _: Request<pb::DrainRequest>) -> Result<Response<pb::Load>, Status> {
        Err(Status::unimplemented(
            "the gateway does not drain: drain a manager itself, or scale its WarmPool down",
        ))
    }

    type GetHistoryStream = EventStream<pb::HistoryEntry>;

    async fn get_history(
        &self,
        request: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<Self::GetHistoryStream>, Status> {
        let message = request.into_inner();
        let id = message.session_id.clone();
        self.relay(
            &id,
            message,
            |mut c, r| async move { c.get_history(r).await },
        )
        .await
        .map(streamed)
    }

    async fn fork_session(
        &self,
        request: Request<pb::ForkSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let message = request.into_inner();
        let id = message.id.clone();
        self.relay(
            &id,
            message,
            |mut c, r| async move { c.fork_session(r).await },
        )
        .await
    }

    async fn snapshot_session(
        &self,
        request: Request<pb::SnapshotSessionRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let message = request.into_inner();
        let id = message.id.clone();
        self.relay(&id, message, |mut c, r| async move {
            c.snapshot_session(r).await
        })
        .await
    }

    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let message = request.into_inner();
        self.first_found(|member, mut client| {
            let message = message.clone();
            async move { client.get_snapshot(Self::to(&member, message)?).await }
        })
        .await
    }

    async fn list_snapshots(
        &self,
        _: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let mut snapshots: Vec<pb::Snapshot> = Vec::new();
        for member in self.grpc_members() {
            let mut client = self.client(&member)?;
            let call = client.list_snapshots(Self::to(&member, pb::ListSnapshotsRequest {})?);
            match bounded(call).await {
                Ok(listed) => snapshots.extend(listed.into_inner().snapshots),
                Err(e) => tracing::warn!(pod = %member.key(), error = %e, "snapshots not listed"),
            }
        }
        // Managers that share a snapshot folder list the same ones.
        snapshots.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        snapshots.dedup_by(|a, b| a.id == b.id);
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let message = request.into_inner();
        self.first_found(|member, mut client| {
            let message = message.clone();
            async move { client.delete_snapshot(Self::to(&member, message)?).await }
        })
        .await
    }

    type ExportSessionStream = EventStream<pb::SnapshotChunk>;

    async fn export_session(
        &self,
        request: Request<pb::ExportSessionRequest>,
    ) -> Result<Response<Self::ExportSessionStream>, Status> {
        let message = request.into_inner();
        let id = message.id.clone();
        self.relay(
            &id,
            message,
            |mut c, r| async move { c.export_session(r).await },
        )
        .await
        .map(streamed)
    }

    /// Placed like a create (the runtime from `arl-runtime` metadata, `python` without it):
    /// the export is held here whole, so that it can go to another manager if one is full.
    async fn import_session(
        &self,
        request: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::Session>, Status> {
        let pool = pool_of(&request);
        let runtime = request
            .metadata()
            .get(RUNTIME_METADATA)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("python")
            .to_owned();
        let Ok(_turn) = self.imports.clone().try_acquire_owned() else {
            return Err(Status::unavailable(format!(
                "imports_busy: the gateway is passing {IMPORTS} imports on already; retry shortly"
            )));
        };
        // Up to IMPORT_SPOOL, held and offered to each candidate in turn; past it, streamed
        // through to the first candidate alone, never held whole.
        let mut incoming = request.into_inner();
        let (mut held, mut size) = (Vec::new(), 0);
        while size <= IMPORT_SPOOL {
            match incoming.message().await? {
                Some(chunk) => {
                    size += chunk.data.len();
                    held.push(chunk);
                }
                None => {
                    return self
                        .place(&runtime, pool.as_deref(), |member, mut client| {
                            let chunks = held.clone();
                            async move {
                                let stream = futures_util::stream::iter(chunks);
                                client.import_session(Self::to(&member, stream)?).await
                            }
                        })
                        .await;
                }
            }
        }
        // A failed read ends the stream: the manager sees the import cut short and refuses it.
        let rest = incoming
            .take_while(|chunk| std::future::ready(chunk.is_ok()))
            .filter_map(|chunk| std::future::ready(chunk.ok()));
        let mut whole = Some(futures_util::stream::iter(held).chain(rest));
        self.place(&runtime, pool.as_deref(), move |member, mut client| {
            let stream = whole.take();
            async move {
                let Some(stream) = stream else {
                    return Err(Status::resource_exhausted(format!(
                        "capacity_exhausted: the manager chosen for this import is full, and an \
                         import over {IMPORT_SPOOL} bytes is not held to offer to another"
                    )));
                };
                client.import_session(Self::to(&member, stream)?).await
            }
        })
        .await
    }
}

/// The `arl-pool` metadata of a request, if any.
fn pool_of<T>(request: &Request<T>) -> Option<String> {
    request
        .metadata()
        .get(POOL_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

impl GrpcGateway {
    /// Ready managers with a gRPC address.
    fn grpc_members(&self) -> Vec<Member> {
        self.fleet
            .members()
            .into_iter()
            .filter(|m| m.ready && m.grpc.is_some())
            .collect()
    }

    /// Makes `call` on the least-utilised manager serving `runtime` (in `pool`, when given)
    /// that takes it: a full or unreachable one passes it to the next.
    async fn place<T, F, Fut>(
        &self,
        runtime: &str,
        pool: Option<&str>,
        mut call: F,
    ) -> Result<Response<T>, Status>
    where
        F: FnMut(Member, SessionsClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let candidates = match self.fleet.place(runtime, pool, |m| m.grpc.is_some()) {
            Ok(candidates) => candidates,
            Err(Unplaced::Full) => {
                return Err(Status::resource_exhausted(
                    "capacity_exhausted: every manager for this runtime is full or draining",
                ));
            }
            Err(Unplaced::NoBackends) => {
                return Err(Status::unavailable(format!(
                    "no_backends: no manager serves runtime `{runtime}` over gRPC"
                )));
            }
        };
        let mut last = None;
        for member in candidates {
            let client = self.client(&member)?;
            let name = member.key();
            match call(member, client).await {
                Ok(created) => {
                    self.fleet.note_placed(&name);
                    return Ok(Response::new(created.into_inner()));
                }
                Err(status) if status.code() == Code::ResourceExhausted => {
                    self.fleet.note_full(&name);
                    last = Some(status);
                }
                Err(status) if status.code() == Code::Unavailable => {
                    if unreachable(&status) {
                        self.fleet.set_load(&name, None);
                    }
                    last = Some(status);
                }
                Err(status) => return Err(status),
            }
        }
        Err(last.unwrap_or_else(|| Status::unavailable("no_backends: no manager answered")))
    }

    /// Asks every ready manager in turn until one does not answer NOT_FOUND: snapshots are
    /// not routed by id (managers may share one snapshot folder).
    async fn first_found<T, F, Fut>(&self, mut call: F) -> Result<Response<T>, Status>
    where
        F: FnMut(Member, SessionsClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let mut last = Status::not_found("snapshot_not_found: no manager has this snapshot");
        for member in self.grpc_members() {
            let client = self.client(&member)?;
            match call(member, client).await {
                Ok(found) => return Ok(Response::new(found.into_inner())),
                Err(status) if status.code() == Code::NotFound => last = status,
                Err(status) if unreachable(&status) => {}
                Err(status) => return Err(status),
            }
        }
        Err(last)
    }
}

/// Serves the gateway's `arl.v1.Sessions` and `grpc.health.v1.Health` on `listener` until
/// `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gateway: GrpcGateway,
    token: Option<&str>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in ["", "arl.v1.Sessions"] {
        reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let incoming = arl_serve::grpc_incoming(listener);
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(gateway.server(token))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
