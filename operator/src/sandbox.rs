//! The Sandbox controller: places each Sandbox as a session on the least-loaded ready pod of
//! its pool, keeps its status true, and ends the session (through a finalizer) when the
//! Sandbox is deleted.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::watcher;
use serde_json::{Value, json};

use crate::crd::{SESSION_FINALIZER, Sandbox, SandboxPhase, SandboxSpec, SandboxStatus, WarmPool};
use crate::manager::SessionState;
use crate::pool::condition;
use crate::{Context, Error, Result};

/// A keep-alive Sandbox's idle TTL: the manager's longest, so that only its lifetime ends it.
const KEEP_ALIVE_IDLE_SECS: u64 = 30 * 24 * 3600;

/// Runs the controller until the stream ends.
pub async fn run(ctx: Arc<Context>, sandboxes: Api<Sandbox>) {
    Controller::new(sandboxes, watcher::Config::default())
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::warn!(error = %e, "sandbox reconcile failed");
            }
        })
        .await;
}

/// Retries a failed reconcile after a short pause.
pub fn error_policy(_sandbox: Arc<Sandbox>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "sandbox");
    Action::requeue(Duration::from_secs(5))
}

/// Adds the finalizer, then places, watches or ends the session.
#[tracing::instrument(skip_all, fields(sandbox = %sandbox.name_any()))]
pub async fn reconcile(sandbox: Arc<Sandbox>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = sandbox
        .namespace()
        .ok_or_else(|| Error::NoNamespace(sandbox.name_any()))?;
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, SESSION_FINALIZER, sandbox, |event| async {
        match event {
            Event::Apply(sandbox) => apply(&sandbox, &ctx, &namespace).await,
            Event::Cleanup(sandbox) => cleanup(&sandbox, &ctx, &namespace).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

/// The manager's create request for `spec` in a pool serving `runtime`.
pub fn create_request(spec: &SandboxSpec, runtime: &str) -> Value {
    let timeouts = spec.timeouts.clone().unwrap_or_default();
    let idle = if spec.keep_alive {
        Some(KEEP_ALIVE_IDLE_SECS)
    } else {
        timeouts.idle_seconds
    };
    if runtime == crate::crd::CONTAINER_RUNTIME {
        // The pod is the sandbox: its agent runs commands with their own deadlines, and the
        // guest settings (memory, env, network) are the pod's.
        let mut body = json!({ "runtime": runtime });
        if let Some(idle) = idle {
            body["idle_ttl_secs"] = idle.into();
        }
        return body;
    }
    let mut body = json!({ "runtime": runtime });
    let mut set = |key: &str, value: Option<Value>| {
        if let Some(v) = value {
            body[key] = v;
        }
    };
    set("timeout_ms", timeouts.execute_ms.map(Value::from));
    set("memory_mib", spec.memory_mib.map(Value::from));
    set("idle_ttl_secs", idle.map(Value::from));
    set("lifetime_secs", timeouts.lifetime_seconds.map(Value::from));
    set("env", spec.env.as_ref().map(|e| json!(e)));
    set(
        "network",
        spec.network.as_ref().map(|n| {
            let mut network = json!({ "allow": n.allow });
            if let Some(bytes) = n.max_bytes {
                network["max_bytes"] = bytes.into();
            }
            if let Some(requests) = n.max_requests {
                network["max_requests"] = requests.into();
            }
            network
        }),
    );
    body
}

async fn apply(sandbox: &Sandbox, ctx: &Context, namespace: &str) -> Result<Action> {
    let status = sandbox.status.clone().unwrap_or_default();
    match status.phase {
        SandboxPhase::Failed | SandboxPhase::Terminated => Ok(Action::await_change()),
        SandboxPhase::Ready => watch(sandbox, status, ctx, namespace).await,
        SandboxPhase::Pending => place(sandbox, ctx, namespace).await,
    }
}

/// Creates the session on the least-loaded ready pod with room, or says why not yet.
async fn place(sandbox: &Sandbox, ctx: &Context, namespace: &str) -> Result<Action> {
    let pool_ref = &sandbox.spec.pool_ref;
    let pools: Api<WarmPool> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(pool) = pools.get_opt(pool_ref).await? else {
        let message = format!("WarmPool {pool_ref} does not exist in {namespace}");
        write(sandbox, ctx, namespace, pending("PoolNotFound", message)).await?;
        return Ok(Action::requeue(ctx.interval));
    };
    let runtime = pool.spec.runtime_name();
    let request = create_request(&sandbox.spec, &runtime);
    let candidates = ctx
        .fleet
        .candidates(|m| m.namespace == namespace && m.pool == *pool_ref);
    for member in candidates {
        match ctx
            .managers
            .create_session(&member.endpoint, &request)
            .await
        {
            Ok(created) => {
                ctx.fleet.note_placed(&member.key());
                let ip = member
                    .endpoint
                    .http
                    .trim_start_matches("http://")
                    .rsplit_once(':')
                    .map(|(h, _)| h.trim_matches(['[', ']']).to_owned());
                let ready = SandboxStatus {
                    phase: SandboxPhase::Ready,
                    pod_name: Some(member.name.clone()),
                    pod_ip: ip,
                    endpoint: Some(format!(
                        "{}/v1/sessions/{}",
                        member.endpoint.http, created.id
                    )),
                    session_id: Some(created.id.clone()),
                    reason: Some("SessionCreated".into()),
                    message: Some(format!("session {} on pod {}", created.id, member.name)),
                    ..SandboxStatus::default()
                };
                if let Err(e) = write(sandbox, ctx, namespace, ready).await {
                    // Unrecorded, the session would leak: the next reconcile makes another.
                    let _ = ctx
                        .managers
                        .delete_session(&member.endpoint, &created.id)
                        .await;
                    return Err(e);
                }
                tracing::info!(pod = %member.name, session = %created.id, "placed");
                return Ok(Action::requeue(ctx.interval));
            }
            Err(Error::Manager {
                status: Some(status),
                code,
                message,
                ..
            }) if (400..500).contains(&status) && status != 429 => {
                // The request itself is wrong: no other pod would take it either.
                let failed = SandboxStatus {
                    phase: SandboxPhase::Failed,
                    reason: Some("InvalidSpec".into()),
                    message: Some(format!("{code}: {message}")),
                    ..SandboxStatus::default()
                };
                write(sandbox, ctx, namespace, failed).await?;
                return Ok(Action::await_change());
            }
            Err(e) => tracing::debug!(pod = %member.name, error = %e, "not placed"),
        }
    }
    let message = format!("no ready pod of {pool_ref} has room");
    write(sandbox, ctx, namespace, pending("NoCapacity", message)).await?;
    Ok(Action::requeue(Duration::from_secs(2)))
}

/// Checks that a Ready Sandbox's pod and session still exist.
async fn watch(
    sandbox: &Sandbox,
    status: SandboxStatus,
    ctx: &Context,
    namespace: &str,
) -> Result<Action> {
    let (Some(pod), Some(id)) = (status.pod_name.clone(), status.session_id.clone()) else {
        return Ok(Action::await_change());
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let lost = |reason: &str, message: String| SandboxStatus {
        phase: SandboxPhase::Failed,
        reason: Some(reason.into()),
        message: Some(message),
        ..status.clone()
    };
    if pods.get_opt(&pod).await?.is_none() {
        if let Some(holder) = find_moved(ctx, namespace, &pod, &id, None).await {
            return moved(sandbox, status, ctx, namespace, holder).await;
        }
        write(
            sandbox,
            ctx,
            namespace,
            lost(
                "PodGone",
                format!("pod {pod} no longer exists; its session is lost"),
            ),
        )
        .await?;
        return Ok(Action::await_change());
    }
    let Some(member) = ctx.fleet.pod(namespace, &pod) else {
        return Ok(Action::requeue(ctx.interval));
    };
    match ctx.managers.session(&member.endpoint, &id).await {
        Ok(SessionState::Live) | Err(_) => Ok(Action::requeue(ctx.interval)),
        Ok(SessionState::Moved(owner)) => {
            match find_moved(ctx, namespace, &pod, &id, owner).await {
                Some(holder) => moved(sandbox, status, ctx, namespace, holder).await,
                None => Ok(Action::requeue(ctx.interval)),
            }
        }
        Ok(SessionState::Ended(why)) => {
            let ended = SandboxStatus {
                phase: SandboxPhase::Terminated,
                reason: Some("SessionEnded".into()),
                message: Some(why),
                ..status.clone()
            };
            write(sandbox, ctx, namespace, ended).await?;
            Ok(Action::await_change())
        }
        Ok(SessionState::Unknown) => {
            let message =
                format!("the manager of pod {pod} no longer knows session {id} (it restarted)");
            write(sandbox, ctx, namespace, lost("SessionLost", message)).await?;
            Ok(Action::await_change())
        }
    }
}

/// The manager that holds session `id` now that its pod `pod` does not (a drain moved it
/// through the store): the one named by `owner`, or else the namespace's serving managers in
/// the gateway's order (the first asked resumes a session released for any), following the
/// `session_moved` answers; `None` when none has it.
async fn find_moved(
    ctx: &Context,
    namespace: &str,
    pod: &str,
    id: &str,
    owner: Option<String>,
) -> Option<crate::fleet::Member> {
    let mut tried = vec![crate::fleet::member_key(namespace, pod)];
    let mut next = owner;
    for _ in 0..4 {
        let member = next
            .take()
            .and_then(|key| ctx.fleet.get(&key))
            .or_else(|| ctx.fleet.next_holder(namespace, &tried))?;
        tried.push(member.key());
        match ctx.managers.session(&member.endpoint, id).await {
            Ok(SessionState::Live) => return Some(member),
            Ok(SessionState::Moved(owner)) => next = owner,
            _ => {}
        }
    }
    None
}

/// Records that the Sandbox's session is held by `holder`'s pod now, under the same id.
async fn moved(
    sandbox: &Sandbox,
    status: SandboxStatus,
    ctx: &Context,
    namespace: &str,
    holder: crate::fleet::Member,
) -> Result<Action> {
    tracing::info!(pod = %holder.name, session = ?status.session_id, "the sandbox's session moved");
    let status = SandboxStatus {
        pod_name: Some(holder.name.clone()),
        message: Some(format!(
            "the session moved to pod {} through the session store",
            holder.name
        )),
        ..status
    };
    write(sandbox, ctx, namespace, status).await?;
    Ok(Action::requeue(ctx.interval))
}

/// Ends the session before the Sandbox goes. A pod already gone has nothing to end.
async fn cleanup(sandbox: &Sandbox, ctx: &Context, namespace: &str) -> Result<Action> {
    let status = sandbox.status.clone().unwrap_or_default();
    if let (Some(pod), Some(id)) = (status.pod_name, status.session_id) {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
        if let Some(member) = ctx.fleet.pod(namespace, &pod) {
            if let Err(e) = ctx.managers.delete_session(&member.endpoint, &id).await
                && pods.get_opt(&pod).await?.is_some()
            {
                return Err(e);
            }
            tracing::info!(%pod, session = %id, "session ended");
        }
    }
    Ok(Action::await_change())
}

fn pending(reason: &str, message: String) -> SandboxStatus {
    SandboxStatus {
        phase: SandboxPhase::Pending,
        reason: Some(reason.into()),
        message: Some(message),
        ..SandboxStatus::default()
    }
}

/// Writes `status` (with its Ready condition and generation) unless it says what is there.
async fn write(
    sandbox: &Sandbox,
    ctx: &Context,
    namespace: &str,
    mut status: SandboxStatus,
) -> Result<()> {
    let previous = sandbox.status.clone().unwrap_or_default();
    status.observed_generation = sandbox.metadata.generation;
    let ready = if status.phase == SandboxPhase::Ready {
        "True"
    } else {
        "False"
    };
    let reason = status.reason.clone().unwrap_or_default();
    let message = status.message.clone().unwrap_or_default();
    status.conditions = vec![condition(
        &previous.conditions,
        "Ready",
        (ready, &reason, message),
        status.observed_generation,
        SystemTime::now(),
    )];
    let bare = |s: &SandboxStatus| SandboxStatus {
        conditions: vec![],
        ..s.clone()
    };
    if bare(&status) == bare(&previous) {
        return Ok(());
    }
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = json!({ "status": status });
    api.patch_status(
        &sandbox.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}
