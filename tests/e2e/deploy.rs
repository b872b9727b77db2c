//! The Helm chart (deploy/helm/tandem), checked without a cluster: `scripts/setup-helm.sh`
//! installs helm and kubernetes-validate, `scripts/check-deploy.sh` lints, renders and
//! validates every value set, and the tests below read what `helm template` renders for
//! ci/multi-replica-values.yaml and check the properties an operator relies on:
//! replica counts, probes on every container, a grace period that covers the drain,
//! API keys from a Secret, a PodDisruptionBudget per component, no container as root,
//! every TANDEM_* variable read by its command and JSON logs; and, for
//! ci/multi-model-values.yaml, a pool of workers per model behind routers serving them all;
//! for ci/planner-values.yaml, routers that run the planner and an autoscaler per worker
//! role that scales on its published count, and the values the chart refuses around them.
//! How the chart closes the worker control plane is in deploy_auth.rs.

mod deploy_support;

use std::process::Command;

use deploy_support::*;
use serde_json::{json, Value};

const PLANNER_VALUES: &str = "deploy/helm/tandem/ci/planner-values.yaml";

#[test]
fn check_deploy_passes() {
    setup();
    let out = script("check-deploy.sh");
    assert!(out.contains("check-deploy: ok:"), "{out}");
    assert!(out.contains("kubernetes-validate ok (multi-replica-values"), "{out}");
    // The Certificate (a cert-manager CRD) is validated against check-deploy.sh's own schema.
    assert!(out.contains("kubernetes-validate ok (cert-manager-values"), "{out}");
    // The autoscalers (autoscaling/v2) and the adapter rule that serves their metric.
    assert!(out.contains("kubernetes-validate ok (planner-values"), "{out}");
    assert!(out.contains("check-deploy: adapter rule ok"), "{out}");
}

#[test]
fn router_prefill_and_decode_deployments_have_their_replicas() {
    for (comp, replicas) in COMPONENTS {
        let d = deployment(comp);
        assert_eq!(d["spec"]["replicas"].as_u64(), Some(replicas), "{comp} replicas");
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["args"][0], comp, "{comp} runs `tandem {comp}`");
    }
    let decode = &deployment("decode")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(env_value(decode, "TANDEM_ROLE"), Some("both"));
    // Workers register in etcd at their pod IP.
    for comp in ["prefill", "decode"] {
        let c = &deployment(comp)["spec"]["template"]["spec"]["containers"][0];
        let host = array(&c["env"]).iter().find(|e| e["name"] == "TANDEM_ADVERTISE_HOST").expect("advertise host");
        assert_eq!(host["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP", "{comp}");
    }
}

#[test]
fn every_container_has_liveness_and_readiness_probes() {
    let specs = pod_specs();
    assert!(specs.len() >= 3, "{specs:?}");
    for (what, spec) in specs {
        for c in array(&spec["containers"]) {
            for probe in ["livenessProbe", "readinessProbe"] {
                assert!(c[probe].is_object(), "{what} container {} has no {probe}", c["name"]);
            }
        }
    }
    // Workers use native gRPC probes on their plaintext health port (mutual TLS is on by
    // default, and the kubelet presents no certificate); the router HTTP /health and /ready.
    for comp in ["prefill", "decode"] {
        let c = &deployment(comp)["spec"]["template"]["spec"]["containers"][0];
        let health_port =
            array(&c["ports"]).iter().find(|p| p["name"] == "health").expect("health port")["containerPort"].clone();
        for probe in ["livenessProbe", "readinessProbe"] {
            assert_eq!(c[probe]["grpc"]["port"], health_port, "{comp} {probe}");
        }
    }
    let router = &deployment("router")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(router["livenessProbe"]["httpGet"]["path"], "/health");
    assert_eq!(router["readinessProbe"]["httpGet"]["path"], "/ready");
}

