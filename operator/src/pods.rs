//! The pods and Secret a WarmPool owns, built from its spec.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    EnvVarSource, HTTPGetAction, ObjectFieldSelector, Pod, PodSecurityContext, PodSpec, Probe,
    SeccompProfile, Secret, SecretEnvSource, SecretKeySelector, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use crate::crd::{MANAGER_CONTAINER, POOL_LABEL, RUNTIME_ANNOTATION, SessionStore, WarmPool};
use crate::token::TokenKey;

/// Port of the manager's HTTP API in a pod.
pub const HTTP_PORT: i32 = 8080;
/// Port of its gRPC API.
pub const GRPC_PORT: i32 = 50051;

/// Labels on every pod of `pool`: also its selector.
pub fn labels(pool: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "arl-manager".to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "arl-operator".to_owned(),
        ),
        (POOL_LABEL.to_owned(), pool.to_owned()),
    ])
}

/// `labels` as a selector string.
pub fn selector(pool: &str) -> String {
    format!("{POOL_LABEL}={pool}")
}

/// The pods allowed to reach managers, in the operator's namespace: the controllers (which
/// drain managers and place Sandboxes) and the gateway.
pub const CONTROL_PLANE: [&str; 2] = ["arl-operator", "arl-gateway"];

/// The NetworkPolicy of a pool's pods, owned by the pool: their managers' ports are reached
/// only from the control plane's pods in `system_namespace`, and they reach nothing (a guest
/// has no socket; the manager needs no network but its clients) unless the pool has a
/// `network`: then DNS, and the ports its rules name (80 and 443 by default) on public
/// addresses, and on the private addresses a rule names. The manager checks host names
/// itself; a NetworkPolicy cannot.
pub fn network_policy(pool: &WarmPool, system_namespace: &str) -> NetworkPolicy {
    let name = pool.metadata.name.clone().unwrap_or_default();
    let port = |port: i32| NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    };
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(network_policy_name(&name)),
            namespace: pool.metadata.namespace.clone(),
            labels: Some(labels(&name)),
            owner_references: pool.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(POOL_LABEL.to_owned(), name)])),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![NetworkPolicyPeer {
                    namespace_selector: Some(LabelSelector {
                        match_labels: Some(BTreeMap::from([(
                            "kubernetes.io/metadata.name".to_owned(),
                            system_namespace.to_owned(),
                        )])),
                        ..LabelSelector::default()
                    }),
                    pod_selector: Some(LabelSelector {
                        match_expressions: Some(vec![LabelSelectorRequirement {
                            key: "app.kubernetes.io/name".into(),
                            operator: "In".into(),
                            values: Some(CONTROL_PLANE.map(str::to_owned).to_vec()),
                        }]),
                        ..LabelSelector::default()
                    }),
                    ..NetworkPolicyPeer::default()
                }]),
                ports: Some(vec![port(HTTP_PORT), port(GRPC_PORT)]),
            }]),
            egress: Some({
                // What sessions may reach, and the session store the managers write to.
                let mut rules: Vec<String> = pool
                    .spec
                    .network
                    .as_ref()
                    .map(|n| n.allow.clone())
                    .unwrap_or_default();
                rules.extend(
                    pool.spec
                        .session_store
                        .as_ref()
                        .map(SessionStore::egress_rule),
                );
                if rules.is_empty() {
                    vec![]
                } else {
                    egress(&rules)
                }
            }),
        }),
    }
}

/// Private, loopback, link-local (cloud metadata) and shared ranges: what a name's addresses
/// may not be, so the NetworkPolicy keeps them closed too.
const PRIVATE_V4: [&str; 6] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
];
const PRIVATE_V6: [&str; 3] = ["fc00::/7", "fe80::/10", "::1/128"];

