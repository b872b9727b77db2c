//! The Helm chart closes the worker control plane by default, checked without a cluster:
//! the chart's own values give every router and worker mutual TLS from a generated CA
//! (which passes the check each process runs at start) and the cluster token, and
//! NetworkPolicies admit the workers' gRPC and KV ports and etcd's client port from this
//! release's routers and workers only; ci/tls-values.yaml brings its own Secrets,
//! ci/cert-manager-values.yaml has cert-manager issue the certificate, `tls.enabled=false`
//! takes TLS off and ci/trusted-network-values.yaml the NetworkPolicies too.

mod deploy_support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use deploy_support::*;
use serde_json::{Map, Value};

// ---- The worker control plane: mutual TLS, the cluster token, NetworkPolicies ----

/// Standard base64, as in a Secret's `data`, decoded.
fn unbase64(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0u32);
    for c in text.bytes().filter(|&c| c != b'=') {
        let six = ALPHABET.iter().position(|&a| a == c).unwrap_or_else(|| panic!("not base64: {text:?}"));
        acc = (acc << 6) | six as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// The decoded value of `key` in the Secret `secret` of a render.
fn secret_value(docs: &[Value], secret: &str, key: &str) -> Vec<u8> {
    let s = of(docs, "Secret").find(|s| name(s) == secret).unwrap_or_else(|| panic!("Secret {secret} not rendered"));
    unbase64(s["data"][key].as_str().unwrap_or_else(|| panic!("Secret {secret} has no key {key}")))
}

/// Checks that the router and both workers run with mutual TLS from the Secret `tls_secret`
/// (mounted read-only, TANDEM_TLS_* naming its files and `server_name`) and with the cluster
/// token from key `token.1` of the Secret `token.0` (a read-only file that
/// TANDEM_CLUSTER_TOKEN_FILE names), and that the workers' probes go to the plaintext
/// health port, never to the TLS gRPC port.
fn assert_auth_wiring(docs: &[Value], tls_secret: &str, server_name: &str, token: (&str, &str)) {
    for comp in ["router", "prefill", "decode"] {
        let spec = &deployment_of(docs, comp)["spec"]["template"]["spec"];
        let c = &spec["containers"][0];
        let env = |var: &str| env_value(c, var).map(str::to_string);
        // The directory a Secret's volume is mounted at (read-only), and the volume.
        let mounted = |secret: &str| {
            let volume = array(&spec["volumes"]).iter().find(|v| v["secret"]["secretName"] == secret);
            let volume = volume.unwrap_or_else(|| panic!("{comp}: the Secret {secret} is not a volume"));
            let mount = array(&c["volumeMounts"]).iter().find(|m| m["name"] == volume["name"]);
            let mount = mount.unwrap_or_else(|| panic!("{comp}: the Secret {secret} is not mounted"));
            assert_eq!(mount["readOnly"], true, "{comp}: {secret}");
            (mount["mountPath"].as_str().expect("a mount path").to_string(), volume)
        };

        let (dir, _) = mounted(tls_secret);
        for (var, file) in [("TANDEM_TLS_CERT", "tls.crt"), ("TANDEM_TLS_KEY", "tls.key"), ("TANDEM_TLS_CA", "ca.crt")]
        {
            assert_eq!(env(var), Some(format!("{dir}/{file}")), "{comp} {var}");
        }
        assert_eq!(env("TANDEM_TLS_SERVER_NAME").as_deref(), Some(server_name), "{comp}");

        let (secret, key) = token;
        let (dir, volume) = mounted(secret);
        let items = array(&volume["secret"]["items"]);
        let file = match items.iter().find(|i| i["key"] == key) {
            Some(item) => item["path"].as_str().expect("an item path"),
            None if items.is_empty() => key,
            None => panic!("{comp}: the volume of Secret {secret} leaves out its key {key}"),
        };
        assert_eq!(env("TANDEM_CLUSTER_TOKEN_FILE"), Some(format!("{dir}/{file}")), "{comp}");
        // Never in plain text, nor from the environment.
        assert!(!array(&c["env"]).iter().any(|e| e["name"] == "TANDEM_CLUSTER_TOKEN"), "{comp}");

        if comp == "router" {
            // The router's own probes are HTTP, which mutual TLS does not touch.
            assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
            continue;
        }
        let port =
            |name: &str| array(&c["ports"]).iter().find(|p| p["name"] == name).map(|p| p["containerPort"].clone());
        let health = port("health").unwrap_or_else(|| panic!("{comp}: no health port"));
        assert_ne!(Some(&health), port("grpc").as_ref(), "{comp}");
        assert_eq!(env("TANDEM_HEALTH_LISTEN"), Some(format!("0.0.0.0:{health}")), "{comp}");
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            assert_eq!(c[probe]["grpc"]["port"], health, "{comp} {probe}");
        }
    }
}

