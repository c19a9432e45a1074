//! The gRPC adapter over [`Registry`]: `arl.v1.Sessions` (proto/arl/v1/sessions.proto) and the
//! standard `grpc.health.v1.Health`. Same checks and limits as HTTP; errors map as the proto
//! file's header says.

use std::pin::Pin;
use std::time::Duration;

use arl_proto::v1 as pb;
use arl_proto::v1::sessions_server::{Sessions, SessionsServer};
use arl_serve::Bearer;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::files::{self, Entry, READ_CHUNK, on_workspace};
use crate::metrics::Load;
use crate::output;
use crate::registry::{CreateRequest, Registry};
use crate::session::{HistoryEntry, Info, Limits, Outcome, TurnEvent};
use crate::snapshots::SnapshotInfo;
use crate::{Error, Result, rfc3339};

/// The name health checks use for the session service.
pub const SERVICE: &str = "arl.v1.Sessions";

/// Maps a core error to the gRPC status with the same meaning as its HTTP answer.
pub fn status(e: Error) -> Status {
    let code = match &e {
        e if e.exhausted().is_some() => {
            tracing::error!(error = %e, "out of resources");
            Code::Unavailable
        }
        Error::UnknownRuntime(..)
        | Error::UnknownLanguage(..)
        | Error::InvalidRequest(_)
        | Error::BadPath(..) => Code::InvalidArgument,
        Error::BadSnapshot(_) | Error::ModuleMismatch(..) => Code::InvalidArgument,
        Error::Full(_) | Error::QuotaExceeded(_) | Error::DiskFull(_) => Code::ResourceExhausted,
        Error::NotFound(_) | Error::FileNotFound(_) | Error::SnapshotNotFound(_) => Code::NotFound,
        Error::Refused(_) | Error::Moved(_) => Code::FailedPrecondition,
        Error::StoreUnavailable(_) => Code::Unavailable,
        Error::Ended(_) => Code::FailedPrecondition,
        Error::Busy(_) => Code::Aborted,
        Error::NotReady | Error::Draining | Error::ShuttingDown => Code::Unavailable,
        Error::Io(..) | Error::Instantiate(_) | Error::Engine(_) | Error::Runtime(_) => {
            tracing::error!(error = %e, "internal error");
            Code::Internal
        }
    };
    Status::new(code, e.public_message())
}

/// `arl.v1.Sessions` over a registry.
#[derive(Clone)]
pub struct SessionService {
    registry: Registry,
}

impl SessionService {
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }

    /// The service behind the bearer-token check, with messages up to `max_message` bytes.
    pub fn server(
        self,
        auth: Bearer,
        max_message: usize,
    ) -> tonic::service::interceptor::InterceptedService<
        SessionsServer<SessionService>,
        impl tonic::service::Interceptor + Clone,
    > {
        let server = SessionsServer::new(self)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        let check = auth.interceptor(
            "this manager needs `authorization: Bearer <token>` metadata (its --auth-token)",
        );
        tonic::service::interceptor::InterceptedService::new(server, check)
    }
}

/// Keeps the health service's answers true: `NOT_SERVING` until a runtime is loaded, then
/// `SERVING` until `stopped` resolves.
pub async fn report_health(
    registry: Registry,
    reporter: HealthReporter,
    stopped: impl Future<Output = ()>,
) {
    let set = |status| {
        let reporter = reporter.clone();
        async move {
            for name in ["", SERVICE] {
                reporter.set_service_status(name, status).await;
            }
        }
    };
    set(ServingStatus::NotServing).await;
    let ready = async {
        while !registry.ready() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        set(ServingStatus::Serving).await;
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = ready => {}
        () = stopped => {}
    }
    set(ServingStatus::NotServing).await;
}

fn limits(l: Limits) -> pb::Limits {
    pb::Limits {
        timeout_ms: l.timeout.as_millis() as u64,
        memory_mib: l.memory_bytes >> 20,
        output_bytes: l.output_bytes as u64,
        idle_ttl_s: l.idle_ttl.as_secs(),
        lifetime_s: l.lifetime.as_secs(),
        workspace_bytes: l.workspace_bytes,
        rollback: l.rollback,
    }
}

fn snapshot(info: SnapshotInfo) -> pb::Snapshot {
    let h = info.header;
    pb::Snapshot {
        id: info.id,
        runtime: h.runtime,
        module: h.module,
        source_session: h.source,
        created_at: h.captured_at,
        memory_bytes: h.memory_bytes,
        state_bytes: h.pages * h.page_size,
        files: h.files.len() as u64,
        size_bytes: info.size_bytes,
        executions: h.executions,
    }
}

