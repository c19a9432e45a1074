//! Every manager pod the operator knows, with its last load: what placement, autoscaling and
//! the gateway read. Filled from a Pod watch in a cluster, or from a static list.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Instant, SystemTime};

use k8s_openapi::api::core::v1::Pod;

use crate::crd::{
    DRAINING_ANNOTATION, MANAGER_CONTAINER, POOL_LABEL, RUNTIME_ANNOTATION, WarmPool,
};
use crate::manager::{Endpoint, Load, Managers};
use crate::token::TokenKey;

/// The key a manager is known by, and the prefix of every session id it hands out: its pod's
/// `<namespace>.<name>` in a cluster (a namespace holds no dot, so the two never blur and a
/// pod of one namespace can never stand in for its namesake in another), the backend's name
/// outside one.
pub fn member_key(namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        name.to_owned()
    } else {
        format!("{namespace}.{name}")
    }
}

/// One manager.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The pod's name (a static backend's name).
    pub name: String,
    /// The pod's namespace (empty for a static backend).
    pub namespace: String,
    /// The WarmPool it belongs to (empty for a static backend).
    pub pool: String,
    /// The runtime its pool serves.
    pub runtime: Option<String>,
    pub endpoint: Endpoint,
    /// `ip:port` of its gRPC API, if it has one.
    pub grpc: Option<String>,
    /// Kubernetes says it is Ready (a static backend always is).
    pub ready: bool,
    /// It is being drained and takes no new sessions.
    pub draining: bool,
    /// Its last load, and when it was read; `None` until read, or after a failed read.
    pub load: Option<(Load, Instant)>,
}

impl Member {
    /// What the fleet knows it by: see [`member_key`].
    pub fn key(&self) -> String {
        member_key(&self.namespace, &self.name)
    }

    /// Whether it can take a new session now, as far as its last load says.
    pub fn accepts(&self) -> bool {
        self.serving() && self.load.is_some_and(|(l, _)| l.sessions < l.capacity)
    }

    /// Whether it answers and takes sessions at all, full or not.
    pub fn serving(&self) -> bool {
        self.ready && !self.draining && self.load.is_some_and(|(l, _)| !l.draining)
    }

    /// What a Pod of a WarmPool makes; `None` until it has an IP, and `None` for a pod that
    /// none of `pools` controls: a pool label and a container named `manager` are anyone's to
    /// write, so only the controller owner reference to a known WarmPool (its UID) lets a pod
    /// receive sessions, code and tokens.
    pub fn from_pod(pod: &Pod, tokens: &TokenKey, pools: &KnownPools) -> Option<Self> {
        let meta = &pod.metadata;
        let name = meta.name.clone()?;
        let namespace = meta.namespace.clone().unwrap_or_default();
        let pool = meta.labels.as_ref()?.get(POOL_LABEL)?.clone();
        let uid = pools.get(&(namespace.clone(), pool.clone()))?;
        let controlled = meta.owner_references.iter().flatten().any(|owner| {
            owner.controller == Some(true)
                && owner.kind == "WarmPool"
                && owner.api_version == WARM_POOL_API_VERSION
                && owner.name == pool
                && &owner.uid == uid
        });
        if !controlled {
            return None;
        }
        let status = pod.status.as_ref()?;
        let ip = status.pod_ip.clone()?;
        let container = pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .find(|c| c.name == MANAGER_CONTAINER)?;
        let port = |wanted: &str| {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(wanted))
                .map(|p| p.container_port)
        };
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip
        };
        let ready = status.phase.as_deref() == Some("Running")
            && meta.deletion_timestamp.is_none()
            && status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
        let draining = meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(DRAINING_ANNOTATION));
        let runtime = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(RUNTIME_ANNOTATION))
            .cloned();
        Some(Self {
            endpoint: Endpoint {
                http: format!("http://{host}:{}", port("http").unwrap_or(8080)),
                token: Some(tokens.pool_token(&namespace, &pool)),
            },
            grpc: port("grpc").map(|p| format!("{host}:{p}")),
            name,
            namespace,
            pool,
            runtime,
            ready,
            draining,
            load: None,
        })
    }
}

/// The `apiVersion` a pod's owner reference names a WarmPool by.
const WARM_POOL_API_VERSION: &str = "arl.infra.io/v1alpha1";

/// The WarmPools the operator watches: (namespace, name) to UID.
pub type KnownPools = BTreeMap<(String, String), String>;