/// The `checksum/cluster-auth` annotation of each router and worker pod.
fn auth_checksums(docs: &[Value]) -> Vec<Option<&str>> {
    ["router", "prefill", "decode"]
        .iter()
        .map(|comp| {
            deployment_of(docs, comp)["spec"]["template"]["metadata"]["annotations"]["checksum/cluster-auth"].as_str()
        })
        .collect()
}

/// By default the chart makes a CA, one certificate and a cluster token, puts them in
/// Secrets, and gives them to every router and worker; each pod carries a checksum of them,
/// so that new ones (a rotation) restart the pods.
#[test]
fn by_default_every_router_and_worker_gets_a_generated_certificate_and_the_cluster_token() {
    let docs = defaults();
    assert_auth_wiring(docs, "tandem-tls", "tandem-worker", ("tandem-cluster-token", "token"));

    let tls = of(docs, "Secret").find(|s| name(s) == "tandem-tls").expect("the generated TLS Secret");
    assert_eq!(tls["type"], "kubernetes.io/tls");
    for (key, label) in [("tls.crt", "CERTIFICATE"), ("ca.crt", "CERTIFICATE"), ("tls.key", "PRIVATE KEY")] {
        let pem = String::from_utf8(secret_value(docs, "tandem-tls", key)).expect("PEM is text");
        assert!(pem.starts_with("-----BEGIN ") && pem.contains(&format!("{label}-----\n")), "{key}: {pem:.60}");
        assert!(pem.trim_end().ends_with("-----") && pem.len() > 500, "{key}: {} bytes", pem.len());
    }
    assert_ne!(secret_value(docs, "tandem-tls", "tls.crt"), secret_value(docs, "tandem-tls", "ca.crt"));

    let token = String::from_utf8(secret_value(docs, "tandem-cluster-token", "token")).expect("a text token");
    assert!(token.len() >= 32 && token.chars().all(|c| c.is_ascii_alphanumeric()), "token of {} chars", token.len());

    // One checksum on every pod; another render generates other material, and another checksum.
    let sums = auth_checksums(docs);
    assert!(sums[0].is_some_and(|s| s.len() == 64) && sums.iter().all(|s| *s == sums[0]), "{sums:?}");
    assert_ne!(auth_checksums(&render(DEFAULT_VALUES))[0], sums[0]);
}

/// The generated certificate passes what every router and worker checks at start (PEM that
/// parses, a key that fits, a chain to the CA as a client certificate) and, as a worker's,
/// carries tls.serverName; the same check refuses another name.
#[test]
fn the_generated_certificate_passes_the_check_every_process_runs_at_start() {
    use tandem_proto::tls::{MutualTls, TlsFiles};
    let docs = defaults();
    let dir = tempfile::tempdir().expect("a temporary directory");
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        std::fs::write(dir.path().join(key), secret_value(docs, "tandem-tls", key)).expect("writing PEM");
    }
    let files = |server_name: &str| TlsFiles {
        server_name: server_name.into(),
        ..TlsFiles::new(dir.path().join("tls.crt"), dir.path().join("tls.key"), dir.path().join("ca.crt"))
    };
    let tls = MutualTls::load(&files("tandem-worker")).unwrap_or_else(|e| panic!("{e}"));
    tls.check_server_name().unwrap_or_else(|e| panic!("{e}"));
    let other = MutualTls::load(&files("someone-else")).unwrap_or_else(|e| panic!("{e}"));
    assert!(other.check_server_name().is_err(), "a certificate for tandem-worker accepted as someone-else");
}

/// With existing Secrets for the certificate and the token, the chart mounts them and
/// generates nothing.
#[test]
fn existing_secrets_are_mounted_and_nothing_is_generated() {
    let docs = render(TLS_VALUES);
    assert_auth_wiring(&docs, "tandem-cluster-tls", "tandem-worker", ("tandem-cluster-token", "cluster-token"));
    let made: Vec<_> = docs.iter().filter(|d| d["kind"] == "Secret" || d["kind"] == "Certificate").map(name).collect();
    assert!(made.is_empty(), "rendered {made:?}");
    assert_eq!(auth_checksums(&docs), [None, None, None]);
}