fn history_entry(e: HistoryEntry) -> pb::HistoryEntry {
    pb::HistoryEntry {
        n: e.n,
        started_at: e.started_at,
        code: e.code,
        stdout: e.stdout,
        stderr: e.stderr,
        result: e.result,
        error: e.error.map(guest_error),
        duration_ms: e.duration_ms,
        rolled_back: e.rolled_back,
        rollback_reason: e.rollback_reason,
        end_reason: e.end_reason,
        clipped: e.clipped,
    }
}

fn guest_error(e: arl_runtimes::GuestError) -> pb::GuestError {
    pb::GuestError {
        r#type: e.kind,
        message: e.message,
        traceback: e.traceback,
    }
}

fn session(i: Info) -> pb::Session {
    pb::Session {
        id: i.id,
        runtime: i.runtime,
        state: i.state.name().into(),
        created_at: rfc3339(i.created_at),
        last_used_at: rfc3339(i.last_used_at),
        executions: i.executions,
        memory_bytes: i.memory_bytes,
        limits: Some(limits(i.limits)),
        metadata: (*i.metadata).clone().into_iter().collect(),
    }
}

fn result(o: Outcome) -> pb::ExecuteResult {
    pb::ExecuteResult {
        stdout: o.stdout,
        stderr: o.stderr,
        result: o.result,
        error: o.error.map(guest_error),
        duration_ms: o.duration.as_secs_f64() * 1e3,
        truncated: o.truncated,
        session_ended: o.ended.is_some(),
        end_reason: o.ended.map(|r| r.to_string()),
        rolled_back: o.rolled_back.is_some(),
        rollback_reason: o.rolled_back.map(|r| r.to_string()),
        results: o.results.into_iter().map(display_data).collect(),
    }
}

/// A MIME bundle as gRPC carries it: every value as text (JSON values as JSON text).
fn display_data(bundle: arl_runtimes::Bundle) -> pb::DisplayData {
    let mut shown = pb::DisplayData::default();
    for (mime, value) in bundle {
        match (mime.as_str(), value) {
            ("is_main_result", value) => shown.is_main_result = value.as_bool().unwrap_or(false),
            (_, serde_json::Value::String(text)) => {
                shown.data.insert(mime, text);
            }
            (_, value) => {
                shown.data.insert(mime, value.to_string());
            }
        }
    }
    shown
}

fn entry(e: Entry) -> pb::FileEntry {
    pb::FileEntry {
        path: e.path,
        kind: e.kind.name().into(),
        size: e.size,
        modified_at: e.modified.map(rfc3339).unwrap_or_default(),
    }
}

