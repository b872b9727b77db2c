{{/* The name of one pool's worker Deployment of a kind. Call with (dict "ctx" $ "kind" "prefill" "pool" $p). */}}
{{- define "tandem.workerName" -}}
{{ include "tandem.fullname" .ctx }}-{{ include "tandem.poolPrefix" .pool }}{{ .kind }}
{{- end }}

{{/*
A worker Deployment of one pool (see _models.tpl): prefill or decode. Call with
(dict "ctx" $ "kind" "prefill" "pool" $p). Workers need no Service: they register in etcd
with their pod IP (status.podIP), and the routers reach them there.
*/}}
{{- define "tandem.workerDeployment" -}}
{{- $ctx := .ctx }}
{{- $v := $ctx.Values }}
{{- $kind := .kind }}
{{- $pool := .pool }}
{{- $w := index $pool $kind }}
{{- $dshm := and (eq $kind "decode") $v.sharedMemory.emptyDir }}
{{- $labels := dict "ctx" $ctx "component" $kind "model" $pool.key }}
{{- $model := dict "pool" $pool "many" false "ctx" $ctx }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "tandem.workerName" . }}
  labels:
    {{- include "tandem.labels" $labels | nindent 4 }}
spec:
  {{- /* With an autoscaler (hpa.yaml), it owns the count: a fixed one would undo its every change. */}}
  {{- if not (index $v.autoscaling $kind).enabled }}
  replicas: {{ $w.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  # A new worker registers before an old one drains: capacity never dips during a rollout.
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0
  selector:
    matchLabels:
      {{- include "tandem.selectorLabels" $labels | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "tandem.labels" $labels | nindent 8 }}
        tandem-worker: "true"
      {{- $annotations := merge (dict) $w.podAnnotations (include "tandem.scrapeAnnotations" (dict "ctx" $ctx "port" $v.workerPorts.metrics) | fromYaml) }}
      {{- with (include "tandem.authChecksum" $ctx) }}
      {{- $_ := set $annotations "checksum/cluster-auth" . }}
      {{- end }}
      {{- with $annotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "tandem.serviceAccountName" $ctx }}
      automountServiceAccountToken: false
      # No <SERVICE>_PORT variables: some would read as TANDEM_* flags.
      enableServiceLinks: false
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $v.podSecurityContext | nindent 8 }}
      # SIGTERM drains for up to drain.timeoutSeconds, then the worker deregisters and exits 0.
      terminationGracePeriodSeconds: {{ include "tandem.gracePeriod" (dict "ctx" $ctx "extra" 0) }}
      {{- with (include "tandem.modelInitContainer" $model) }}
      initContainers:
        {{- . | trim | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $kind }}
          image: {{ include "tandem.image" $ctx }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          args: [{{ $kind | quote }}]
          env:
            {{- include "tandem.workerEnv" (dict "ctx" $ctx "w" $w "pool" $pool) | trim | nindent 12 }}
            {{- if eq $kind "decode" }}
            - name: TANDEM_ROLE
              value: {{ $w.role | quote }}
            - name: TANDEM_KV_LISTEN
              value: "0.0.0.0:{{ $v.workerPorts.kv }}"
            {{- end }}
            {{- with $w.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: grpc
              containerPort: {{ $v.workerPorts.grpc }}
              protocol: TCP
            {{- if eq $kind "decode" }}
            - name: kv
              containerPort: {{ $v.workerPorts.kv }}
              protocol: TCP
            {{- end }}
            - name: metrics
              containerPort: {{ $v.workerPorts.metrics }}
              protocol: TCP
            {{- if $v.tls.enabled }}
            - name: health
              containerPort: {{ $v.workerPorts.health }}
              protocol: TCP
            {{- end }}
          {{- include "tandem.workerProbes" $ctx | trim | nindent 10 }}
          resources:
            {{- toYaml $w.resources | nindent 12 }}
          securityContext:
            {{- toYaml $v.securityContext | nindent 12 }}
          volumeMounts:
            {{- with (include "tandem.modelMount" $model | trim) }}{{ . | nindent 12 }}{{ end }}
            {{- with (include "tandem.authMounts" $ctx | trim) }}{{ . | nindent 12 }}{{ end }}
            - name: tmp
              mountPath: /tmp
            {{- if $dshm }}
            - name: dshm
              mountPath: /dev/shm
            {{- end }}
      volumes:
        {{- with (include "tandem.modelVolume" $model | trim) }}{{ . | nindent 8 }}{{ end }}
        {{- with (include "tandem.authVolumes" $ctx | trim) }}{{ . | nindent 8 }}{{ end }}
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
        {{- if $dshm }}
        # The decode worker's KV block pool lives in a segment here (see sharedMemory).
        - name: dshm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $v.sharedMemory.sizeLimit }}
        {{- end }}
      {{- with $w.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
