//! The custom resources of `arl.infra.io/v1alpha1`: WarmPool, Sandbox and Task.
//!
//! NOTE: `deploy/crds/` is generated from these types by `cargo run -p arl-operator --bin
//! crdgen`; a test fails when the checked-in YAML differs, so regenerate after a change.

// `printcolumn(..)` repeats `type_ = ..`, which clippy takes for a repeated attribute.
#![allow(
    clippy::duplicated_attributes,
    reason = "kube's derive repeats attributes"
)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// API group of every ARL resource.
pub const GROUP: &str = "arl.infra.io";
/// Label naming the WarmPool a pod belongs to.
pub const POOL_LABEL: &str = "arl.infra.io/pool";
/// Finalizer that ends a Sandbox's session before the Sandbox goes.
pub const SESSION_FINALIZER: &str = "arl.infra.io/session";
/// Annotation a manager pod carries while it drains: since when (RFC 3339).
pub const DRAINING_ANNOTATION: &str = "arl.infra.io/draining-since";
/// Annotation naming the runtime a manager pod serves.
pub const RUNTIME_ANNOTATION: &str = "arl.infra.io/runtime";
/// Name of the manager container in a pool's pods, and of its ports.
pub const MANAGER_CONTAINER: &str = "manager";

/// A pool of `arl-manager` pods kept warm, scaled on session load.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "arl.infra.io",
    version = "v1alpha1",
    kind = "WarmPool",
    namespaced,
    shortname = "wp",
    category = "arl",
    status = "WarmPoolStatus",
    derive = "PartialEq",
    cel,
    doc = "A pool of arl-manager pods kept warm and scaled on session load",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Sessions", type_ = "integer", json_path = ".status.sessions"),
    printcolumn(name = "Capacity", type_ = "integer", json_path = ".status.capacity"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self.replicas <= self.maxReplicas").message("replicas must not exceed maxReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct WarmPoolSpec {
    /// What the pods run sessions of.
    pub runtime: PoolRuntime,
    /// Pods kept at least, busy or not: the floor the autoscaler never goes below. Set by
    /// `kubectl scale` and HPA/KEDA through the scale subresource.
    #[serde(default = "defaults::replicas")]
    #[x_kube(validation = Rule::new("self >= 0").message("replicas must not be negative"))]
    pub replicas: i32,
    /// Pods kept at most.
    #[serde(default = "defaults::max_replicas")]
    #[x_kube(validation = Rule::new("self >= 1").message("maxReplicas must be at least 1"))]
    pub max_replicas: i32,
    /// Sessions one pod holds at once (its manager's `--max-sessions`).
    #[serde(default = "defaults::sessions_per_pod")]
    #[x_kube(validation = Rule::new("self >= 1").message("sessionsPerPod must be at least 1"))]
    pub sessions_per_pod: i32,
    /// Share of the pool's capacity that sessions should fill; the rest is warm headroom.
    #[serde(default = "defaults::target_utilization")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("targetUtilization must be in (0, 1]"))]
    pub target_utilization: f64,
    /// Sessions of room kept on top of the live ones, so a burst never waits for a pod.
    #[serde(default = "defaults::headroom_sessions")]
    #[x_kube(validation = Rule::new("self >= 0").message("headroomSessions must not be negative"))]
    pub headroom_sessions: i32,
    /// How long load must stay low before pods are removed.
    #[serde(default = "defaults::scale_down_delay_seconds")]
    #[x_kube(validation = Rule::new("self >= 0").message("scaleDownDelaySeconds must not be negative"))]
    pub scale_down_delay_seconds: i64,
    /// How long a draining pod may keep live sessions before it is deleted anyway.
    #[serde(default = "defaults::drain_timeout_seconds")]
    #[x_kube(validation = Rule::new("self >= 0").message("drainTimeoutSeconds must not be negative"))]
    pub drain_timeout_seconds: i64,
    /// Overrides for the pods' template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<PodOverrides>,
    /// What the pool's sessions may reach over brokered HTTP: the managers' `--network-allow`
    /// (every session's default and the most one may ask), and the egress the pods'
    /// NetworkPolicy opens for it. Absent: the pods reach nothing and sessions have no network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<PoolNetwork>,
    /// Where the pool's managers keep suspended and checkpointed sessions, shared by all its
    /// pods. With one, a pod being drained moves its sessions out through it (each resumes on
    /// another pod under the same id, where the gateway follows it) instead of waiting for
    /// them to end. Absent: each pod keeps its own in its data volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_store: Option<SessionStore>,
}

/// An S3-compatible bucket the pool's sessions are kept in.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SessionStore {
    /// `s3://bucket/prefix`.
    #[x_kube(validation = Rule::new("self.startsWith('s3://') && size(self) > 5").message("sessionStore.url is s3://bucket/prefix"))]
    pub url: String,
    /// A Secret in the pool's namespace whose keys become the managers' environment: the
    /// `AWS_*` variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`).
    /// Absent: the pods' own identity (IRSA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// The S3 API's URL for a bucket outside AWS (`http://10.0.0.9:9000` for MinIO); absent:
    /// AWS. The pods' NetworkPolicy opens its port (on that address when it is one, else on
    /// public addresses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("sessionStore.endpoint is an http(s) URL"))]
    pub endpoint: Option<String>,
}