#[test]
fn grace_period_covers_the_drain() {
    for (comp, _) in COMPONENTS {
        let spec = &deployment(comp)["spec"]["template"]["spec"];
        let c = &spec["containers"][0];
        let drain: u64 = env_value(c, "TANDEM_DRAIN_TIMEOUT")
            .unwrap_or_else(|| panic!("{comp}: no TANDEM_DRAIN_TIMEOUT"))
            .parse()
            .expect("a number of seconds");
        assert_eq!(drain, 60, "{comp}: the ci values' drain.timeoutSeconds");
        // A preStop sleep runs before SIGTERM, inside the same grace period.
        let pre_stop: u64 = array(&c["lifecycle"]["preStop"]["exec"]["command"])
            .get(1)
            .and_then(|s| s.as_str())
            .map(|s| s.parse().expect("preStop sleep seconds"))
            .unwrap_or(0);
        let grace = spec["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
        assert!(grace > drain + pre_stop, "{comp}: grace {grace} s <= drain {drain} s + preStop {pre_stop} s");
    }
}

#[test]
fn api_keys_come_from_a_secret() {
    let router = &deployment("router")["spec"]["template"]["spec"]["containers"][0];
    let var = array(&router["env"]).iter().find(|e| e["name"] == "TANDEM_API_KEYS").expect("TANDEM_API_KEYS");
    assert!(var.get("value").is_none(), "API keys in plain text: {var}");
    let secret_ref = &var["valueFrom"]["secretKeyRef"];
    let (secret, key) = (secret_ref["name"].as_str().expect("secret name"), secret_ref["key"].as_str().expect("key"));
    let s = kind("Secret").find(|s| name(s) == secret).unwrap_or_else(|| panic!("Secret {secret} not rendered"));
    assert!(s["data"][key].is_string(), "Secret {secret} has no key {key}");
    // No worker sees the keys.
    for comp in ["prefill", "decode"] {
        let c = &deployment(comp)["spec"]["template"]["spec"]["containers"][0];
        assert!(!array(&c["env"]).iter().any(|e| e["name"] == "TANDEM_API_KEYS"), "{comp} has API keys");
    }
}

#[test]
fn every_component_has_a_pod_disruption_budget() {
    for (comp, _) in COMPONENTS {
        let pod_labels = deployment(comp)["spec"]["template"]["metadata"]["labels"].as_object().expect("pod labels");
        let pdbs: Vec<_> = kind("PodDisruptionBudget")
            .filter(|p| {
                let sel = p["spec"]["selector"]["matchLabels"].as_object().expect("PDB matchLabels");
                !sel.is_empty() && sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
            })
            .collect();
        assert_eq!(pdbs.len(), 1, "{comp}: {} PodDisruptionBudgets select its pods", pdbs.len());
        let spec = &pdbs[0]["spec"];
        assert!(spec["maxUnavailable"].is_number() || spec["minAvailable"].is_number(), "{comp}: {spec}");
    }
}

#[test]
fn no_container_runs_as_root() {
    for (what, spec) in pod_specs() {
        let pod = &spec["securityContext"];
        for c in array(&spec["initContainers"]).iter().chain(array(&spec["containers"])) {
            let sc = &c["securityContext"];
            let field = |f: &str| if sc[f].is_null() { pod[f].clone() } else { sc[f].clone() };
            let cname = &c["name"];
            assert_eq!(field("runAsNonRoot"), Value::Bool(true), "{what} {cname}: runAsNonRoot");
            let uid = field("runAsUser");
            assert!(uid.as_u64().is_some_and(|u| u > 0), "{what} {cname}: runAsUser {uid}");
            assert_eq!(sc["allowPrivilegeEscalation"], Value::Bool(false), "{what} {cname}: allowPrivilegeEscalation");
            assert_eq!(sc["readOnlyRootFilesystem"], Value::Bool(true), "{what} {cname}: readOnlyRootFilesystem");
            assert!(array(&sc["capabilities"]["drop"]).iter().any(|d| d == "ALL"), "{what} {cname}: capabilities");
        }
    }
}

#[test]
fn service_monitor_scrapes_the_router_and_the_workers() {
    let sm: Vec<_> = kind("ServiceMonitor").collect();
    assert_eq!(sm.len(), 1, "the ci values turn the ServiceMonitor on");
    let ports: Vec<_> = array(&sm[0]["spec"]["endpoints"]).iter().map(|e| e["port"].as_str().unwrap_or("")).collect();
    assert_eq!(ports, ["http", "metrics"]);
    // The router Service has the http port; a Service in front of the workers has the metrics port.
    let services: Vec<_> = kind("Service").collect();
    for port in ["http", "metrics"] {
        assert!(
            services.iter().any(|s| array(&s["spec"]["ports"]).iter().any(|p| p["name"] == port)),
            "no Service with a {port} port"
        );
    }
    // External etcd: the chart deploys none.
    assert_eq!(kind("StatefulSet").count(), 0);
}

/// Every `TANDEM_*` variable the chart sets is one the container's command reads (a flag's
/// env fallback in its `--help`), so a renamed or missing flag cannot be silently ignored;
/// and every component logs JSON lines by default, for the cluster's log pipeline. The
/// planner's render adds the router's planner variables.
#[test]
fn every_tandem_variable_of_the_chart_is_a_flag_of_its_command_and_logs_are_json() {
    let planner = render(PLANNER_VALUES);
    for (docs, comp) in [rendered(), planner.as_slice()].into_iter().flat_map(|d| COMPONENTS.map(|(c, _)| (d, c))) {
        let spec = &deployment_of(docs, comp)["spec"]["template"]["spec"];
        let container = array(&spec["containers"]).iter().find(|c| c["name"] == comp).expect("main container");
        let command = array(&container["args"])[0].as_str().expect("the command is the first argument");
        let help = Command::new(env!("CARGO_BIN_EXE_tandem")).args([command, "--help"]).output().unwrap();
        assert!(help.status.success(), "tandem {command} --help");
        let help = String::from_utf8_lossy(&help.stdout);
        let vars: Vec<&str> = array(&container["env"]).iter().filter_map(|e| e["name"].as_str()).collect();
        for var in vars.iter().filter(|v| v.starts_with("TANDEM_")) {
            // `[env: VAR=default]`, or `[env: VAR]` for a value the help hides (API keys).
            let read = help.contains(&format!("[env: {var}=")) || help.contains(&format!("[env: {var}]"));
            assert!(read, "{comp}: `tandem {command}` reads no {var}");
        }
        assert_eq!(env_value(container, "TANDEM_LOG_FORMAT"), Some("json"), "{comp}");
        if comp != "router" {
            for var in ["TANDEM_SCHEDULING_POLICY", "TANDEM_LONG_PREFILL_THRESHOLD", "TANDEM_LONG_PREFILL_SHARE"] {
                assert!(vars.contains(&var), "{comp} has no {var}");
            }
        }
    }
}

/// With `metrics.requireKey`, the router requires a key on /metrics and the ServiceMonitor's
/// router endpoint sends one: a single API key (the first, without its tenant) that the
/// chart writes into the API-keys Secret. The workers' endpoint is unchanged, and without
/// the value nothing is sent.
#[test]
fn with_metrics_require_key_the_service_monitor_sends_an_api_key_to_the_router() {
    let docs = render_with(CI_VALUES, &["metrics.requireKey=true", "apiKeys.keys={team-a:sk-ci-one,sk-ci-two}"]);
    let of = |k: &'static str| docs.iter().filter(move |d| d["kind"] == k);
    let router = of("Deployment").find(|d| component(d) == "router").expect("router Deployment");
    let c = &router["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(env_value(c, "TANDEM_METRICS_REQUIRE_KEY"), Some("true"));
    let sm = of("ServiceMonitor").next().expect("a ServiceMonitor");
    let endpoints = array(&sm["spec"]["endpoints"]);
    let http = endpoints.iter().find(|e| e["port"] == "http").expect("the router endpoint");
    assert_eq!(http["authorization"]["type"], "Bearer", "{http}");
    let cred = &http["authorization"]["credentials"];
    let (secret, key) = (cred["name"].as_str().expect("secret name"), cred["key"].as_str().expect("key"));
    let s = of("Secret").find(|s| name(s) == secret).unwrap_or_else(|| panic!("Secret {secret} not rendered"));
    let sent = s["data"][key].as_str().unwrap_or_else(|| panic!("Secret {secret} has no key {key}"));
    // base64 of "sk-ci-one": the first key, without its tenant.
    assert_eq!(sent, "c2stY2ktb25l", "the scrape key in Secret {secret}");
    let workers = endpoints.iter().find(|e| e["port"] == "metrics").expect("the workers' endpoint");
    assert!(workers.get("authorization").is_none(), "{workers}");
    // Without the value (the ci values): no key required, none sent.
    let plain = kind("ServiceMonitor").next().expect("a ServiceMonitor");
    assert!(array(&plain["spec"]["endpoints"]).iter().all(|e| e.get("authorization").is_none()));
    assert_eq!(
        env_value(&deployment("router")["spec"]["template"]["spec"]["containers"][0], "TANDEM_METRICS_REQUIRE_KEY"),
        None
    );
}

/// With `models`, each model gets its own pool: Deployments named after it with their own
/// replicas and settings, pods labelled with it (no two Deployments or budgets select the
/// same pods), its file and served name in the workers' environment. The routers mount
/// every model, each in its own directory, and serve them all, the first as the default.
#[test]
fn several_models_get_a_pool_each_behind_routers_that_serve_them_all() {
    let docs = render(MULTI_MODEL_VALUES);
    let deployments: Vec<&Value> = of(&docs, "Deployment").collect();
    let by_name = |n: &str| *deployments.iter().find(|d| name(d) == n).unwrap_or_else(|| panic!("no Deployment {n}"));
    let pools = [
        ("smollm2", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 1, 1),
        ("qwen-coder", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 2, 3),
    ];
    for (key, served, file, prefill, decode) in pools {
        for (kind, replicas) in [("prefill", prefill), ("decode", decode)] {
            let d = by_name(&format!("tandem-{key}-{kind}"));
            assert_eq!(d["spec"]["replicas"].as_u64(), Some(replicas), "{key} {kind}");
            assert_eq!(d["spec"]["selector"]["matchLabels"]["tandem-model"], key, "{key} {kind}");
            assert_eq!(pod_labels(d)["tandem-model"], key);
            let c = &d["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(c["args"][0], kind);
            assert_eq!(env_value(c, "TANDEM_MODEL"), Some(format!("/models/{file}").as_str()), "{key} {kind}");
            assert_eq!(env_value(c, "TANDEM_MODEL_NAME"), Some(served), "{key} {kind}");
        }
    }
    // Each pool's settings over the chart's: the Qwen pool's threads and memory, from the PVC.
    let qwen_prefill = &by_name("tandem-qwen-coder-prefill")["spec"]["template"]["spec"];
    assert_eq!(env_value(&qwen_prefill["containers"][0], "TANDEM_THREADS"), Some("2"));
    assert_eq!(qwen_prefill["volumes"][0]["persistentVolumeClaim"]["claimName"], "models");
    let qwen_decode = &by_name("tandem-qwen-coder-decode")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(qwen_decode["resources"]["limits"]["memory"], "3Gi");
    let smol_decode = &by_name("tandem-smollm2-decode")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(smol_decode["resources"]["limits"]["memory"], "2Gi", "the chart's decode resources");

    // No workload's pods are selected by another Deployment, and each has exactly one budget.
    let selects = |sel: &Value, pods: &serde_json::Map<String, Value>| {
        let sel = sel.as_object().expect("matchLabels");
        !sel.is_empty() && sel.iter().all(|(k, v)| pods.get(k) == Some(v))
    };
    for d in &deployments {
        let pods = pod_labels(d);
        let owners = deployments.iter().filter(|o| selects(&o["spec"]["selector"]["matchLabels"], pods)).count();
        assert_eq!(owners, 1, "{}: selected by {owners} Deployments", name(d));
        let budgets = of(&docs, "PodDisruptionBudget").filter(|p| selects(&p["spec"]["selector"]["matchLabels"], pods));
        assert_eq!(budgets.count(), 1, "{}", name(d));
    }

    // The routers: every model, named, each file where its volume is mounted.
    let router = by_name("tandem-router");
    assert_eq!(router["spec"]["replicas"].as_u64(), Some(2));
    let spec = &router["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    let served = env_value(c, "TANDEM_MODEL").expect("TANDEM_MODEL");
    assert_eq!(
        served,
        "smollm2=/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf,\
         qwen2.5-coder-0.5b-instruct=/models/qwen-coder/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    );
    assert_eq!(env_value(c, "TANDEM_MODEL_NAME"), None, "each model is named in TANDEM_MODEL");
    let mounts = array(&c["volumeMounts"]);
    for (key, _, _, _, _) in pools {
        let m = mounts.iter().find(|m| m["mountPath"] == format!("/models/{key}")).expect("a mount per model");
        assert!(array(&spec["volumes"]).iter().any(|v| v["name"] == m["name"]), "{key}: volume {}", m["name"]);
    }
    // The downloaded model is fetched into its own volume by its own init container.
    let init = array(&spec["initContainers"]);
    assert_eq!(init.len(), 1, "one model is downloaded");
    assert_eq!(init[0]["name"], "fetch-model-smollm2");
    assert_eq!(init[0]["volumeMounts"][0]["name"], "model-smollm2");
}

/// With the planner and both autoscalers on, the routers run the planner with the chart's
/// SLOs and placement, and each worker role has a HorizontalPodAutoscaler on its Deployment
/// that scales to the planner's `tandem_planner_desired_workers{role}`; the Deployments it
/// scales set no replicas of their own, which would undo its changes at every upgrade.
#[test]
fn with_the_planner_an_autoscaler_per_role_scales_its_workers_to_the_desired_count() {
    let docs = render(PLANNER_VALUES);
    let router = &deployment_of(&docs, "router")["spec"]["template"]["spec"]["containers"][0];
    for (var, value) in [
        ("TANDEM_PLANNER", "true"),
        ("TANDEM_PLANNER_DWELL_S", "45"),
        ("TANDEM_SLO_TTFT_MS", "500"),
        ("TANDEM_SLO_TPOT_MS", "50"),
        ("TANDEM_PREFILL_PLACEMENT", "threshold"),
    ] {
        assert_eq!(env_value(router, var), Some(value), "router {var}");
    }
    assert_eq!(deployment_of(&docs, "router")["spec"]["replicas"].as_u64(), Some(2), "routers keep their count");

    let hpas: Vec<&Value> = of(&docs, "HorizontalPodAutoscaler").collect();
    assert_eq!(hpas.len(), 2, "one autoscaler per worker role");
    for (role, min, max, window) in [("prefill", 1, 6, 600), ("decode", 2, 8, 120)] {
        let workload = deployment_of(&docs, role);
        assert!(workload["spec"].get("replicas").is_none(), "{role}: a fixed count fights the autoscaler");
        let hpa = hpas.iter().find(|h| component(h) == role).unwrap_or_else(|| panic!("no {role} autoscaler"));
        assert_eq!(hpa["apiVersion"], "autoscaling/v2");
        let target = &hpa["spec"]["scaleTargetRef"];
        assert_eq!(target["apiVersion"], "apps/v1", "{role}");
        assert_eq!(target["kind"], "Deployment", "{role}");
        assert_eq!(target["name"], name(workload), "{role}");
        let spec = &hpa["spec"];
        assert_eq!((spec["minReplicas"].as_u64(), spec["maxReplicas"].as_u64()), (Some(min), Some(max)), "{role}");
        assert_eq!(spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"].as_u64(), Some(window), "{role}");
        let metrics = array(&spec["metrics"]);
        assert_eq!(metrics.len(), 1, "{role}: the planner's count alone");
        assert_eq!(metrics[0]["type"], "External", "{role}");
        let external = &metrics[0]["external"];
        assert_eq!(external["metric"]["name"], "tandem_planner_desired_workers", "{role}");
        assert_eq!(external["metric"]["selector"], json!({"matchLabels": {"role": role}}), "{role}");
        // An average of 1 per replica: the desired replicas are the metric's value.
        assert_eq!(external["target"], json!({"type": "AverageValue", "averageValue": "1"}), "{role}");
    }

    // By default: no planner, no autoscaler, fixed counts, the router's default SLOs and placement.
    let defaults = defaults();
    assert_eq!(of(defaults, "HorizontalPodAutoscaler").count(), 0);
    let router = &deployment_of(defaults, "router")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(env_value(router, "TANDEM_PLANNER"), None);
    assert_eq!(env_value(router, "TANDEM_PLANNER_DWELL_S"), None);
    assert_eq!(env_value(router, "TANDEM_SLO_TTFT_MS"), Some("1000"));
    assert_eq!(env_value(router, "TANDEM_SLO_TPOT_MS"), Some("100"));
    assert_eq!(env_value(router, "TANDEM_PREFILL_PLACEMENT"), Some("adaptive"));
    for role in ["prefill", "decode"] {
        assert_eq!(deployment_of(defaults, role)["spec"]["replicas"].as_u64(), Some(1), "{role}");
    }
}

/// An autoscaler without the planner would wait on a metric nothing publishes, and one per
/// model would read one cluster-wide count: the chart refuses both, saying why.
#[test]
fn autoscaling_without_the_planner_or_with_several_models_is_refused() {
    for role in ["prefill", "decode"] {
        let enabled = format!("autoscaling.{role}.enabled=true");
        let err = refusal(&[&enabled]);
        assert!(err.contains(&format!("autoscaling.{role}.enabled needs planner.enabled")), "{err}");
        let err = refusal(&["planner.enabled=true", &enabled, "models[0].name=a", "models[1].name=b"]);
        assert!(err.contains(&format!("autoscaling.{role}.enabled with several models")), "{err}");
    }
    // With the planner and one model, the same values render.
    let docs = helm_template(&["--set", "planner.enabled=true", "--set", "autoscaling.prefill.enabled=true"]);
    assert_eq!(of(&docs, "HorizontalPodAutoscaler").count(), 1);
    assert_eq!(deployment_of(&docs, "decode")["spec"]["replicas"].as_u64(), Some(1), "decode keeps its count");
}

/// What `helm template` prints when it refuses the chart's defaults with these `--set`
/// assignments; panics when it renders them.
fn refusal(sets: &[&str]) -> String {
    let args: Vec<&str> = sets.iter().flat_map(|s| ["--set", s]).collect();
    let out = helm_template_output(&args);
    assert!(!out.status.success(), "helm template rendered {sets:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}
