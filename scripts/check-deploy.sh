#!/usr/bin/env bash
# Checks the Helm chart deploy/helm/tandem without a cluster:
#   1. `helm lint --strict` with each value set: the chart's defaults (values.yaml) and
#      every deploy/helm/tandem/ci/*-values.yaml;
#   2. `helm template` with each value set, into <out>/<set>.yaml;
#   3. every rendered document validated with kubernetes-validate's strict schemas (no
#      unknown fields) for each Kubernetes version in KUBE_VERSIONS. Two kinds come from
#      CRDs and have no schema there: the ServiceMonitor (monitoring.coreos.com/v1,
#      prometheus-operator) and the Certificate (cert-manager.io/v1, cert-manager). Each is
#      checked against a strict subset of its CRD's schema written below, which covers every
#      field the chart emits; any other kind without a schema fails;
#   4. value sets the chart must refuse (`helm template` must fail, with the message given);
#   5. the example prometheus-adapter rule (deploy/prometheus/adapter-rules.yaml) serves the
#      External metric that the HorizontalPodAutoscalers of ci/planner-values.yaml read.
# Exits non-zero on the first failing step, naming the value set and the failing document
# (kind/name and the template it came from).
#
# Needs scripts/setup-helm.sh first (helm in .tools/bin, kubernetes-validate in .venv-deploy).
#
# Environment:
#   KUBE_VERSIONS  Kubernetes versions to validate against (default: "1.27.0 1.30.0 1.37.0":
#                  the chart's minimum, the pinned reference, the newest bundled schema)
#   OUT            where rendered manifests go (default: a temporary directory, removed)
#   CHART          the chart directory (default: deploy/helm/tandem)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="${CHART:-$ROOT/deploy/helm/tandem}"
HELM="$ROOT/.tools/bin/helm"
VPY="$ROOT/.venv-deploy/bin/python"
KUBE_VERSIONS="${KUBE_VERSIONS:-1.27.0 1.30.0 1.37.0}"
RELEASE=tandem
NAMESPACE=tandem

fail() {
    echo "check-deploy: FAIL: $*" >&2
    exit 1
}

[ -x "$HELM" ] || fail "no $HELM: run scripts/setup-helm.sh first"
"$VPY" -c 'import kubernetes_validate, yaml' 2>/dev/null || fail "no kubernetes-validate in .venv-deploy: run scripts/setup-helm.sh first"

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
else
    OUT="$(mktemp -d)"
    trap 'rm -rf "$OUT"' EXIT
fi
# helm keeps its caches and config here, not in the user's home.
export HELM_CACHE_HOME="$OUT/.helm/cache" HELM_CONFIG_HOME="$OUT/.helm/config" HELM_DATA_HOME="$OUT/.helm/data"