/// `pools` as [`Member::from_pod`] checks pods against.
pub fn known_pools<'a>(pools: impl IntoIterator<Item = &'a WarmPool>) -> KnownPools {
    pools
        .into_iter()
        .filter_map(|p| {
            let meta = &p.metadata;
            Some((
                (
                    meta.namespace.clone().unwrap_or_default(),
                    meta.name.clone()?,
                ),
                meta.uid.clone()?,
            ))
        })
        .collect()
}

/// Why a new session has nowhere to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unplaced {
    /// Managers serve the runtime, but every one is full or draining.
    Full,
    /// No manager serves it.
    NoBackends,
}

/// The shared map of members by [`member_key`]. Cheap to clone.
#[derive(Clone, Default, Debug)]
pub struct Fleet {
    members: Arc<RwLock<BTreeMap<String, Member>>>,
}

/// The runtime a manager loads to serve sessions of `runtime`: a `typescript` session is the
/// JavaScript runtime's, its cells' types stripped.
pub fn loaded_runtime(runtime: &str) -> &str {
    match runtime {
        "typescript" => "javascript",
        other => other,
    }
}

/// What the manager of a pool of `runtime` loads (its `ARL_RUNTIMES`): the pool's runtime,
/// and JavaScript in every pool, small as it is, so that every sandbox has its `js` and `ts`
/// kernels (E2B's languages) and any manager can take a JavaScript session.
pub fn pool_runtimes(runtime: &str) -> String {
    match loaded_runtime(runtime) {
        "javascript" => "javascript".to_owned(),
        other => format!("{other},javascript"),
    }
}

/// Whether a manager of a pool of `pool_runtime` serves sessions of `asked`.
fn serves_runtime(pool_runtime: &str, asked: &str) -> bool {
    let asked = loaded_runtime(asked);
    let wasm = pool_runtime != crate::crd::CONTAINER_RUNTIME;
    (wasm && asked == "javascript") || loaded_runtime(pool_runtime) == asked
}

impl Fleet {
    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<String, Member>> {
        self.members.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<String, Member>> {
        self.members.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds or updates `member`, keeping its last load if its address is unchanged.
    pub fn upsert(&self, mut member: Member) {
        let mut members = self.write();
        let key = member.key();
        if let Some(old) = members.get(&key)
            && old.endpoint == member.endpoint
        {
            member.load = old.load;
        }
        members.insert(key, member);
    }

    /// Makes the fleet exactly `members` (loads kept where addresses match).
    pub fn replace(&self, members: impl IntoIterator<Item = Member>) {
        let fresh: BTreeMap<_, _> = members.into_iter().map(|m| (m.key(), m)).collect();
        self.write().retain(|key, _| fresh.contains_key(key));
        for member in fresh.into_values() {
            self.upsert(member);
        }
    }

    /// The member whose key (the prefix of its session ids) is `key`.
    pub fn get(&self, key: &str) -> Option<Member> {
        self.read().get(key).cloned()
    }

    /// The member that is pod `name` of `namespace`.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Member> {
        self.get(&member_key(namespace, name))
    }

    pub fn members(&self) -> Vec<Member> {
        self.read().values().cloned().collect()
    }

    /// Records a load read (or, with `None`, that the manager did not answer).
    pub fn set_load(&self, key: &str, load: Option<Load>) {
        if let Some(m) = self.write().get_mut(key) {
            m.load = load.map(|l| (l, Instant::now()));
        }
    }

    /// Counts a session just placed on member `key`, so that placements between two load
    /// reads spread instead of piling onto the pod that looked emptiest.
    pub fn note_placed(&self, key: &str) {
        if let Some(m) = self.write().get_mut(key)
            && let Some((load, _)) = m.load.as_mut()
        {
            load.sessions += 1;
        }
    }

    /// Records that member `key` refused a session for want of room, until its next load read.
    pub fn note_full(&self, key: &str) {
        if let Some(m) = self.write().get_mut(key)
            && let Some((load, _)) = m.load.as_mut()
        {
            load.sessions = load.sessions.max(load.capacity);
        }
    }

    /// Where a new session of `runtime` (in WarmPool `pool`, if given) may go, least utilised
    /// first, among the members `also` accepts. When every load says full, the serving
    /// members are still offered: loads are a few seconds old and placements since are
    /// estimates, so the managers themselves say whether they are full.
    pub fn place(
        &self,
        runtime: &str,
        pool: Option<&str>,
        also: impl Fn(&Member) -> bool,
    ) -> Result<Vec<Member>, Unplaced> {
        let serves = |m: &Member| {
            m.runtime
                .as_deref()
                .is_none_or(|r| serves_runtime(r, runtime))
                && pool.is_none_or(|p| p == m.pool)
                && also(m)
        };
        let mut found = self.candidates(serves);
        if found.is_empty() {
            found = self.ranked(|m| m.serving() && serves(m));
        }
        if !found.is_empty() {
            Ok(found)
        } else if self.read().values().any(serves) {
            Err(Unplaced::Full)
        } else {
            Err(Unplaced::NoBackends)
        }
    }

    /// Members that take new sessions and match `wanted`, least utilised first.
    pub fn candidates(&self, wanted: impl Fn(&Member) -> bool) -> Vec<Member> {
        self.ranked(|m| m.accepts() && wanted(m))
    }

    /// Where a session moved out of a drained pod is looked for: the serving member of
    /// `namespace` first by key, of those not in `tried`. Every caller (the gateway, the
    /// Sandbox controller) asks in this same order, so a session released for any manager is
    /// resumed by one, not by two at once.
    pub fn next_holder(&self, namespace: &str, tried: &[String]) -> Option<Member> {
        self.read()
            .values()
            .filter(|m| m.namespace == namespace && m.serving() && !tried.contains(&m.key()))
            .min_by_key(|m| m.key())
            .cloned()
    }

    /// Members matching `wanted`, least utilised first.
    pub fn ranked(&self, wanted: impl Fn(&Member) -> bool) -> Vec<Member> {
        let mut found: Vec<Member> = self
            .read()
            .values()
            .filter(|m| wanted(m))
            .cloned()
            .collect();
        found.sort_by(|a, b| {
            let u = |m: &Member| m.load.map_or(1.0, |(l, _)| l.utilization());
            u(a).total_cmp(&u(b)).then_with(|| a.key().cmp(&b.key()))
        });
        found
    }

    /// The loads of every member whose load is known, summed.
    pub fn total_load(&self) -> Load {
        let mut total = Load::default();
        for (load, _) in self.read().values().filter_map(|m| m.load) {
            total.sessions += load.sessions;
            total.capacity += load.capacity;
            total.memory_bytes += load.memory_bytes;
        }
        total
    }

    /// Reads every ready member's load, all at once.
    pub async fn poll(&self, managers: &Managers) {
        let ready: Vec<Member> = self.read().values().filter(|m| m.ready).cloned().collect();
        let reads = ready
            .iter()
            .map(|m| async move { (m.key(), managers.load(&m.endpoint).await) });
        for (key, load) in futures_util::future::join_all(reads).await {
            if let Err(e) = &load {
                tracing::debug!(pod = key, error = %e, "load not read");
            }
            self.set_load(&key, load.ok());
        }
    }

    /// Polls every `interval` until the task is dropped.
    pub async fn poll_every(self, managers: Managers, interval: std::time::Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.poll(&managers).await;
        }
    }
}

