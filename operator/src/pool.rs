//! The WarmPool controller: keeps a pool's pods at what its load needs, drains before it
//! deletes, and reports counts and conditions in status.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::autoscale::{self, PodView};
use crate::crd::{DRAINING_ANNOTATION, POOL_LABEL, WarmPool, WarmPoolStatus};
use crate::fleet::draining_since;
use crate::pods::{
    manager_pod, network_policy, network_policy_name, selector, token_secret, token_secret_name,
};
use crate::{Context, Error, Result, rfc3339};

/// `status.lastScaleUpNeed` moves at most this often, so that a steady pool's status does not
/// change (and cost a write) at every reconcile.
const NEED_STEP: Duration = Duration::from_secs(30);

/// Field manager of everything the operator applies.
pub const MANAGER: &str = "arl-operator";

/// Runs the controller until the stream ends.
pub async fn run(ctx: Arc<Context>, pools: Api<WarmPool>, pods: Api<Pod>) {
    Controller::new(pools, watcher::Config::default())
        .owns(pods, watcher::Config::default().labels(POOL_LABEL))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::warn!(error = %e, "warmpool reconcile failed");
            }
        })
        .await;
}

/// Retries a failed reconcile after a short pause.
pub fn error_policy(_pool: Arc<WarmPool>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "warmpool");
    Action::requeue(Duration::from_secs(5))
}

/// Writes the pool's token into its Secret, creating it if missing, and never into a Secret
/// the pool does not own: the write is a JSON patch whose first step tests the owner
/// reference's UID, so the API server refuses it (422) on anyone else's Secret of that name.
/// The operator never reads a Secret.
async fn put_token(pool: &WarmPool, ctx: &Context, namespace: &str) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let name = token_secret_name(&pool.name_any());
    let secret = token_secret(pool, &ctx.tokens);
    let token = secret
        .string_data
        .as_ref()
        .and_then(|d| d.get("token"))
        .cloned()
        .unwrap_or_default();
    let uid = pool.metadata.uid.clone().unwrap_or_default();
    let patch: json_patch::Patch = serde_json::from_value(json!([
        { "op": "test", "path": "/metadata/ownerReferences/0/uid", "value": uid },
        { "op": "add", "path": "/data/token", "value": BASE64.encode(token) },
    ]))
    .map_err(|e| Error::Config(format!("the token patch: {e}")))?;
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    };
    match secrets
        .patch(&name, &params, &Patch::Json::<()>(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let params = PostParams {
                field_manager: Some(MANAGER.into()),
                ..PostParams::default()
            };
            secrets.create(&params, &secret).await?;
            tracing::info!(secret = %name, "created");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 422 => Err(Error::ForeignSecret(name)),
        Err(e) => Err(e.into()),
    }
}

/// What one pod looks like to the autoscaler.
fn view(pod: &Pod, ctx: &Context) -> PodView {
    let name = pod.name_any();
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let member = ctx.fleet.pod(&pod.namespace().unwrap_or_default(), &name);
    let ready = member.as_ref().is_some_and(|m| m.ready);
    PodView {
        failed: matches!(phase, Some("Failed" | "Succeeded")),
        ready,
        draining_since: draining_since(pod),
        sessions: member.and_then(|m| m.load).map(|(load, _)| load.sessions),
        created: pod
            .creation_timestamp()
            .map_or(SystemTime::UNIX_EPOCH, |t| SystemTime::from(t.0)),
        name,
    }
}