impl SessionStore {
    /// The egress rule (`host:port`) its endpoint needs.
    pub fn egress_rule(&self) -> String {
        let Some(endpoint) = &self.endpoint else {
            return "s3.amazonaws.com:443".into();
        };
        let (default_port, rest) = match endpoint.strip_prefix("http://") {
            Some(rest) => (80, rest),
            None => (443, endpoint.trim_start_matches("https://")),
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let has_port = authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok());
        if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:{default_port}")
        }
    }
}

/// A pool's egress.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PoolNetwork {
    /// Hosts: `api.github.com`, `*.pypi.org` (names below it), `10.0.0.5` (an address, which
    /// may be private), each with an optional `:port` (else 80 and 443).
    #[x_kube(validation = Rule::new("self.all(r, r != '' && !r.contains('/'))").message("network.allow entries are hosts or addresses with an optional port"))]
    pub allow: Vec<String>,
    /// Body bytes a session's brokered calls may move in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Calls a session may make in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u64>,
}

/// A WASM runtime served by `arl-manager`, or a container image for one that cannot be
/// WebAssembly. Exactly one is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("has(self.wasm) != has(self.container)").message("set exactly one of runtime.wasm and runtime.container"))]
#[serde(rename_all = "camelCase")]
pub struct PoolRuntime {
    /// The manager's runtime name: `python` or `javascript` (which serves `typescript` too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm: Option<String>,
    /// A container that runs beside `arl-manager` in every pod, sharing `/workspace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerRuntime>,
}

/// A non-WASM runtime: its image, and a service to start in it. Every pod of such a pool is
/// one sandbox: `arl-exec` (copied in from the manager image by an init container, so any image
/// works unchanged) is the container's entrypoint and runs the session's commands; the
/// manager beside it fronts the agent.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ContainerRuntime {
    /// The image.
    pub image: String,
    /// A service the agent starts when the pod starts (a server the sessions' commands
    /// talk to), kept running across sessions; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Its arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
}

/// The runtime name of a container pool's pods (their manager's sessions report it).
pub const CONTAINER_RUNTIME: &str = "container";

impl WarmPoolSpec {
    /// The pool's runtime as its pods are annotated: the WASM runtime, or `container`.
    pub fn runtime_name(&self) -> String {
        match (&self.runtime.wasm, &self.runtime.container) {
            (_, Some(_)) => CONTAINER_RUNTIME.to_owned(),
            (Some(wasm), None) => wasm.clone(),
            (None, None) => "python".to_owned(),
        }
    }

    /// Sessions one pod holds: a container pod is one sandbox.
    pub fn pod_capacity(&self) -> i32 {
        if self.runtime.container.is_some() {
            1
        } else {
            self.sessions_per_pod.max(1)
        }
    }
}

/// What a pool may change in its pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// The `arl-manager` image; the operator's `--manager-image` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Requests and limits of the manager container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Nodes the pods may run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// A RuntimeClass, e.g. gVisor for a second wall around the container runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
    /// Disk the pod's data folder (its sessions' files and snapshots) may use: the emptyDir's
    /// `sizeLimit`, and the manager container's `ephemeral-storage` limit unless `resources`
    /// sets one. Each session is held to its own quota first; this bounds the pod as a whole
    /// (past it, the kubelet evicts the pod). Default `10Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_size_limit: Option<Quantity>,
}