/// With cert-manager, a Certificate for tls.serverName, good for server and client auth,
/// writes the Secret every router and worker mounts; the chart writes no such Secret itself.
#[test]
fn cert_manager_issues_the_certificate_every_router_and_worker_mounts() {
    let docs = render(CERT_MANAGER_VALUES);
    let certs: Vec<_> = of(&docs, "Certificate").collect();
    assert_eq!(certs.len(), 1, "one Certificate");
    let (cert, spec) = (certs[0], &certs[0]["spec"]);
    assert_eq!(cert["apiVersion"], "cert-manager.io/v1");
    let secret = spec["secretName"].as_str().expect("spec.secretName");
    assert_auth_wiring(&docs, secret, "tandem-worker.internal", ("tandem-cluster-token", "token"));
    assert!(array(&spec["dnsNames"]).iter().any(|n| n == "tandem-worker.internal"), "{spec}");
    for usage in ["server auth", "client auth"] {
        assert!(array(&spec["usages"]).iter().any(|u| u == usage), "no {usage}: {spec}");
    }
    assert_eq!(
        spec["issuerRef"],
        serde_json::json!({"name": "tandem-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"})
    );
    assert!(!of(&docs, "Secret").any(|s| name(s) == secret), "the chart writes cert-manager's Secret {secret}");
}

/// `tls.enabled=false` gives no process TLS files, a health port or a TLS volume, and the
/// workers' probes go to their gRPC port; the trusted-network values also drop the
/// NetworkPolicies. The cluster token stays in both: every process needs one.
#[test]
fn without_tls_no_process_gets_tls_and_a_trusted_network_drops_the_network_policies() {
    let no_tls = render_with(DEFAULT_VALUES, &["tls.enabled=false"]);
    let trusted = render(TRUSTED_VALUES);
    for (docs, what) in [(&no_tls, "tls.enabled=false"), (&trusted, "trusted network")] {
        for d in of(docs, "Deployment") {
            let spec = &d["spec"]["template"]["spec"];
            let c = &spec["containers"][0];
            let tls_vars: Vec<_> = array(&c["env"])
                .iter()
                .filter_map(|e| e["name"].as_str())
                .filter(|v| v.starts_with("TANDEM_TLS_") || *v == "TANDEM_HEALTH_LISTEN")
                .collect();
            assert!(tls_vars.is_empty(), "{what}: {} has {tls_vars:?}", name(d));
            assert!(!array(&spec["volumes"]).iter().any(|v| v["name"] == "tls"), "{what}: {}", name(d));
            if component(d) != "router" {
                let grpc = array(&c["ports"]).iter().find(|p| p["name"] == "grpc").expect("grpc port");
                assert_eq!(c["readinessProbe"]["grpc"]["port"], grpc["containerPort"], "{what}: {}", name(d));
            }
        }
        assert_eq!(of(docs, "Certificate").count() + of(docs, "Secret").filter(|s| name(s) == "tandem-tls").count(), 0);
    }
    for docs in [&no_tls, &trusted] {
        for d in of(docs, "Deployment") {
            let c = &d["spec"]["template"]["spec"]["containers"][0];
            assert!(env_value(c, "TANDEM_CLUSTER_TOKEN_FILE").is_some(), "{}: no cluster token", name(d));
        }
        assert!(of(docs, "Secret").any(|s| name(s) == "tandem-cluster-token"));
    }
    assert!(of(&no_tls, "NetworkPolicy").count() > 0, "TLS off alone keeps the NetworkPolicies");
    assert_eq!(of(&trusted, "NetworkPolicy").count(), 0);
}

/// Whether a label selector selects a pod with these labels.
fn selects(selector: &Value, labels: &Map<String, Value>) -> bool {
    let by_labels = selector["matchLabels"].as_object().is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let by_expressions = array(&selector["matchExpressions"]).iter().all(|e| {
        let (key, values) = (e["key"].as_str().expect("a key"), array(&e["values"]));
        match e["operator"].as_str() {
            Some("In") => labels.get(key).is_some_and(|v| values.contains(v)),
            Some("NotIn") => labels.get(key).is_none_or(|v| !values.contains(v)),
            Some("Exists") => labels.contains_key(key),
            Some("DoesNotExist") => !labels.contains_key(key),
            op => panic!("unknown selector operator {op:?}"),
        }
    });
    by_labels && by_expressions
}