# The value sets: name and file ("" = the chart's defaults).
sets=("default:")
for f in "$CHART"/ci/*-values.yaml; do
    [ -e "$f" ] || continue
    sets+=("$(basename "$f" .yaml):$f")
done

kube_min="${KUBE_VERSIONS%% *}"
rendered=()
for set in "${sets[@]}"; do
    name="${set%%:*}"
    file="${set#*:}"
    args=()
    [ -z "$file" ] || args=(-f "$file")

    if ! lint_out="$("$HELM" lint --strict "$CHART" --namespace "$NAMESPACE" "${args[@]}" 2>&1)"; then
        echo "$lint_out" >&2
        fail "helm lint --strict, value set '$name'"
    fi
    echo "check-deploy: helm lint --strict ok ($name)"

    if ! "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --kube-version "$kube_min" \
        "${args[@]}" >"$OUT/$name.yaml" 2>"$OUT/$name.err"; then
        cat "$OUT/$name.err" >&2
        fail "helm template, value set '$name'"
    fi
    echo "check-deploy: helm template ok ($name: $(grep -c '^kind:' "$OUT/$name.yaml") documents)"
    rendered+=("$name=$OUT/$name.yaml")
done

# 3. Validate every rendered document.
"$VPY" - "$KUBE_VERSIONS" "${rendered[@]}" <<'PY'
import re
import sys

import jsonschema
import yaml
import kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError

versions = sys.argv[1].split()

# A strict subset of prometheus-operator's ServiceMonitor CRD (monitoring.coreos.com/v1):
# the fields this chart writes, with the CRD's types; anything else is rejected.
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": LABELS,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["key", "operator"],
            "properties": {"key": {"type": "string"},
                           "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}
RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer", "minimum": 0},
        "replacement": {"type": "string"},
        "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                            "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                            "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
                            "dropequal", "DropEqual"]},
    },
}
SERVICE_MONITOR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "additionalProperties": False, "required": ["name"],
                     "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
                                    "namespace": {"type": "string"},
                                    "labels": LABELS, "annotations": LABELS}},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "selector": SELECTOR,
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "jobLabel": {"type": "string"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"}, "targetPort": {"type": ["string", "integer"]},
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": DURATION, "scrapeTimeout": DURATION,
                        "honorLabels": {"type": "boolean"},
                        "relabelings": {"type": "array", "items": RELABEL},
                        # SafeAuthorization: the credentials are a key of a Secret in the
                        # ServiceMonitor's namespace.
                        "authorization": {"type": "object", "additionalProperties": False, "properties": {
                            "type": {"type": "string"},
                            "credentials": {"type": "object", "additionalProperties": False, "required": ["key"],
                                            "properties": {"name": {"type": "string"}, "key": {"type": "string"},
                                                           "optional": {"type": "boolean"}}}}},
                        "metricRelabelings": {"type": "array", "items": RELABEL},
                    },
                    "oneOf": [{"required": ["port"]}, {"required": ["targetPort"]}]}},
            },
        },
    },
}
# A strict subset of cert-manager's Certificate CRD (cert-manager.io/v1): the fields this
# chart writes, with the CRD's types and enums; anything else is rejected.
GO_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}
CERTIFICATE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Certificate"},
        "metadata": SERVICE_MONITOR["properties"]["metadata"],
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["secretName", "issuerRef"],
            "properties": {
                "secretName": {"type": "string", "minLength": 1},
                "secretTemplate": {"type": "object", "additionalProperties": False,
                                   "properties": {"labels": LABELS, "annotations": LABELS}},
                "commonName": {"type": "string", "maxLength": 64},
                "dnsNames": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                "usages": {"type": "array", "items": {"enum": [
                    "signing", "digital signature", "content commitment", "key encipherment",
                    "key agreement", "data encipherment", "cert sign", "crl sign", "encipher only",
                    "decipher only", "any", "server auth", "client auth", "code signing",
                    "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user",
                    "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]}},
                "duration": GO_DURATION,
                "renewBefore": GO_DURATION,
                "isCA": {"type": "boolean"},
                "privateKey": {"type": "object", "additionalProperties": False, "properties": {
                    "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                    "size": {"type": "integer"},
                    "encoding": {"enum": ["PKCS1", "PKCS8"]},
                    "rotationPolicy": {"enum": ["Never", "Always"]}}},
                "issuerRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                              "properties": {"name": {"type": "string", "minLength": 1},
                                             "kind": {"type": "string"}, "group": {"type": "string"}}},
            },
        },
    },
}
EXTRA_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("cert-manager.io/v1", "Certificate"): CERTIFICATE,
}


def documents(path):
    """Yields (template, document) from `helm template` output, keeping `# Source:` names."""
    with open(path) as f:
        text = f.read()
    for chunk in re.split(r"(?m)^---\s*$", text):
        source = re.search(r"(?m)^# Source: (.+)$", chunk)
        doc = yaml.safe_load(chunk)
        if doc is not None:
            yield (source.group(1) if source else "?"), doc


failures = []
for arg in sys.argv[2:]:
    set_name, path = arg.split("=", 1)
    seen, counted, before = set(), 0, len(failures)
    for source, doc in documents(path):
        kind, name = doc.get("kind", "?"), (doc.get("metadata") or {}).get("name", "?")
        what = f"[{set_name}] {kind}/{name} ({source})"
        counted += 1
        if (kind, name) in seen:
            failures.append(f"{what}: rendered twice")
        seen.add((kind, name))
        extra = EXTRA_SCHEMAS.get((doc.get("apiVersion"), kind))
        if extra is not None:
            for e in jsonschema.Draft202012Validator(extra).iter_errors(doc):
                failures.append(f"{what} against the {kind} subset schema: "
                                f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}")
            continue
        for v in versions:
            try:
                kubernetes_validate.validate(doc, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                failures.append(f"{what} against Kubernetes {v}: "
                                f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}")
            except SchemaNotFoundError as e:
                failures.append(f"{what}: {e.message}")
    verdict = "ok" if len(failures) == before else f"{len(failures) - before} failure(s)"
    print(f"check-deploy: kubernetes-validate {verdict} ({set_name}: {counted} documents, "
          f"Kubernetes {', '.join(versions)} strict)")

for f in failures:
    print(f"check-deploy: FAIL: {f}", file=sys.stderr)
sys.exit(1 if failures else 0)
PY

# 4. Value sets the chart must refuse, each with a fragment of the message it must give.
refuse() {
    local why="$1" expect="$2"
    shift 2
    local out
    if out="$("$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" "$@" 2>&1)"; then
        fail "helm template accepted $why ($*)"
    fi
    grep -qF -- "$expect" <<<"$out" || { echo "$out" >&2; fail "helm template refused $why without saying '$expect'"; }
}
refuse "no prefill workers and decode role 'decode'" "set decode.role to both" --set prefill.replicas=0
refuse "an unknown decode role" "decode.role must be decode or both" --set decode.role=prefill
refuse "an unknown model source" "model.source must be" --set model.source=s3
refuse "a PVC model source without a claim" "model.pvc.existingClaim is required" --set model.source=pvc
refuse "cert-manager without an issuer" "tls.certManager.issuerRef.name is required" --set tls.certManager.enabled=true
refuse "a generated certificate that outlives its CA" "must not exceed tls.generated.caDays" \
    --set tls.generated.certDays=4000
refuse "a keyed /metrics without API keys" "metrics.requireKey needs API keys" --set metrics.requireKey=true
refuse "two models of one name" "models[1].name \"a\" is given twice" --set 'models[0].name=a' --set 'models[1].name=a'
refuse "a model name that cannot name a Deployment" "must be lower-case letters" --set 'models[0].name=Qwen_2.5'
refuse "a model without a name" "models[0].name is required" --set 'models[0].file=x.gguf'
refuse "a model's pool with no prefill workers and decode role 'decode'" "models[b]: prefill.replicas is 0" \
    --set 'models[0].name=a' --set 'models[1].name=b' --set 'models[1].prefill.replicas=0'
refuse "an autoscaler without the planner" "autoscaling.prefill.enabled needs planner.enabled" \
    --set autoscaling.prefill.enabled=true
refuse "a decode autoscaler without the planner" "autoscaling.decode.enabled needs planner.enabled" \
    --set autoscaling.decode.enabled=true
refuse "autoscalers with several models" "autoscaling.decode.enabled with several models" \
    --set planner.enabled=true --set autoscaling.decode.enabled=true --set 'models[0].name=a' --set 'models[1].name=b'
refuse "an autoscaler that may scale to zero" "autoscaling.prefill.minReplicas must be at least 1" \
    --set planner.enabled=true --set autoscaling.prefill.enabled=true --set autoscaling.prefill.minReplicas=0
refuse "an autoscaler whose maximum is below its minimum" "must not be below minReplicas" \
    --set planner.enabled=true --set autoscaling.decode.enabled=true --set autoscaling.decode.maxReplicas=0
refuse "an unknown prefill placement" "router.prefillPlacement must be adaptive, remote or threshold" \
    --set router.prefillPlacement=local
echo "check-deploy: invalid value sets refused (17)"

# 5. The example adapter rule serves, per role, the metric the autoscalers read.
[ -e "$OUT/planner-values.yaml" ] || fail "no ci/planner-values.yaml render to check the adapter rule against"
"$VPY" - "$ROOT/deploy/prometheus/adapter-rules.yaml" "$OUT/planner-values.yaml" <<'PY' || fail "deploy/prometheus/adapter-rules.yaml"
import sys

import yaml

with open(sys.argv[1]) as f:
    rules = yaml.safe_load(f)["externalRules"]
served = {r["name"]["as"]: r for r in rules}
with open(sys.argv[2]) as f:
    hpas = [d for d in yaml.safe_load_all(f) if d and d.get("kind") == "HorizontalPodAutoscaler"]
assert len(hpas) == 2, f"{len(hpas)} HorizontalPodAutoscalers in the planner render, not 2"
for hpa in hpas:
    for m in hpa["spec"]["metrics"]:
        metric = m["external"]["metric"]
        rule = served.get(metric["name"])
        assert rule is not None, f"{hpa['metadata']['name']}: no external rule serves {metric['name']}"
        assert metric["name"] in rule["seriesQuery"], rule
        # The autoscalers select on labels: the query must keep them apart.
        for label in metric["selector"]["matchLabels"]:
            assert f"by ({label})" in rule["metricsQuery"], (label, rule["metricsQuery"])
        assert "namespace" in rule["resources"]["overrides"], "the metric must be per namespace"
print(f"check-deploy: adapter rule ok (serves {', '.join(sorted(served))} to {len(hpas)} autoscalers)")
PY
echo "check-deploy: ok: ${#sets[@]} value set(s) linted, rendered and validated"
