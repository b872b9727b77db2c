//! Building Tandem needs no `protoc` on PATH: every crate in the build that generates
//! protobuf code is one of ours, and each runs the `protoc-bin-vendored` binary unless
//! `PROTOC` names another. A dependency with a code-generating build script of its own
//! (as etcd-client had: it ran whatever `protoc` PATH held) fails this test.
//!
//! It reads the resolved dependency graph from `cargo metadata`, for the `tandem`
//! binary's normal and build dependencies, the graph a release build compiles.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Build-time crates that run `protoc` (or ask for one) to generate code.
const CODE_GENERATORS: &[&str] =
    &["prost-build", "tonic-build", "tonic-prost-build", "protoc-rust", "protobuf-codegen"];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The resolved graph. Offline first; `cargo metadata` wants every platform's packages, so on a
/// machine whose build fetched only its own (no Windows crates), it fetches the rest from the
/// registry, as the build itself does.
fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let run = |offline: bool| {
        let mut c = Command::new(&cargo);
        c.args(["metadata", "--format-version", "1", "--locked", "--manifest-path"])
            .arg(workspace_root().join("Cargo.toml"));
        if offline {
            c.arg("--offline");
        }
        c.output().expect("run cargo metadata")
    };
    let mut out = run(true);
    if !out.status.success() {
        out = run(false);
    }
    assert!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The resolved graph's nodes by package id.
fn resolved_nodes(meta: &Value) -> HashMap<&str, &Value> {
    meta["resolve"]["nodes"].as_array().unwrap().iter().map(|n| (n["id"].as_str().unwrap(), n)).collect()
}

/// Package ids reachable from `root` through normal and build dependencies.
fn build_closure(nodes: &HashMap<&str, &Value>, root: &str) -> HashSet<String> {
    let mut seen = HashSet::from([root.to_string()]);
    let mut queue = VecDeque::from([root.to_string()]);
    while let Some(id) = queue.pop_front() {
        for dep in nodes[id.as_str()]["deps"].as_array().unwrap() {
            let not_dev = dep["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].as_str() != Some("dev"));
            let pkg = dep["pkg"].as_str().unwrap().to_string();
            if not_dev && seen.insert(pkg.clone()) {
                queue.push_back(pkg);
            }
        }
    }
    seen
}

#[test]
fn every_protobuf_code_generator_in_the_build_uses_the_vendored_protoc() {
    let meta = metadata();
    let packages: HashMap<&str, &Value> =
        meta["packages"].as_array().unwrap().iter().map(|p| (p["id"].as_str().unwrap(), p)).collect();
    let members: HashSet<&str> =
        meta["workspace_members"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    let tandem = packages.values().find(|p| p["name"] == "tandem").expect("the tandem package")["id"].as_str().unwrap();

    let nodes = resolved_nodes(&meta);
    let mut generators = Vec::new();
    for id in build_closure(&nodes, tandem) {
        let package = packages[id.as_str()];
        let name = package["name"].as_str().unwrap();
        // The resolved graph holds only dependencies that are switched on (an optional
        // `prost-build` behind an unused feature is not built).
        let build_deps: Vec<&str> = nodes[id.as_str()]["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].as_str() == Some("build")))
            .map(|d| packages[d["pkg"].as_str().unwrap()]["name"].as_str().unwrap())
            .collect();
        if !build_deps.iter().any(|d| CODE_GENERATORS.contains(d)) {
            continue;
        }
        assert!(
            members.contains(id.as_str()),
            "{name} generates protobuf code in its build script with whatever protoc the machine has; \
             the build would need a system protoc"
        );
        assert!(build_deps.contains(&"protoc-bin-vendored"), "{name} has no protoc-bin-vendored build dependency");
        let manifest = PathBuf::from(package["manifest_path"].as_str().unwrap());
        let build_rs = std::fs::read_to_string(manifest.parent().unwrap().join("build.rs")).unwrap();
        assert!(
            build_rs.contains("protoc_bin_vendored::protoc_bin_path()") && build_rs.contains("\"PROTOC\""),
            "{name}/build.rs must point PROTOC at the vendored binary"
        );
        generators.push(name.to_string());
    }
    generators.sort();
    // The two crates that generate gRPC code today; a test that found none would prove nothing.
    assert_eq!(generators, ["tandem-cluster", "tandem-proto"]);
}