/// When a pod started draining, from its annotation.
pub fn draining_since(pod: &Pod) -> Option<SystemTime> {
    let value = pod
        .metadata
        .annotations
        .as_ref()?
        .get(DRAINING_ANNOTATION)?;
    let ts: k8s_openapi::jiff::Timestamp = value.parse().ok()?;
    Some(SystemTime::from(ts))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn member(name: &str, runtime: &str) -> Member {
        let load = Load {
            sessions: 0,
            capacity: 10,
            memory_bytes: 0,
            draining: false,
        };
        Member {
            name: name.into(),
            namespace: String::new(),
            pool: String::new(),
            runtime: Some(runtime.into()),
            endpoint: Endpoint {
                http: format!("http://{name}"),
                token: None,
            },
            grpc: None,
            ready: true,
            draining: false,
            load: Some((load, Instant::now())),
        }
    }

    #[test]
    fn javascript_sessions_go_to_any_manager_python_ones_to_pythons() {
        let fleet = Fleet::default();
        fleet.replace([
            member("py", "python"),
            member("js", "javascript"),
            member("box", "container"),
        ]);
        let placed = |runtime: &str| -> Vec<String> {
            let members = fleet.place(runtime, None, |_| true).unwrap();
            members.into_iter().map(|m| m.name).collect()
        };
        // Every WASM manager loads JavaScript: a JavaScript session may land on any of them,
        // never on a container pod, which is one sandbox of its own kind.
        for runtime in ["typescript", "javascript"] {
            let mut all = placed(runtime);
            all.sort();
            assert_eq!(all, ["js", "py"], "{runtime}");
        }
        assert_eq!(placed("python"), ["py"]);
        assert_eq!(placed("container"), ["box"]);
        assert!(matches!(
            fleet.place("ruby", None, |_| true),
            Err(Unplaced::NoBackends)
        ));
    }
}
