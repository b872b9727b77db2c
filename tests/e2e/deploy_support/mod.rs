//! What the chart's tests share (tests/e2e/deploy.rs and deploy_auth.rs): helm, run by
//! scripts/setup-helm.sh's install, renders the chart, PyYAML in the .venv-deploy
//! virtualenv turns the YAML into JSON (so the tests need no YAML crate), and small
//! accessors read the documents.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::{Map, Value};

pub const CI_VALUES: &str = "deploy/helm/tandem/ci/multi-replica-values.yaml";
/// The chart's defaults, given as a values file so that every render goes through one path.
pub const DEFAULT_VALUES: &str = "deploy/helm/tandem/values.yaml";
pub const TLS_VALUES: &str = "deploy/helm/tandem/ci/tls-values.yaml";
pub const CERT_MANAGER_VALUES: &str = "deploy/helm/tandem/ci/cert-manager-values.yaml";
pub const TRUSTED_VALUES: &str = "deploy/helm/tandem/ci/trusted-network-values.yaml";
pub const NETWORK_POLICY_VALUES: &str = "deploy/helm/tandem/ci/network-policy-values.yaml";
pub const MULTI_MODEL_VALUES: &str = "deploy/helm/tandem/ci/multi-model-values.yaml";
/// The components of a release, and their replicas in ci/multi-replica-values.yaml.
pub const COMPONENTS: [(&str, u64); 3] = [("router", 2), ("prefill", 3), ("decode", 2)];

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a repository script; panics with its output when it fails.
pub fn script(name: &str) -> String {
    let out = Command::new("bash")
        .arg(root().join("scripts").join(name))
        .current_dir(root())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running scripts/{name}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "scripts/{name} failed ({}):\n{stdout}\n{stderr}", out.status);
    stdout
}

/// scripts/setup-helm.sh, once per test process (the tests run in parallel threads).
pub fn setup() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        script("setup-helm.sh");
    });
}

/// The documents `helm template` renders for the multi-replica values, as JSON.
pub fn rendered() -> &'static [Value] {
    static DOCS: OnceLock<Vec<Value>> = OnceLock::new();
    DOCS.get_or_init(|| render(CI_VALUES))
}

/// The documents `helm template` renders for `values` (a file under the repository), as JSON.
pub fn render(values: &str) -> Vec<Value> {
    render_with(values, &[])
}

/// As `render`, with `--set` assignments (`key=value`) over the file.
pub fn render_with(values: &str, sets: &[&str]) -> Vec<Value> {
    let mut args = vec!["-f", values];
    args.extend(sets.iter().flat_map(|s| ["--set", s]));
    helm_template(&args)
}

/// What `helm template` of release `tandem` in namespace `tandem` with these further
/// arguments printed, rendered or refused.
pub fn helm_template_output(args: &[&str]) -> std::process::Output {
    setup();
    let helm_home = root().join(".tools/helm-home");
    Command::new(root().join(".tools/bin/helm"))
        .args(["template", "tandem", "deploy/helm/tandem", "--namespace", "tandem"])
        .args(args)
        .env("HELM_CACHE_HOME", helm_home.join("cache"))
        .env("HELM_CONFIG_HOME", helm_home.join("config"))
        .env("HELM_DATA_HOME", helm_home.join("data"))
        .current_dir(root())
        .output()
        .expect("running helm (scripts/setup-helm.sh installs it)")
}

/// `helm template` of release `tandem` in namespace `tandem` with these further arguments.
pub fn helm_template(args: &[&str]) -> Vec<Value> {
    let out = helm_template_output(args);
    assert!(out.status.success(), "helm template failed:\n{}", String::from_utf8_lossy(&out.stderr));

    let mut py = Command::new(root().join(".venv-deploy/bin/python"))
        .args(["-c", "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running .venv-deploy/bin/python (scripts/setup-helm.sh makes it)");
    py.stdin.take().expect("stdin").write_all(&out.stdout).expect("writing the manifests to python");
    let json = py.wait_with_output().expect("python");
    assert!(json.status.success(), "YAML to JSON failed:\n{}", String::from_utf8_lossy(&json.stderr));
    let docs: Vec<Value> = serde_json::from_slice(&json.stdout).expect("JSON from python");
    assert!(!docs.is_empty(), "helm template rendered nothing");
    docs
}

/// What `helm template` renders for the chart's defaults, as JSON.
pub fn defaults() -> &'static [Value] {
    static DOCS: OnceLock<Vec<Value>> = OnceLock::new();
    DOCS.get_or_init(|| render(DEFAULT_VALUES))
}

pub fn kind<'a>(kind: &'a str) -> impl Iterator<Item = &'static Value> + 'a {
    rendered().iter().filter(move |d| d["kind"] == kind)
}

/// The documents of one kind in a render.
pub fn of<'a>(docs: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    docs.iter().filter(move |d| d["kind"] == kind)
}

pub fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().expect("metadata.name")
}

pub fn component(doc: &Value) -> &str {
    doc["metadata"]["labels"]["app.kubernetes.io/component"].as_str().unwrap_or("")
}

/// The Deployment of one component.
pub fn deployment(comp: &str) -> &'static Value {
    deployment_of(rendered(), comp)
}

/// The Deployment of one component in a render.
pub fn deployment_of<'a>(docs: &'a [Value], comp: &str) -> &'a Value {
    let found: Vec<_> = of(docs, "Deployment").filter(|d| component(d) == comp).collect();
    assert_eq!(found.len(), 1, "expected one {comp} Deployment, found {}", found.len());
    found[0]
}

/// The labels of a workload's pods.
pub fn pod_labels(workload: &Value) -> &Map<String, Value> {
    workload["spec"]["template"]["metadata"]["labels"].as_object().expect("pod labels")
}

/// Every workload's pod spec, named.
pub fn pod_specs() -> Vec<(String, &'static Value)> {
    ["Deployment", "StatefulSet", "DaemonSet", "Job"]
        .iter()
        .flat_map(|k| kind(k).map(move |d| (format!("{k}/{}", name(d)), &d["spec"]["template"]["spec"])))
        .collect()
}

pub fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// The value of a container's environment variable (a literal `value` only).
pub fn env_value<'a>(container: &'a Value, var: &str) -> Option<&'a str> {
    array(&container["env"]).iter().find(|e| e["name"] == var).and_then(|e| e["value"].as_str())
}