fn load(l: Load) -> pb::Load {
    pb::Load {
        sessions: l.sessions,
        capacity: l.capacity,
        memory_bytes: l.memory_bytes,
        draining: l.draining,
    }
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Sessions for SessionService {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let r = request.into_inner();
        let request = CreateRequest {
            runtime: (!r.runtime.is_empty()).then_some(r.runtime),
            language: (!r.language.is_empty()).then_some(r.language),
            timeout_ms: r.timeout_ms,
            memory_mib: r.memory_mib,
            env: (!r.env.is_empty()).then(|| r.env.into_iter().collect()),
            idle_ttl_secs: r.idle_ttl_secs,
            lifetime_secs: r.lifetime_secs,
            suspend_after_secs: None,
            rollback: r.rollback,
            from_snapshot: (!r.from_snapshot.is_empty()).then_some(r.from_snapshot),
            metadata: (!r.metadata.is_empty()).then(|| r.metadata.into_iter().collect()),
            network: r.network.map(|n| crate::egress::NetworkRequest {
                allow: n.allow,
                max_bytes: n.max_bytes,
                max_requests: n.max_requests,
            }),
            tools: (!r.tools.is_empty()).then(|| {
                r.tools
                    .into_iter()
                    .map(|(name, t)| {
                        let headers = t.headers.into_iter().collect();
                        (
                            name,
                            crate::egress::ToolSpec {
                                url: t.url,
                                headers,
                            },
                        )
                    })
                    .collect()
            }),
        };
        let created = self.registry.create(request).await.map_err(status)?;
        Ok(Response::new(session(created.info())))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let found = self
            .registry
            .info(&request.get_ref().id)
            .await
            .map_err(status)?;
        Ok(Response::new(session(found)))
    }

    async fn list_sessions(
        &self,
        _: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let sessions = self.registry.list().into_iter().map(session).collect();
        Ok(Response::new(pb::ListSessionsResponse { sessions }))
    }

    async fn delete_session(
        &self,
        request: Request<pb::DeleteSessionRequest>,
    ) -> Result<Response<pb::DeleteSessionResponse>, Status> {
        self.registry
            .delete(&request.get_ref().id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteSessionResponse {}))
    }

    type ExecuteStream = EventStream<pb::ExecuteEvent>;

    async fn execute(
        &self,
        request: Request<pb::ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let r = request.into_inner();
        let target = (self.registry)
            .target(&r.session_id, r.timeout_ms)
            .await
            .map_err(status)?;
        // tonic drops the stream when the client cancels, which stops the turn.
        let events = target
            .session
            .execute_streaming(r.code, target.timeout)
            .flat_map(|event| {
                use pb::execute_event::Event;
                let events = match event {
                    TurnEvent::Output(chunk) => vec![Ok(Event::Output(pb::OutputChunk {
                        stream: match chunk.stream {
                            output::Stream::Stdout => pb::Stream::Stdout,
                            output::Stream::Stderr => pb::Stream::Stderr,
                        } as i32,
                        data: chunk.data.to_vec(),
                    }))],
                    // What the turn displayed, each as an event, then the whole result.
                    TurnEvent::Done(Ok(outcome)) => {
                        let result = result(outcome);
                        let shown = result.results.iter().filter(|d| !d.is_main_result);
                        let mut events: Vec<_> =
                            shown.cloned().map(|d| Ok(Event::Display(d))).collect();
                        events.push(Ok(Event::Result(result)));
                        events
                    }
                    TurnEvent::Done(Err(e)) => vec![Err(status(e))],
                };
                futures_util::stream::iter(
                    events
                        .into_iter()
                        .map(|e| e.map(|event| pb::ExecuteEvent { event: Some(event) })),
                )
            });
        Ok(Response::new(Box::pin(events)))
    }

    async fn write_file(
        &self,
        request: Request<Streaming<pb::WriteFileRequest>>,
    ) -> Result<Response<pb::FileEntry>, Status> {
        let mut messages = request.into_inner();
        let first = messages.message().await?.ok_or_else(|| {
            Status::invalid_argument("WriteFile needs a first message naming the session and path")
        })?;
        if first.session_id.is_empty() || first.path.is_empty() {
            return Err(Status::invalid_argument(
                "the first WriteFile message must name session_id and path",
            ));
        }
        let target = self.registry.get(&first.session_id).await.map_err(status)?;
        let (id, path) = (first.session_id, first.path);
        let rest = futures_util::stream::unfold(messages, |mut m| async move {
            match m.message().await {
                Ok(Some(msg)) => Some((Ok(msg), m)),
                Ok(None) => None,
                Err(e) => Some((Err(e), m)),
            }
        });
        let (same_id, same_path) = (id.clone(), path.clone());
        let data = futures_util::stream::once(async { Ok(Bytes::from(first.data)) }).chain(
            rest.map(move |msg| {
                let msg = msg.map_err(|e| {
                    Error::InvalidRequest(format!("reading the WriteFile stream: {}", e.message()))
                })?;
                let names_other = (!msg.session_id.is_empty() && msg.session_id != same_id)
                    || (!msg.path.is_empty() && msg.path != same_path);
                if names_other {
                    return Err(Error::InvalidRequest(
                    "every WriteFile message must name the first one's session and path, or none"
                        .into(),
                ));
                }
                Ok(Bytes::from(msg.data))
            }),
        );
        let (written, _) = files::upload(target.workspace.clone(), path, data)
            .await
            .map_err(status)?;
        Ok(Response::new(entry(written)))
    }

    type ReadFileStream = EventStream<pb::FileChunk>;

    async fn read_file(
        &self,
        request: Request<pb::ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let r = request.into_inner();
        let target = self.registry.get(&r.session_id).await.map_err(status)?;
        let (file, _) = on_workspace(target.workspace.clone(), move |w| w.open_file(&r.path))
            .await
            .map_err(status)?;
        let chunks = tokio_util::io::ReaderStream::with_capacity(
            tokio::fs::File::from_std(file),
            READ_CHUNK,
        )
        .map(|chunk| match chunk {
            Ok(data) => Ok(pb::FileChunk {
                data: data.to_vec(),
            }),
            Err(e) => Err(status(Error::Io("reading a workspace file".into(), e))),
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn list_files(
        &self,
        request: Request<pb::ListFilesRequest>,
    ) -> Result<Response<pb::ListFilesResponse>, Status> {
        let r = request.into_inner();
        let target = self.registry.get(&r.session_id).await.map_err(status)?;
        let entries = on_workspace(target.workspace.clone(), move |w| w.list(&r.path))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListFilesResponse {
            entries: entries.into_iter().map(entry).collect(),
        }))
    }

    async fn delete_file(
        &self,
        request: Request<pb::DeleteFileRequest>,
    ) -> Result<Response<pb::DeleteFileResponse>, Status> {
        let r = request.into_inner();
        let target = self.registry.get(&r.session_id).await.map_err(status)?;
        on_workspace(target.workspace.clone(), move |w| w.delete(&r.path))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteFileResponse {}))
    }

    async fn get_load(&self, _: Request<pb::GetLoadRequest>) -> Result<Response<pb::Load>, Status> {
        Ok(Response::new(load(self.registry.load())))
    }

    type GetHistoryStream = EventStream<pb::HistoryEntry>;

    async fn get_history(
        &self,
        request: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<Self::GetHistoryStream>, Status> {
        let target = self
            .registry
            .get(&request.get_ref().session_id)
            .await
            .map_err(status)?;
        let (lines, _) = target.history();
        let entries = lines.into_iter().filter_map(|line| {
            serde_json::from_str::<HistoryEntry>(&line)
                .ok()
                .map(|e| Ok(history_entry(e)))
        });
        Ok(Response::new(Box::pin(futures_util::stream::iter(
            entries.collect::<Vec<_>>(),
        ))))
    }

    async fn fork_session(
        &self,
        request: Request<pb::ForkSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let forked = self
            .registry
            .fork(&request.get_ref().id)
            .await
            .map_err(status)?;
        Ok(Response::new(session(forked.info())))
    }

    async fn snapshot_session(
        &self,
        request: Request<pb::SnapshotSessionRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let info = self
            .registry
            .snapshot(&request.get_ref().id)
            .await
            .map_err(status)?;
        Ok(Response::new(snapshot(info)))
    }

    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let info = self
            .registry
            .snapshots()
            .info(&request.get_ref().id)
            .await
            .map_err(status)?;
        Ok(Response::new(snapshot(info)))
    }

    async fn list_snapshots(
        &self,
        _: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let all = self.registry.snapshots().list().await.map_err(status)?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: all.into_iter().map(snapshot).collect(),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        self.registry
            .snapshots()
            .delete(&request.get_ref().id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    type ExportSessionStream = EventStream<pb::SnapshotChunk>;

    async fn export_session(
        &self,
        request: Request<pb::ExportSessionRequest>,
    ) -> Result<Response<Self::ExportSessionStream>, Status> {
        let bytes = self
            .registry
            .export(&request.get_ref().id)
            .await
            .map_err(status)?;
        let chunks: Vec<_> = bytes
            .chunks(READ_CHUNK)
            .map(|c| Ok(pb::SnapshotChunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(futures_util::stream::iter(chunks))))
    }

    async fn import_session(
        &self,
        request: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::Session>, Status> {
        let chunks = request.into_inner().map(|chunk| {
            chunk
                .map(|c| Bytes::from(c.data))
                .map_err(std::io::Error::other)
        });
        let imported = self.registry.import(chunks).await.map_err(status)?;
        Ok(Response::new(session(imported.info())))
    }

    async fn drain(&self, _: Request<pb::DrainRequest>) -> Result<Response<pb::Load>, Status> {
        self.registry.set_draining(true);
        Ok(Response::new(load(self.registry.load())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EndReason;

    #[test]
    fn errors_map_to_the_codes_the_proto_promises() {
        for (e, code) in [
            (Error::NotFound("x".into()), Code::NotFound),
            (Error::FileNotFound("x".into()), Code::NotFound),
            (Error::Ended(EndReason::Deadline), Code::FailedPrecondition),
            (Error::Full(4), Code::ResourceExhausted),
            (Error::QuotaExceeded(1), Code::ResourceExhausted),
            (Error::Busy(16), Code::Aborted),
            (Error::InvalidRequest("x".into()), Code::InvalidArgument),
            (
                Error::BadPath("..".into(), "uses `..`"),
                Code::InvalidArgument,
            ),
            (Error::Draining, Code::Unavailable),
            (Error::NotReady, Code::Unavailable),
        ] {
            let message = e.to_string();
            let s = status(e);
            assert_eq!((s.code(), s.message()), (code, message.as_str()));
        }
    }
}