/// The egress a pool's rules need: DNS; each named host's ports on public addresses; each
/// named address on its ports.
fn egress(allow: &[String]) -> Vec<NetworkPolicyEgressRule> {
    let port = |port: u16, protocol: &str| NetworkPolicyPort {
        port: Some(IntOrString::Int(i32::from(port))),
        protocol: Some(protocol.into()),
        ..NetworkPolicyPort::default()
    };
    let block = |cidr: String, except: &[&str]| NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr,
            except: (!except.is_empty()).then(|| except.iter().map(|s| (*s).to_owned()).collect()),
        }),
        ..NetworkPolicyPeer::default()
    };
    let mut rules = vec![NetworkPolicyEgressRule {
        to: None,
        ports: Some(vec![port(53, "UDP"), port(53, "TCP")]),
    }];
    let mut public_ports = std::collections::BTreeSet::new();
    for rule in allow {
        let (host, ports) = split_rule(rule);
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                let bits = if ip.is_ipv4() { 32 } else { 128 };
                rules.push(NetworkPolicyEgressRule {
                    to: Some(vec![block(format!("{ip}/{bits}"), &[])]),
                    ports: Some(ports.iter().map(|p| port(*p, "TCP")).collect()),
                });
            }
            Err(_) => public_ports.extend(ports),
        }
    }
    if !public_ports.is_empty() {
        rules.push(NetworkPolicyEgressRule {
            to: Some(vec![
                block("0.0.0.0/0".into(), &PRIVATE_V4),
                block("::/0".into(), &PRIVATE_V6),
            ]),
            ports: Some(public_ports.into_iter().map(|p| port(p, "TCP")).collect()),
        });
    }
    rules
}

/// A rule's host (brackets dropped) and its ports: the one it names, else 80 and 443.
fn split_rule(rule: &str) -> (&str, Vec<u16>) {
    let rule = rule.trim();
    let (host, port) = match rule.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, tail)) => (ip, tail.strip_prefix(':')),
            None => (rest, None),
        },
        None if rule.matches(':').count() == 1 => match rule.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rule, None),
        },
        None => (rule, None),
    };
    match port.and_then(|p| p.parse::<u16>().ok()) {
        Some(p) => (host, vec![p]),
        None => (host, vec![80, 443]),
    }
}

/// Name of the NetworkPolicy of a pool's pods.
pub fn network_policy_name(pool: &str) -> String {
    format!("{pool}-arl-manager")
}

/// Disk a pool pod's data folder may use when its template says nothing.
pub const DATA_SIZE_LIMIT: &str = "10Gi";

/// Name of the Secret holding the pool's manager token.
pub fn token_secret_name(pool: &str) -> String {
    format!("{pool}-manager-token")
}

