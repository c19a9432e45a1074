//! `deploy/` checked offline: the CRDs are what the Rust types generate, the samples pass
//! their schemas and CEL rules (and the invalid ones fail for the reason they state), and
//! every built-in manifest validates against the Kubernetes 1.34 schemas.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::path::{Path, PathBuf};

use arl_operator::crd::crd_files;
use kube::core::cel::Validator;
use serde::Deserialize as _;
use serde_json::Value;

/// What `deploy/validate.py` imports, pinned.
const PYTOOLS: [&str; 2] = ["kubernetes-validate==1.34.1", "jsonschema==4.26.0"];

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML in {}", dir.display());
    files
}

#[test]
fn checked_in_crds_are_what_crdgen_writes() {
    for dir in ["crds", "helm/arl/crds"] {
        for (name, generated) in crd_files().unwrap() {
            let path = deploy().join(dir).join(&name);
            let on_disk = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                on_disk == generated,
                "{} differs from operator/src/crd.rs: run `cargo run -p arl-operator --bin crdgen`",
                path.display()
            );
        }
    }
}

/// The openAPIV3Schema of each kind, from the generated CRDs.
fn schemas() -> Vec<(String, Value)> {
    crd_files()
        .unwrap()
        .into_iter()
        .map(|(_, yaml)| {
            let crd: Value = serde_yaml::from_str(&yaml).unwrap();
            let kind = crd["spec"]["names"]["kind"].as_str().unwrap().to_owned();
            (
                kind,
                crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone(),
            )
        })
        .collect()
}

/// The CEL rules of `object`'s CRD, evaluated the way the API server does (with defaults).
fn cel(object: &Value) -> Result<(), String> {
    let kind = object["kind"].as_str().unwrap();
    let (_, schema) = schemas()
        .into_iter()
        .find(|(k, _)| k == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"));
    Validator::new()
        .validate(&schema, object, None)
        .map_err(|errors| {
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        })
}

#[test]
fn samples_pass_their_cel_rules() {
    for path in yaml_files(&deploy().join("samples")) {
        let object: Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(
            object["apiVersion"],
            "arl.infra.io/v1alpha1",
            "{}",
            path.display()
        );
        if let Err(e) = cel(&object) {
            panic!("{} breaks a rule: {e}", path.display());
        }
        // And they are what the Rust types read.
        match object["kind"].as_str().unwrap() {
            "WarmPool" => {
                drop(serde_json::from_value::<arl_operator::crd::WarmPool>(object).unwrap())
            }
            "Sandbox" => {
                drop(serde_json::from_value::<arl_operator::crd::Sandbox>(object).unwrap())
            }
            "Task" => drop(serde_json::from_value::<arl_operator::crd::Task>(object).unwrap()),
            other => panic!("{}: unexpected kind {other}", path.display()),
        }
    }
}

#[test]
fn invalid_samples_fail_for_the_reason_they_state() {
    for path in yaml_files(&deploy().join("samples/invalid")) {
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", path.display()));
        let object: Value = serde_yaml::from_str(&text).unwrap();
        // A required field missing is the schema's to catch (deploy/validate.py does); the
        // Rust type refuses it too.
        let refused = match cel(&object) {
            Err(e) => e,
            Ok(()) => match object["kind"].as_str().unwrap() {
                "Sandbox" => serde_json::from_value::<arl_operator::crd::Sandbox>(object)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
                _ => String::new(),
            },
        };
        assert!(
            refused.contains(expect),
            "{}: expected an error containing {expect:?}, got {refused:?}",
            path.display()
        );
    }
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    if std::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        panic!("kubectl is needed to render deploy/ (`kubectl kustomize`); install it");
    }
    let tools = arl_e2e::pytools(&PYTOOLS);
    let out = std::process::Command::new(arl_e2e::python())
        .arg(deploy().join("validate.py"))
        .arg("--pythonpath")
        .arg(&tools)
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "deploy/validate.py failed:\n{report}");
    assert!(
        report.contains("Deployment arl-system/arl-operator")
            && report.contains("Deployment arl-system/arl-gateway"),
        "{report}"
    );
    assert!(report.contains("WarmPool python"), "{report}");
}

/// Every object `kubectl kustomize deploy/operator` renders, by kind and name.
fn rendered_operator() -> Vec<Value> {
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy().join("operator"))
        .output()
        .expect("kubectl is needed to render deploy/ (`kubectl kustomize`); install it");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_yaml::from_value::<Value>(serde_yaml::Value::deserialize(doc).unwrap()))
        .collect::<Result<_, _>>()
        .unwrap()
}

fn object<'a>(all: &'a [Value], kind: &str, name: &str) -> &'a Value {
    all.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The process that parses clients' traffic (the gateway) runs under its own ServiceAccount,
/// whose role only reads; the controllers, which write, serve no port.
#[test]
fn the_gateway_runs_apart_and_may_only_read() {
    let all = rendered_operator();
    let gateway = object(&all, "Deployment", "arl-gateway");
    let pod = &gateway["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "arl-gateway");
    let env = &pod["containers"][0]["env"];
    let components = env
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "ARL_COMPONENTS");
    assert_eq!(components.unwrap()["value"], "gateway");
    let role = object(&all, "ClusterRole", "arl-gateway");
    for rule in role["rules"].as_array().unwrap() {
        for verb in rule["verbs"].as_array().unwrap() {
            assert!(
                ["get", "list", "watch"].contains(&verb.as_str().unwrap()),
                "the gateway may {verb} {}",
                rule["resources"]
            );
        }
    }
    let binding = object(&all, "ClusterRoleBinding", "arl-gateway");
    assert_eq!(binding["roleRef"]["name"], "arl-gateway");
    assert_eq!(binding["subjects"][0]["name"], "arl-gateway");
    let service = object(&all, "Service", "arl-gateway");
    assert_eq!(
        service["spec"]["selector"]["app.kubernetes.io/name"],
        gateway["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
    );

    let controllers = object(&all, "Deployment", "arl-operator");
    let pod = &controllers["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "arl-operator");
    let container = &pod["containers"][0];
    assert!(
        container["ports"].is_null(),
        "the controllers serve no client"
    );
    let env = container["env"].as_array().unwrap();
    let value = |name: &str| env.iter().find(|e| e["name"] == name).cloned();
    assert_eq!(value("ARL_COMPONENTS").unwrap()["value"], "controllers");
    assert!(
        value("ARL_AUTH_TOKEN").is_none(),
        "no client token where no client is served"
    );
    let role = object(&all, "ClusterRole", "arl-operator");
    let secrets = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resources"][0] == "secrets")
        .unwrap();
    assert_eq!(
        secrets["verbs"],
        serde_json::json!(["create", "patch"]),
        "never read"
    );
}