/// Brings one pool to what its load needs. Idempotent: it reads everything it decides on.
#[tracing::instrument(skip_all, fields(pool = %pool.name_any()))]
pub async fn reconcile(pool: Arc<WarmPool>, ctx: Arc<Context>) -> Result<Action> {
    let name = pool.name_any();
    let namespace = pool
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let apply = PatchParams::apply(MANAGER).force();

    put_token(&pool, &ctx, &namespace).await?;
    let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &namespace);
    let policy = network_policy(&pool, &ctx.system_namespace);
    policies
        .patch(&network_policy_name(&name), &apply, &Patch::Apply(&policy))
        .await?;

    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let observed = pods
        .list(&ListParams::default().labels(&selector(&name)))
        .await?
        .items;
    let views: Vec<PodView> = observed.iter().map(|p| view(p, &ctx)).collect();

    let now = SystemTime::now();
    let stored = pool
        .status
        .as_ref()
        .and_then(|s| s.last_scale_up_need.as_deref())
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(SystemTime::from);
    // The delay counts from the stored time plus the step it may lag by: never early.
    let plan = autoscale::plan(&pool.spec, &views, now, stored.map(|t| t + NEED_STEP));
    let needed_at = match stored {
        Some(t) if plan.needed_at != now || now < t + NEED_STEP => t,
        _ => now,
    };

    for _ in 0..plan.create {
        let pod = pods
            .create(
                &PostParams::default(),
                &manager_pod(&pool, &ctx.manager_image),
            )
            .await?;
        tracing::info!(pod = %pod.name_any(), "created");
    }
    let moves = pool.spec.session_store.is_some();
    for pod in &plan.drain {
        set_draining(&ctx, &pods, (&namespace, pod), Some(now), moves).await?;
    }
    for pod in &plan.undrain {
        set_draining(&ctx, &pods, (&namespace, pod), None, moves).await?;
    }
    for pod in &plan.delete {
        match pods.delete(pod, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(%pod, "deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }

    let status = status(&pool, &views, &plan, &ctx, now, needed_at);
    if pool.status.as_ref() == Some(&status) {
        // A steady pool costs the API server no write.
        return Ok(Action::requeue(ctx.interval));
    }
    let pools: Api<WarmPool> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = json!({
        "apiVersion": WarmPool::api_version(&()),
        "kind": WarmPool::kind(&()),
        "status": status,
    });
    pools
        .patch_status(&name, &apply, &Patch::Apply(&patch))
        .await?;
    Ok(Action::requeue(ctx.interval))
}

/// Starts (`since`) or ends (`None`) a pod's drain: the manager first, so that no session
/// lands on it after the annotation says it drains. With `moves` (the pool has a session
/// store), the manager moves its sessions out through the store, so the pod empties at once.
async fn set_draining(
    ctx: &Context,
    pods: &Api<Pod>,
    (namespace, pod): (&str, &str),
    since: Option<SystemTime>,
    moves: bool,
) -> Result<()> {
    if let Some(member) = ctx.fleet.pod(namespace, pod)
        && let Err(e) = ctx
            .managers
            .drain(&member.endpoint, since.is_some(), moves)
            .await
    {
        // An unreachable manager has no sessions left to protect; the annotation still
        // takes the pod out of service.
        tracing::warn!(%pod, error = %e, "drain call failed");
    }
    let value = since.map(rfc3339);
    let patch = json!({ "metadata": { "annotations": { DRAINING_ANNOTATION: value } } });
    pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    tracing::info!(%pod, draining = since.is_some(), "drain");
    Ok(())
}

/// The status after `plan` is applied to what was observed; the load last needed every
/// serving pod at `needed_at`.
fn status(
    pool: &WarmPool,
    views: &[PodView],
    plan: &autoscale::Plan,
    ctx: &Context,
    now: SystemTime,
    needed_at: SystemTime,
) -> WarmPoolStatus {
    let gone = |v: &&PodView| v.failed || plan.delete.contains(&v.name);
    let serving = |v: &&PodView| {
        (v.draining_since.is_none() && !plan.drain.contains(&v.name))
            || plan.undrain.contains(&v.name)
    };
    let live: Vec<&PodView> = views.iter().filter(|v| !gone(v)).collect();
    let in_service: Vec<&&PodView> = live.iter().filter(|v| serving(v)).collect();
    let ready = in_service.iter().filter(|v| v.ready).count() as i32;
    let replicas = in_service.len() as i32 + plan.create as i32;
    let sessions: u64 = live.iter().filter_map(|v| v.sessions).sum();
    let capacity: u64 = in_service
        .iter()
        .filter_map(|v| {
            ctx.fleet
                .pod(&pool.namespace().unwrap_or_default(), &v.name)
                .and_then(|m| m.load)
                .map(|(l, _)| l.capacity)
        })
        .sum();
    let utilization = if capacity == 0 {
        0.0
    } else {
        sessions as f64 / capacity as f64
    };
    let mut draining: Vec<String> = live
        .iter()
        .filter(|v| !serving(v))
        .map(|v| v.name.clone())
        .collect();
    draining.sort();

    let previous = pool
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let generation = pool.metadata.generation;
    let floor = pool.spec.replicas;
    let ready_condition = if ready >= floor {
        (
            "True",
            "MinimumReady",
            format!("{ready} of at least {floor} pods are ready"),
        )
    } else {
        (
            "False",
            "Starting",
            format!("{ready} of at least {floor} pods are ready"),
        )
    };
    let desired = plan.desired as i32;
    let scaling = if replicas != desired || !draining.is_empty() {
        (
            "True",
            "Scaling",
            format!(
                "{replicas} pods towards {desired}, {} draining",
                draining.len()
            ),
        )
    } else {
        (
            "False",
            "Steady",
            format!("{desired} pods for {sessions} sessions"),
        )
    };
    WarmPoolStatus {
        replicas,
        ready_replicas: ready,
        desired_replicas: desired,
        sessions: sessions as i64,
        capacity: capacity as i64,
        utilization: format!("{utilization:.2}"),
        draining,
        selector: selector(&pool.name_any()),
        observed_generation: generation,
        conditions: vec![
            condition(previous, "Ready", ready_condition, generation, now),
            condition(previous, "Scaling", scaling, generation, now),
        ],
        last_scale_up_need: Some(rfc3339(needed_at)),
    }
}

/// A condition that keeps its transition time while its status stays the same.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    (status, reason, message): (&str, &str, String),
    generation: Option<i64>,
    now: SystemTime,
) -> Condition {
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::try_from(now).unwrap_or_default()));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}