/// The ingress rules of every NetworkPolicy that selects a pod with these labels (all of
/// them apply, as a union); None when no policy selects it, and all traffic is admitted.
fn ingress_rules<'a>(docs: &'a [Value], pod: &Map<String, Value>) -> Option<Vec<&'a Value>> {
    let policies: Vec<_> = of(docs, "NetworkPolicy")
        .filter(|p| selects(&p["spec"]["podSelector"], pod))
        .filter(|p| {
            p["spec"]["policyTypes"].is_null() || array(&p["spec"]["policyTypes"]).iter().any(|t| t == "Ingress")
        })
        .collect();
    (!policies.is_empty()).then(|| policies.iter().flat_map(|p| array(&p["spec"]["ingress"])).collect())
}

/// The rules among `rules` that admit TCP traffic to a container port (`{name, containerPort}`).
fn admitting<'a>(rules: &[&'a Value], port: &Value) -> Vec<&'a Value> {
    let number = port["containerPort"].as_u64().expect("containerPort");
    let covers = |p: &Value| {
        let tcp = p["protocol"].is_null() || p["protocol"] == "TCP";
        tcp && match &p["port"] {
            Value::Null => true,
            Value::String(named) => port["name"] == named.as_str(),
            n => {
                let low = n.as_u64().expect("a port number");
                (low..=p["endPort"].as_u64().unwrap_or(low)).contains(&number)
            }
        }
    };
    rules.iter().copied().filter(|r| array(&r["ports"]).is_empty() || array(&r["ports"]).iter().any(covers)).collect()
}

/// A container port of a workload's main container, by name.
fn container_port<'a>(workload: &'a Value, port: &str) -> &'a Value {
    let c = &workload["spec"]["template"]["spec"]["containers"][0];
    array(&c["ports"])
        .iter()
        .find(|p| p["name"] == port)
        .unwrap_or_else(|| panic!("{}: no port {port}", name(workload)))
}

/// Checks that `rules` admit traffic to `port` only from pods of this namespace that the
/// peers' podSelectors pick, that every one of `welcome` is picked, and that none of
/// `intruders` is: no rule is open, and none names namespaces or address blocks.
fn assert_admits_only(
    rules: &[&Value],
    port: &Value,
    what: &str,
    welcome: &[(&str, &Map<String, Value>)],
    intruders: &[(&str, Map<String, Value>)],
) {
    let admitting = admitting(rules, port);
    assert!(!admitting.is_empty(), "{what}: no rule admits anyone, not even {}", welcome[0].0);
    let mut peers = Vec::new();
    for rule in admitting {
        let from = array(&rule["from"]);
        assert!(!from.is_empty(), "{what}: a rule admits everyone: {rule}");
        for peer in from {
            assert!(peer["ipBlock"].is_null() && peer["namespaceSelector"].is_null(), "{what}: {peer}");
            assert!(peer["podSelector"].is_object(), "{what}: {peer}");
            peers.push(&peer["podSelector"]);
        }
    }
    for (who, labels) in welcome {
        assert!(peers.iter().any(|p| selects(p, labels)), "{what}: {who} is not admitted");
    }
    for (who, labels) in intruders {
        assert!(!peers.iter().any(|p| selects(p, labels)), "{what}: {who} is admitted");
    }
}

/// Pods that must not reach the control plane: an unlabeled pod, the release's own etcd, a
/// router of another release, and a pod that only claims to be a router.
fn intruders(docs: &[Value]) -> Vec<(&'static str, Map<String, Value>)> {
    let etcd = of(docs, "StatefulSet").next().expect("the bundled etcd");
    let mut other_release = pod_labels(deployment_of(docs, "router")).clone();
    other_release.insert("app.kubernetes.io/instance".into(), "another".into());
    let mut claims_router = Map::new();
    claims_router.insert("app.kubernetes.io/component".into(), "router".into());
    vec![
        ("an unlabeled pod", Map::new()),
        ("the release's etcd", pod_labels(etcd).clone()),
        ("a router of another release", other_release),
        ("a pod labeled component=router only", claims_router),
    ]
}