/// What the WarmPool controller observed at its last reconcile.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmPoolStatus {
    /// Pods that exist and are not being drained.
    pub replicas: i32,
    /// Of those, pods whose manager is ready.
    pub ready_replicas: i32,
    /// Pods the autoscaler asks for.
    pub desired_replicas: i32,
    /// Live sessions over the ready pods.
    pub sessions: i64,
    /// Sessions the ready pods can hold.
    pub capacity: i64,
    /// `sessions / capacity`, as a decimal string (`"0.42"`).
    pub utilization: String,
    /// Pods being drained before deletion.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draining: Vec<String>,
    /// Label selector of the pool's pods, for the scale subresource.
    pub selector: String,
    /// The spec generation this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (at least `replicas` pods are ready) and `Scaling`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// When the autoscaler last saw the load need more pods than it has now (RFC 3339); the
    /// scale-down delay counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_up_need: Option<String>,
}

/// A sandbox: one session in a pod of a WarmPool, for as long as the object lives.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "arl.infra.io",
    version = "v1alpha1",
    kind = "Sandbox",
    namespaced,
    shortname = "sbx",
    category = "arl",
    status = "SandboxStatus",
    derive = "PartialEq",
    cel,
    doc = "One stateful session placed in a pod of a WarmPool",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.poolRef"),
    printcolumn(name = "Pod", type_ = "string", json_path = ".status.podName"),
    printcolumn(
        name = "Session",
        type_ = "string",
        json_path = ".status.sessionID",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSpec {
    /// The WarmPool (same namespace) to place the session in.
    #[x_kube(validation = Rule::new("self != ''").message("poolRef must name a WarmPool"))]
    pub pool_ref: String,
    /// Keep the session however long it sits unused (only its lifetime ends it); `false`
    /// lets the idle timeout end it, after which the Sandbox is `Terminated`.
    #[serde(default = "defaults::keep_alive")]
    pub keep_alive: bool,
    /// Deadlines; the manager's defaults where absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<SandboxTimeouts>,
    /// Added to the guest's environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Linear memory limit of the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// What the session may reach (within its pool's `network`): hosts as the pool's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<PoolNetwork>,
}

/// A Sandbox's deadlines.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SandboxTimeouts {
    /// Wall-clock deadline of one execution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("executeMs must be at least 1"))]
    pub execute_ms: Option<u64>,
    /// End the session after this long unused (ignored with `keepAlive`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("idleSeconds must be at least 1"))]
    pub idle_seconds: Option<u64>,
    /// End the session this long after it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("lifetimeSeconds must be at least 1"))]
    pub lifetime_seconds: Option<u64>,
}

/// Where a Sandbox is in its life.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum SandboxPhase {
    /// Waiting for a ready pod with room.
    #[default]
    Pending,
    /// The session is live; status names its pod and endpoint.
    Ready,
    /// The session was lost (its pod went away) or could not be made; see the reason.
    Failed,
    /// The session ended on its own (idle timeout, lifetime, exit).
    Terminated,
}

/// What the Sandbox controller knows of a Sandbox's session.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    /// Pending, Ready, Failed or Terminated.
    pub phase: SandboxPhase,
    /// The pod holding the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// Its IP.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "podIP")]
    pub pod_ip: Option<String>,
    /// The session's id, which names the pod (`<namespace>.<pod>.<hex>`), so the gateway routes it.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "sessionID")]
    pub session_id: Option<String>,
    /// The session's URL on its pod's manager.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Why the phase is what it is, in one CamelCase word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The same for a human.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The spec generation this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Steps run in order in a Sandbox's session, from `kubectl apply`: files written or patched,