/// The Secret holding the pool's manager token, owned by the pool.
pub fn token_secret(pool: &WarmPool, tokens: &TokenKey) -> Secret {
    let name = pool.metadata.name.clone().unwrap_or_default();
    let namespace = pool.metadata.namespace.clone().unwrap_or_default();
    Secret {
        metadata: ObjectMeta {
            name: Some(token_secret_name(&name)),
            namespace: Some(namespace.clone()),
            labels: Some(labels(&name)),
            owner_references: pool.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        string_data: Some(BTreeMap::from([(
            "token".to_owned(),
            tokens.pool_token(&namespace, &name),
        )])),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    }
}

/// An environment variable the kubelet fills from the pod's own `path` (downward API).
fn field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

fn locked_down() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// The container a container pool's runtime image runs in.
pub const RUNTIME_CONTAINER: &str = "runtime";
/// The volume the agent's binary and socket are shared through.
const AGENT_VOLUME: &str = "agent";
/// Where that volume is mounted in the manager and runtime containers.
const AGENT_DIR: &str = "/arl";
/// The agent's socket.
const AGENT_SOCKET: &str = "/arl/run/agent.sock";
/// `arl-exec` in the manager image.
const AGENT_IN_IMAGE: &str = "/usr/local/bin/arl-exec";

/// A new pod for `pool` (named by the API server from `<pool>-`).
pub fn manager_pod(pool: &WarmPool, default_image: &str) -> Pod {
    let name = pool.metadata.name.clone().unwrap_or_default();
    let spec = &pool.spec;
    let overrides = spec.template.clone().unwrap_or_default();
    let runtime = spec.runtime_name();
    let workspace = VolumeMount {
        name: "data".into(),
        mount_path: "/var/lib/arl".into(),
        ..VolumeMount::default()
    };
    let data_size = overrides
        .data_size_limit
        .clone()
        .unwrap_or_else(|| Quantity(DATA_SIZE_LIMIT.into()));
    let mut resources = overrides.resources.clone().unwrap_or_default();
    resources
        .limits
        .get_or_insert_with(BTreeMap::new)
        .entry("ephemeral-storage".into())
        .or_insert_with(|| data_size.clone());
    // A shared session store: where suspended sessions go, and drained ones move through.
    let store = spec.session_store.as_ref();
    let mut manager = Container {
        name: MANAGER_CONTAINER.into(),
        image: Some(
            overrides
                .image
                .clone()
                .unwrap_or_else(|| default_image.to_owned()),
        ),
        args: Some(vec!["serve".into()]),
        env: Some(vec![
            env("ARL_LISTEN", format!("0.0.0.0:{HTTP_PORT}")),
            env("ARL_GRPC_LISTEN", format!("0.0.0.0:{GRPC_PORT}")),
            env("ARL_MAX_SESSIONS", spec.pod_capacity().to_string()),
            env("ARL_RUNTIMES", crate::fleet::pool_runtimes(&runtime)),
            env("ARL_DATA_DIR", "/var/lib/arl"),
            // The pool's egress is every session's default and bound; none: no network.
            env(
                "ARL_NETWORK_ALLOW",
                spec.network
                    .as_ref()
                    .map_or_else(|| "none".to_owned(), |n| n.allow.join(",")),
            ),
            field("POD_NAMESPACE", "metadata.namespace"),
            field("POD_NAME", "metadata.name"),
            // The fleet's key for this pod (`fleet::member_key`), expanded by the kubelet.
            env("ARL_ID_PREFIX", "$(POD_NAMESPACE).$(POD_NAME)"),
            EnvVar {
                name: "ARL_AUTH_TOKEN".into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: token_secret_name(&name),
                        key: "token".into(),
                        optional: Some(false),
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            },
        ]),
        env_from: store
            .and_then(|s| s.credentials_secret.clone())
            .map(|name| {
                vec![EnvFromSource {
                    secret_ref: Some(SecretEnvSource {
                        name,
                        optional: Some(false),
                    }),
                    ..EnvFromSource::default()
                }]
            }),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".into()),
                container_port: HTTP_PORT,
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("grpc".into()),
                container_port: GRPC_PORT,
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(probe("/readyz", 2)),
        liveness_probe: Some(probe("/healthz", 10)),
        resources: Some(resources),
        security_context: Some(locked_down()),
        volume_mounts: Some(vec![workspace.clone()]),
        ..Container::default()
    };
    if let (Some(network), Some(env_vars)) = (&spec.network, manager.env.as_mut()) {
        let budgets = [
            ("ARL_NETWORK_MAX_BYTES", network.max_bytes),
            ("ARL_NETWORK_MAX_REQUESTS", network.max_requests),
        ];
        env_vars.extend(
            budgets
                .into_iter()
                .filter_map(|(k, v)| Some(env(k, v?.to_string()))),
        );
    }
    if let (Some(store), Some(env_vars)) = (store, manager.env.as_mut()) {
        env_vars.push(env("ARL_STORE", store.url.clone()));
        if let Some(endpoint) = &store.endpoint {
            env_vars.push(env("AWS_ENDPOINT", endpoint.clone()));
            env_vars.push(env(
                "AWS_ALLOW_HTTP",
                endpoint.starts_with("http://").to_string(),
            ));
        }
    }
    let mut containers = Vec::new();
    let mut init_containers = None;
    let mut volumes = vec![Volume {
        name: "data".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(data_size),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    }];
    if let Some(runtime) = &spec.runtime.container {
        // The pod is one sandbox: the agent runs the session's commands in the runtime
        // container, the manager fronts it over a socket in a volume they share.
        let agent = VolumeMount {
            name: AGENT_VOLUME.into(),
            mount_path: AGENT_DIR.into(),
            ..VolumeMount::default()
        };
        volumes.push(Volume {
            name: AGENT_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        });
        init_containers = Some(vec![Container {
            name: "install-agent".into(),
            image: manager.image.clone(),
            // The workspace is made here, by the pods' user, before the runtime container
            // mounts it as a subPath (which the kubelet would otherwise make as root).
            command: Some(vec![
                AGENT_IN_IMAGE.into(),
                "--install".into(),
                format!("{AGENT_DIR}/bin"),
                "--workspace".into(),
                "/var/lib/arl/workspace".into(),
            ]),
            volume_mounts: Some(vec![agent.clone(), workspace.clone()]),
            security_context: Some(locked_down()),
            ..Container::default()
        }]);
        if let Some(env_vars) = manager.env.as_mut() {
            env_vars.retain(|e| e.name != "ARL_RUNTIMES"); // it loads none
            env_vars.push(env("ARL_AGENT", format!("unix:{AGENT_SOCKET}")));
            env_vars.push(env("ARL_WORKSPACE", "/var/lib/arl/workspace"));
        }
        if let Some(mounts) = manager.volume_mounts.as_mut() {
            mounts.push(agent.clone());
        }
        let mut command = vec![
            format!("{AGENT_DIR}/bin/arl-exec"),
            "--listen".into(),
            format!("unix:{AGENT_SOCKET}"),
            "--workspace".into(),
            "/workspace".into(),
        ];
        let service: Vec<String> = runtime
            .command
            .iter()
            .flatten()
            .chain(runtime.args.iter().flatten())
            .cloned()
            .collect();
        if !service.is_empty() {
            command.push("--".into());
            command.extend(service);
        }
        containers.push(Container {
            name: RUNTIME_CONTAINER.into(),
            image: Some(runtime.image.clone()),
            command: Some(command),
            args: None,
            working_dir: Some("/workspace".into()),
            volume_mounts: Some(vec![
                VolumeMount {
                    mount_path: "/workspace".into(),
                    sub_path: Some("workspace".into()),
                    ..workspace
                },
                agent,
            ]),
            security_context: Some(SecurityContext {
                read_only_root_filesystem: Some(false),
                ..locked_down()
            }),
            ..Container::default()
        });
    }
    containers.insert(0, manager);
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}-")),
            namespace: pool.metadata.namespace.clone(),
            labels: Some(labels(&name)),
            annotations: Some(BTreeMap::from([(RUNTIME_ANNOTATION.to_owned(), runtime)])),
            owner_references: pool.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers,
            init_containers,
            volumes: Some(volumes),
            node_selector: overrides.node_selector,
            tolerations: overrides.tolerations,
            runtime_class_name: overrides.runtime_class_name,
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            restart_policy: Some("Always".into()),
            // A drain has its own timeout; SIGTERM then gives running turns this long.
            termination_grace_period_seconds: Some(15),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(65532),
                run_as_group: Some(65532),
                fs_group: Some(65532),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;
    use crate::crd::DRAINING_ANNOTATION;
    use crate::fleet::{KnownPools, Member, known_pools};
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use serde_json::json;

    fn pool(spec: serde_json::Value) -> WarmPool {
        serde_json::from_value(json!({
            "apiVersion": "arl.infra.io/v1alpha1",
            "kind": "WarmPool",
            "metadata": { "name": "py", "namespace": "agents", "uid": "u-1" },
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn a_pools_manager_loads_the_pools_runtime_and_javascript() {
        for (wasm, loaded) in [
            ("python", "python,javascript"),
            ("javascript", "javascript"),
            ("typescript", "javascript"),
        ] {
            let pod = manager_pod(&pool(json!({ "runtime": { "wasm": wasm } })), "img");
            let env = pod.spec.unwrap().containers[0].env.clone().unwrap();
            let runtimes = env.iter().find(|e| e.name == "ARL_RUNTIMES").unwrap();
            assert_eq!(runtimes.value.as_deref(), Some(loaded), "{wasm}");
        }
    }

    #[test]
    fn a_pools_session_store_and_its_credentials_reach_the_manager() {
        let p = pool(json!({
            "runtime": { "wasm": "python" },
            "sessionStore": { "url": "s3://arl-sessions/agents", "credentialsSecret": "s3-keys" },
        }));
        let manager = manager_pod(&p, "img").spec.unwrap().containers[0].clone();
        let env = manager.env.unwrap();
        let store = env.iter().find(|e| e.name == "ARL_STORE").unwrap();
        assert_eq!(store.value.as_deref(), Some("s3://arl-sessions/agents"));
        let from = manager.env_from.unwrap();
        assert_eq!(from[0].secret_ref.as_ref().unwrap().name, "s3-keys");
        let policy = network_policy(&p, "arl-system").spec.unwrap();
        let egress = policy.egress.unwrap();
        assert!(
            egress.iter().any(|r| r
                .ports
                .iter()
                .flatten()
                .any(|p| p.port == Some(IntOrString::Int(443)))),
            "the store's API is reachable: {egress:?}"
        );
        let minio = pool(json!({
            "runtime": { "wasm": "python" },
            "sessionStore": { "url": "s3://s/p", "endpoint": "http://10.0.0.9:9000" },
        }));
        let egress = network_policy(&minio, "arl-system")
            .spec
            .unwrap()
            .egress
            .unwrap();
        let to_minio = egress.iter().find(|r| {
            r.to.iter()
                .flatten()
                .any(|p| p.ip_block.as_ref().is_some_and(|b| b.cidr == "10.0.0.9/32"))
        });
        assert!(to_minio.is_some(), "{egress:?}");
        let env = manager_pod(&minio, "img").spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap();
        assert!(
            env.iter()
                .any(|e| e.name == "AWS_ALLOW_HTTP" && e.value.as_deref() == Some("true"))
        );
        let without = manager_pod(&pool(json!({ "runtime": { "wasm": "python" } })), "img");
        let manager = &without.spec.unwrap().containers[0];
        assert!(manager.env_from.is_none());
        assert!(
            !manager
                .env
                .as_ref()
                .unwrap()
                .iter()
                .any(|e| e.name == "ARL_STORE"),
            "each pod keeps its own sessions"
        );
    }

    #[test]
    fn a_pool_without_network_reaches_nothing_and_its_sessions_get_none() {
        let p = pool(json!({ "runtime": { "wasm": "python" } }));
        let policy = network_policy(&p, "arl-system").spec.unwrap();
        assert_eq!(policy.egress, Some(vec![]));
        let pod = manager_pod(&p, "img");
        let env = pod.spec.unwrap().containers[0].env.clone().unwrap();
        let allow = env.iter().find(|e| e.name == "ARL_NETWORK_ALLOW").unwrap();
        assert_eq!(allow.value.as_deref(), Some("none"));
    }

    #[test]
    fn a_pools_network_opens_dns_its_ports_on_public_addresses_and_its_named_addresses() {
        let p = pool(json!({
            "runtime": { "wasm": "python" },
            "network": { "allow": ["*.pypi.org", "api.example.com:8443", "10.0.0.5:9000"], "maxRequests": 50 },
        }));
        let egress = network_policy(&p, "arl-system")
            .spec
            .unwrap()
            .egress
            .unwrap();
        let rules = serde_json::to_value(&egress).unwrap();
        assert_eq!(
            rules[0],
            json!({"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]})
        );
        assert_eq!(
            rules[1],
            json!({"to": [{"ipBlock": {"cidr": "10.0.0.5/32"}}], "ports": [{"port": 9000, "protocol": "TCP"}]})
        );
        assert_eq!(
            rules[2]["ports"],
            json!([
                {"port": 80, "protocol": "TCP"}, {"port": 443, "protocol": "TCP"}, {"port": 8443, "protocol": "TCP"}
            ])
        );
        let public = &rules[2]["to"][0]["ipBlock"];
        assert_eq!(public["cidr"], "0.0.0.0/0");
        let except: Vec<&str> = public["except"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(
            except.contains(&"10.0.0.0/8") && except.contains(&"169.254.0.0/16"),
            "{except:?}"
        );
        let env = manager_pod(&p, "img").spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap();
        let get = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(
            get("ARL_NETWORK_ALLOW").as_deref(),
            Some("*.pypi.org,api.example.com:8443,10.0.0.5:9000")
        );
        assert_eq!(get("ARL_NETWORK_MAX_REQUESTS").as_deref(), Some("50"));
        assert_eq!(get("ARL_NETWORK_MAX_BYTES"), None);
    }

    fn key() -> TokenKey {
        TokenKey::new(b"sixteen bytes at least".to_vec()).unwrap()
    }

    /// `pod` as the API server names and the kubelet runs it, at `ip`.
    fn running(mut pod: Pod, ip: &str) -> Pod {
        pod.metadata.name = Some("py-x7k2q".into());
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        });
        pod
    }

    #[test]
    fn the_data_folder_is_bounded_as_the_pool_says() {
        let p = pool(json!({
            "runtime": { "wasm": "python" },
            "template": {
                "dataSizeLimit": "40Gi",
                "resources": { "limits": { "ephemeral-storage": "50Gi" } },
            },
        }));
        let pod = manager_pod(&p, "default-image");
        let spec = pod.spec.as_ref().unwrap();
        let data = &spec.volumes.as_ref().unwrap()[0];
        assert_eq!(
            data.empty_dir.as_ref().unwrap().size_limit,
            Some(Quantity("40Gi".into()))
        );
        let limits = spec.containers[0]
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap();
        assert_eq!(
            limits["ephemeral-storage"].0, "50Gi",
            "the pool's own limit stands"
        );
    }

    #[test]
    fn template_overrides_reach_the_pod() {
        let p = pool(json!({
            "runtime": { "wasm": "python" },
            "sessionsPerPod": 64,
            "template": {
                "image": "registry.local/arl-manager:dev",
                "resources": { "limits": { "memory": "8Gi" } },
                "nodeSelector": { "pool": "sandboxes" },
                "tolerations": [{ "key": "sandbox", "operator": "Exists", "effect": "NoSchedule" }],
                "runtimeClassName": "gvisor",
            },
        }));
        let pod = manager_pod(&p, "default-image");
        let spec = pod.spec.as_ref().unwrap();
        let manager = &spec.containers[0];
        assert_eq!(
            manager.image.as_deref(),
            Some("registry.local/arl-manager:dev")
        );
        let limits = manager.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits["memory"].0, "8Gi");
        assert_eq!(limits["ephemeral-storage"].0, "10Gi", "bounded by default");
        let data = &spec.volumes.as_ref().unwrap()[0];
        assert_eq!(
            data.empty_dir.as_ref().unwrap().size_limit,
            Some(Quantity("10Gi".into()))
        );
        assert_eq!(spec.node_selector.as_ref().unwrap()["pool"], "sandboxes");
        assert_eq!(
            spec.tolerations.as_ref().unwrap()[0].key.as_deref(),
            Some("sandbox")
        );
        assert_eq!(spec.runtime_class_name.as_deref(), Some("gvisor"));
        assert_eq!(spec.containers.len(), 1);
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("WarmPool", "u-1", Some(true))
        );
    }

    #[test]
    fn a_container_pool_pod_is_one_sandbox_with_the_agent_as_the_runtimes_entrypoint() {
        let p = pool(json!({
            "runtime": { "container": { "image": "node:22-slim", "command": ["node", "server.js"] } },
            "sessionsPerPod": 50,
            "template": { "runtimeClassName": "gvisor" },
        }));
        let pod = manager_pod(&p, "arl-manager:1");
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.runtime_class_name.as_deref(), Some("gvisor"));
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()[RUNTIME_ANNOTATION],
            "container"
        );
        let install = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(install.image.as_deref(), Some("arl-manager:1"));
        assert_eq!(
            install.command.as_deref().unwrap(),
            [
                "/usr/local/bin/arl-exec",
                "--install",
                "/arl/bin",
                "--workspace",
                "/var/lib/arl/workspace"
            ]
        );
        let mounts: Vec<_> = install
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(mounts, ["/arl", "/var/lib/arl"]);
        let containers = &spec.containers;
        assert_eq!(containers.len(), 2);
        let manager = &containers[0];
        let env: BTreeMap<_, _> = manager
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.as_str(), e.value.as_deref()?)))
            .collect();
        assert_eq!(
            env["ARL_MAX_SESSIONS"], "1",
            "a container pod holds one session"
        );
        assert_eq!(env["ARL_AGENT"], "unix:/arl/run/agent.sock");
        assert_eq!(env["ARL_WORKSPACE"], "/var/lib/arl/workspace");
        assert!(!env.contains_key("ARL_RUNTIMES"));
        let runtime = &containers[1];
        assert_eq!(runtime.image.as_deref(), Some("node:22-slim"));
        assert_eq!(
            runtime.command.as_deref().unwrap(),
            [
                "/arl/bin/arl-exec",
                "--listen",
                "unix:/arl/run/agent.sock",
                "--workspace",
                "/workspace",
                "--",
                "node",
                "server.js"
            ]
        );
        let mounts = runtime.volume_mounts.as_ref().unwrap();
        assert_eq!(
            (
                mounts[0].name.as_str(),
                mounts[0].mount_path.as_str(),
                mounts[0].sub_path.as_deref()
            ),
            ("data", "/workspace", Some("workspace")),
            "the runtime sees only the workspace of the manager's data volume"
        );
        assert_eq!(
            (mounts[1].name.as_str(), mounts[1].mount_path.as_str()),
            ("agent", "/arl")
        );
    }

    #[test]
    fn a_running_pool_pod_becomes_a_fleet_member_the_gateway_can_reach() {
        let p = pool(json!({ "runtime": { "wasm": "python" } }));
        let pod = running(manager_pod(&p, "img"), "10.1.2.3");
        let pools = known_pools([&p]);
        let member = Member::from_pod(&pod, &key(), &pools).unwrap();
        assert_eq!(member.name, "py-x7k2q");
        assert_eq!(
            (member.namespace.as_str(), member.pool.as_str()),
            ("agents", "py")
        );
        assert_eq!(member.runtime.as_deref(), Some("python"));
        assert_eq!(member.endpoint.http, "http://10.1.2.3:8080");
        assert_eq!(member.grpc.as_deref(), Some("10.1.2.3:50051"));
        assert_eq!(
            member.endpoint.token,
            Some(key().pool_token("agents", "py"))
        );
        assert!(member.ready && !member.draining);

        let mut v6 = running(manager_pod(&p, "img"), "fd00::7");
        v6.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(DRAINING_ANNOTATION.into(), "2026-12-01T00:00:00Z".into());
        let member = Member::from_pod(&v6, &key(), &pools).unwrap();
        assert_eq!(member.endpoint.http, "http://[fd00::7]:8080");
        assert!(member.draining, "a draining pod takes no new sessions");

        let mut pending = manager_pod(&p, "img");
        pending.metadata.name = Some("py-new".into());
        assert!(
            Member::from_pod(&pending, &key(), &pools).is_none(),
            "no IP yet, nothing to reach"
        );
    }

    #[test]
    fn only_a_pod_a_known_pool_controls_joins_the_fleet() {
        let p = pool(json!({ "runtime": { "wasm": "python" } }));
        let pools = known_pools([&p]);
        let ours = running(manager_pod(&p, "img"), "10.1.2.3");
        assert!(Member::from_pod(&ours, &key(), &pools).is_some());

        // Labelled like a pool pod, with a container named `manager`, but nobody's.
        let mut forged = ours.clone();
        forged.metadata.owner_references = None;
        assert!(Member::from_pod(&forged, &key(), &pools).is_none());
        // An owner reference naming the pool, with another UID (a deleted or forged pool).
        let mut stale = ours.clone();
        stale.metadata.owner_references.as_mut().unwrap()[0].uid = "u-other".into();
        assert!(Member::from_pod(&stale, &key(), &pools).is_none());
        // Owned, but not as its controller.
        let mut borrowed = ours.clone();
        borrowed.metadata.owner_references.as_mut().unwrap()[0].controller = Some(false);
        assert!(Member::from_pod(&borrowed, &key(), &pools).is_none());
        // The same pool name in another namespace is another pool.
        let mut elsewhere = ours.clone();
        elsewhere.metadata.namespace = Some("intruders".into());
        assert!(Member::from_pod(&elsewhere, &key(), &pools).is_none());
        // A pool the operator does not watch (yet, or any more).
        assert!(Member::from_pod(&ours, &key(), &KnownPools::new()).is_none());
    }

    /// A pod named like one of another namespace's pool (session ids show pod names), owned by
    /// a pool its author made in their own namespace: it joins the fleet beside the first,
    /// under its own key, and never receives the first one's sessions.
    #[test]
    fn a_namesake_pod_in_another_namespace_takes_nothing_of_the_first() {
        let ours = pool(json!({ "runtime": { "wasm": "python" } }));
        let mut theirs = ours.clone();
        theirs.metadata.namespace = Some("intruders".into());
        theirs.metadata.uid = Some("u-2".into());
        let pools = known_pools([&ours, &theirs]);
        let fleet = crate::fleet::Fleet::default();
        fleet.replace(
            [
                running(manager_pod(&ours, "img"), "10.0.0.1"),
                running(manager_pod(&theirs, "img"), "10.0.0.2"),
            ]
            .iter()
            .filter_map(|pod| Member::from_pod(pod, &key(), &pools)),
        );
        assert_eq!(
            fleet.members().len(),
            2,
            "one member each, not one overwriting the other"
        );
        let routed = |prefix: &str| fleet.get(prefix).map(|m| m.endpoint.http);
        assert_eq!(
            routed("agents.py-x7k2q").as_deref(),
            Some("http://10.0.0.1:8080")
        );
        assert_eq!(
            routed("intruders.py-x7k2q").as_deref(),
            Some("http://10.0.0.2:8080")
        );
        assert_eq!(
            routed("py-x7k2q"),
            None,
            "a bare pod name names no pool pod"
        );
        assert_eq!(
            fleet.pod("agents", "py-x7k2q").unwrap().key(),
            "agents.py-x7k2q"
        );
    }
}