/// By default the workers' gRPC and KV ports admit this release's routers and workers and
/// nobody else; their metrics and health ports stay reachable.
#[test]
fn network_policies_admit_only_this_releases_routers_and_workers_to_the_worker_ports() {
    let docs = defaults();
    let (router, prefill, decode) =
        (deployment_of(docs, "router"), deployment_of(docs, "prefill"), deployment_of(docs, "decode"));
    let welcome = [
        ("the router", pod_labels(router)),
        ("a prefill worker", pod_labels(prefill)),
        ("a decode worker", pod_labels(decode)),
    ];
    let intruders = intruders(docs);
    for worker in [prefill, decode] {
        let rules = ingress_rules(docs, pod_labels(worker))
            .unwrap_or_else(|| panic!("no NetworkPolicy selects {}", name(worker)));
        // Prefill pods do not listen on the KV port; the policy must close it on them too.
        for port in [container_port(worker, "grpc"), container_port(decode, "kv")] {
            let what = format!("{} port {}", name(worker), port["containerPort"]);
            assert_admits_only(&rules, port, &what, &welcome, &intruders);
        }
        for port in ["metrics", "health"] {
            let port = container_port(worker, port);
            assert!(!admitting(&rules, port).is_empty(), "{}: nobody reaches port {port}", name(worker));
        }
    }
}

/// The bundled etcd's client port admits this release's routers and workers only, its peer
/// port only etcd's own members.
#[test]
fn network_policies_admit_only_this_releases_routers_and_workers_to_etcd() {
    let docs = defaults();
    let etcd = of(docs, "StatefulSet").next().expect("the bundled etcd");
    let rules = ingress_rules(docs, pod_labels(etcd)).expect("a NetworkPolicy selects etcd");
    let welcome: Vec<_> = ["router", "prefill", "decode"].map(|c| (c, pod_labels(deployment_of(docs, c)))).into();
    let mut intruders = intruders(docs);
    assert_admits_only(&rules, container_port(etcd, "client"), "etcd client port", &welcome, &intruders);
    let members = [("an etcd member", pod_labels(etcd))];
    intruders.retain(|(who, _)| *who != "the release's etcd");
    intruders.extend(welcome.iter().map(|(who, labels)| (*who, (*labels).clone())));
    assert_admits_only(&rules, container_port(etcd, "peer"), "etcd peer port", &members, &intruders);
}

/// The routers' API ports are open by default; networkPolicy.apiFrom narrows them (while
/// metricsFrom still reaches the HTTP port's /metrics), metricsFrom replaces the namespace
/// for the metrics ports, and extraIngress rules are added.
#[test]
fn the_router_api_is_open_by_default_and_api_from_and_metrics_from_narrow_it() {
    let open = defaults();
    let router = deployment_of(open, "router");
    let rules = ingress_rules(open, pod_labels(router)).expect("a NetworkPolicy selects the router");
    for port in ["grpc", "http"] {
        let admitting = admitting(&rules, container_port(router, port));
        assert!(admitting.iter().any(|r| array(&r["from"]).is_empty()), "router {port} is not open to everyone");
    }

    let docs = render(NETWORK_POLICY_VALUES);
    let router = deployment_of(&docs, "router");
    let rules = ingress_rules(&docs, pod_labels(router)).expect("a NetworkPolicy selects the router");
    let peers = |port: &Value| -> Vec<String> {
        admitting(&rules, port).iter().flat_map(|r| array(&r["from"]).iter().map(|p| p.to_string())).collect()
    };
    let (grpc, http) = (container_port(router, "grpc"), container_port(router, "http"));
    assert!(admitting(&rules, grpc).iter().all(|r| !array(&r["from"]).is_empty()), "router grpc still open");
    let ingress = r#"{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"ingress-nginx"}}}"#;
    assert_eq!(peers(grpc), [ingress]);
    let prometheus = r#"{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}},"podSelector":{"matchLabels":{"app.kubernetes.io/name":"prometheus"}}}"#;
    let mut http_peers = peers(http);
    http_peers.sort();
    assert_eq!(http_peers, [ingress, prometheus]);

    let decode = deployment_of(&docs, "decode");
    let rules = ingress_rules(&docs, pod_labels(decode)).expect("a NetworkPolicy selects decode workers");
    let metrics = container_port(decode, "metrics");
    let peers: Vec<String> =
        admitting(&rules, metrics).iter().flat_map(|r| array(&r["from"]).iter().map(|p| p.to_string())).collect();
    assert_eq!(peers, [prometheus, r#"{"podSelector":{"matchLabels":{"tandem-debug":"true"}}}"#]);
}

/// A stand-in for the Kubernetes API, enough for `helm template --dry-run=server`: the
/// version, discovery of the kinds the chart renders, and the Secrets given on stdin (a JSON
/// list) as Helm-owned objects of the release; anything else is 404. Prints its port.
const FAKE_API_SERVER: &str = r#"
import http.server, json, sys
def resources(group_version, kinds):
    return {"kind": "APIResourceList", "groupVersion": group_version, "resources": [
        {"name": plural, "singularName": "", "namespaced": True, "kind": kind, "verbs": ["get", "list"]}
        for plural, kind in kinds]}
groups = {"apps/v1": [("deployments", "Deployment"), ("statefulsets", "StatefulSet")],
          "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget")],
          "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy")]}