/// commands (container sandboxes) and Python cells (WASM sandboxes).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "arl.infra.io",
    version = "v1alpha1",
    kind = "Task",
    namespaced,
    shortname = "tk",
    category = "arl",
    status = "TaskStatus",
    derive = "PartialEq",
    cel,
    doc = "Steps run in order in a Sandbox's session",
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "ExitCode", type_ = "integer", json_path = ".status.exitCode"),
    printcolumn(
        name = "Sandbox",
        type_ = "string",
        json_path = ".spec.sandboxRef",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TaskSpec {
    /// The Sandbox (same namespace) whose session runs the steps; it must be Ready.
    #[x_kube(validation = Rule::new("self != ''").message("sandboxRef must name a Sandbox"))]
    pub sandbox_ref: String,
    /// The most the steps may take together, as a duration (`90s`, `5m`, `1h30m`); the
    /// step running then is stopped and the Task fails. Default `10m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(ms|s|m|h))+$')").message("timeout is a duration such as 90s, 5m or 1h30m"))]
    pub timeout: Option<String>,
    /// Run in order; the first that fails ends the attempt.
    #[x_kube(validation = Rule::new("size(self) >= 1").message("a Task needs at least one step"))]
    pub steps: Vec<TaskStep>,
    /// Attempts after a failed one, each from the first step (0-10).
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 10").message("retries must be between 0 and 10"))]
    pub retries: i32,
    /// Delete the Task this long after it finished; kept when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("ttlSecondsAfterFinished must not be negative"))]
    pub ttl_seconds_after_finished: Option<i64>,
    /// A caller's trace id, logged with every step.
    #[serde(default, rename = "traceID", skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// What a step does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum StepType {
    /// Writes `content` to `path`, or applies the unified diff `patch`.
    FilePatch,
    /// Runs `command` (argv) in `workDir` with `env`: container sandboxes.
    Command,
    /// Runs the Python source `code` as one cell: WASM sandboxes.
    Code,
}

/// One step of a Task.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.type != 'FilePatch' || (has(self.path) && has(self.content)) || has(self.patch)").message("a FilePatch step needs path and content, or patch"))]
#[x_kube(validation = Rule::new("self.type != 'Command' || (has(self.command) && size(self.command) > 0)").message("a Command step needs command (argv)"))]
#[x_kube(validation = Rule::new("self.type != 'Code' || has(self.code)").message("a Code step needs code"))]
#[serde(rename_all = "camelCase")]
pub struct TaskStep {
    /// Names the step in the status.
    pub name: String,
    #[serde(rename = "type")]
    pub type_: StepType,
    /// FilePatch: the file (relative to the workspace) that `content` replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// FilePatch: the file's whole content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// FilePatch: a unified diff of one or more files, applied all or nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    /// Command: argv.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Command: the working folder, relative to the workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<String>,
    /// Command: added to the environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Code: Python source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// Where a Task is.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum TaskState {
    /// Waiting for its Sandbox to be Ready.
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
}

/// How one step went.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepResult {
    pub name: String,
    /// 0 for success; a command's exit code; 1 for a cell that raised or a patch refused.
    pub exit_code: i32,
    /// The last 4 KiB of its output.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stdout: String,
    /// The last 4 KiB of its errors (a cell's exception, a refusal's message).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stderr: String,
    pub duration_ms: u64,
}

/// What the Task controller observed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskStatus {
    pub state: TaskState,
    /// The last step run's exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The last step run's output tail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    /// The last step run's error tail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    /// How long the last attempt took, e.g. `1.25s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// The steps of the last attempt, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepResult>,
    /// Attempts made.
    #[serde(default)]
    pub attempts: i32,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// Why it is where it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Complete` (True once Succeeded or Failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

mod defaults {
    pub fn replicas() -> i32 {
        1
    }
    pub fn max_replicas() -> i32 {
        10
    }
    pub fn sessions_per_pod() -> i32 {
        256
    }
    pub fn target_utilization() -> f64 {
        0.7
    }
    pub fn headroom_sessions() -> i32 {
        16
    }
    pub fn scale_down_delay_seconds() -> i64 {
        300
    }
    pub fn drain_timeout_seconds() -> i64 {
        600
    }
    pub fn keep_alive() -> bool {
        true
    }
}

/// The CRDs as `kubectl apply` takes them, one YAML document each, named by file.
pub fn crd_files() -> Result<Vec<(String, String)>, serde_yaml::Error> {
    use kube::CustomResourceExt;
    [WarmPool::crd(), Sandbox::crd(), Task::crd()]
        .into_iter()
        .map(|crd| {
            let name = format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or_default());
            let header = "# Generated by `cargo run -p arl-operator --bin crdgen` from \
                          operator/src/crd.rs; do not edit.\n";
            Ok((name, format!("{header}{}", serde_yaml::to_string(&crd)?)))
        })
        .collect()
}