routes = {
    "/version": {"major": "1", "minor": "30", "gitVersion": "v1.30.0"},
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": "v1"}],
         "preferredVersion": {"groupVersion": gv, "version": "v1"}} for gv in groups]},
    "/api/v1": resources("v1", [("secrets", "Secret"), ("services", "Service"), ("serviceaccounts", "ServiceAccount")]),
}
for gv, kinds in groups.items():
    routes["/apis/" + gv] = resources(gv, kinds)
for secret in json.load(sys.stdin):
    meta = secret["metadata"]
    meta.setdefault("annotations", {}).update({"meta.helm.sh/release-name": "tandem", "meta.helm.sh/release-namespace": "tandem"})
    routes["/api/v1/namespaces/tandem/secrets/" + meta["name"]] = secret
class Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = routes.get(self.path.split("?")[0])
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(body or {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                             "reason": "NotFound", "code": 404}).encode())
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// The chart's defaults rendered as `helm upgrade` renders them in a namespace that holds
/// `secrets`: `lookup` finds them there (`helm template --dry-run=server` against
/// FAKE_API_SERVER on 127.0.0.1).
fn render_against(secrets: &[Value]) -> Vec<Value> {
    /// The API server's process, killed when the render is done or has failed.
    struct Server(std::process::Child);
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut server = Server(
        Command::new(root().join(".venv-deploy/bin/python"))
            .args(["-c", FAKE_API_SERVER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("running .venv-deploy/bin/python"),
    );
    let api = &mut server.0;
    let mut stdin = api.stdin.take().expect("stdin");
    stdin.write_all(&serde_json::to_vec(secrets).expect("JSON")).expect("writing the Secrets");
    drop(stdin);
    let mut port = String::new();
    BufReader::new(api.stdout.take().expect("stdout")).read_line(&mut port).expect("the API server's port");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: 'http://127.0.0.1:{}'}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: tandem}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\n",
            port.trim()
        ),
    )
    .expect("writing the kubeconfig");
    let kubeconfig = kubeconfig.to_str().expect("a UTF-8 path");
    let args = ["-f", DEFAULT_VALUES, "--dry-run=server", "--disable-openapi-validation", "--kubeconfig", kubeconfig];
    helm_template(&args)
}

/// `helm upgrade` keeps the generated certificate and token (the chart reads its Secrets
/// back), so the pods' checksum stays and nothing restarts; a new tls.serverName makes a new
/// certificate, which the old one would not name, and keeps the token.
#[test]
fn upgrades_keep_the_generated_certificate_and_token() {
    let installed = defaults();
    let secrets: Vec<Value> = of(installed, "Secret").cloned().collect();
    let upgraded = render_against(&secrets);
    for (secret, key) in [
        ("tandem-tls", "tls.crt"),
        ("tandem-tls", "tls.key"),
        ("tandem-tls", "ca.crt"),
        ("tandem-cluster-token", "token"),
    ] {
        assert_eq!(secret_value(&upgraded, secret, key), secret_value(installed, secret, key), "{secret} {key}");
    }
    assert_eq!(auth_checksums(&upgraded), auth_checksums(installed));

    let mut renamed = secrets.clone();
    let tls = renamed.iter_mut().find(|s| name(s) == "tandem-tls").expect("the TLS Secret");
    tls["metadata"]["annotations"]["tandem/tls-server-name"] = "an-older-name".into();
    let upgraded = render_against(&renamed);
    assert_ne!(secret_value(&upgraded, "tandem-tls", "tls.crt"), secret_value(installed, "tandem-tls", "tls.crt"));
    assert_eq!(
        secret_value(&upgraded, "tandem-cluster-token", "token"),
        secret_value(installed, "tandem-cluster-token", "token")
    );
    assert_ne!(auth_checksums(&upgraded), auth_checksums(installed));
}
