{{/*
The models a release serves, as pools: one pool per model, each with its own prefill and
decode workers, one router in front of them all.

With `models` empty (the default) there is one pool from `model`, `prefill` and `decode`,
rendered exactly as a single-model release always was: its key is "" (no name in resource
names, no model label). With `models` set, each entry is merged over `model` (file and
source settings), its `prefill` over `prefill` and its `decode` over `decode`; its `name`
is its key in resource names and labels, and what clients send as `model` unless
`servedName` says otherwise.

"tandem.pools" renders the pools as a YAML list: (include "tandem.pools" $ | fromYamlArray).
*/}}
{{- define "tandem.pools" -}}
{{- $v := .Values }}
{{- $pools := list }}
{{- if not $v.models }}
{{- $m := deepCopy $v.model }}
{{- $_ := set $m "key" "" }}
{{- $_ := set $m "prefill" (deepCopy $v.prefill) }}
{{- $_ := set $m "decode" (deepCopy $v.decode) }}
{{- $pools = append $pools $m }}
{{- else }}
{{- $seen := dict }}
{{- range $i, $e := $v.models }}
{{- $key := required (printf "models[%d].name is required" $i) $e.name }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,28}[a-z0-9])?$" $key) }}
{{- fail (printf "models[%d].name %q must be lower-case letters, digits and '-' (at most 30, a letter or digit at each end): it names the model's Deployments" $i $key) }}
{{- end }}
{{- if hasKey $seen $key }}
{{- fail (printf "models[%d].name %q is given twice" $i $key) }}
{{- end }}
{{- $_ := set $seen $key true }}
{{- $m := mergeOverwrite (deepCopy $v.model) (omit (deepCopy $e) "name" "prefill" "decode") }}
{{- $_ := set $m "key" $key }}
{{- $_ := set $m "servedName" (default $key $e.servedName) }}
{{- $_ := set $m "prefill" (mergeOverwrite (deepCopy $v.prefill) (deepCopy (default (dict) $e.prefill))) }}
{{- $_ := set $m "decode" (mergeOverwrite (deepCopy $v.decode) (deepCopy (default (dict) $e.decode))) }}
{{- $pools = append $pools $m }}
{{- end }}
{{- end }}
{{- range $pools }}
{{- $where := ternary "" (printf "models[%s]: " .key) (eq .key "") }}
{{- if not (has .decode.role (list "decode" "both")) }}
{{- fail (printf "%sdecode.role must be decode or both, not %q" $where .decode.role) }}
{{- end }}
{{- if and (eq (int .prefill.replicas) 0) (ne .decode.role "both") }}
{{- fail (printf "%sprefill.replicas is 0: set decode.role to both, so that decode workers prefill locally" $where) }}
{{- end }}
{{- end }}
{{- toYaml $pools }}
{{- end }}

{{/* A pool's prefix in resource names: "" or "<key>-". Call with a pool. */}}
{{- define "tandem.poolPrefix" -}}
{{- if .key }}{{ .key }}-{{ end }}
{{- end }}

{{/*
Where one pool's model file is in a container that mounts it at `dir` (the image's own
directory for source image). Call with (dict "pool" $p "dir" "/models").
*/}}
{{- define "tandem.poolModelPath" -}}
{{- $dir := ternary .pool.mountPath .dir (eq .pool.source "image") }}
{{- printf "%s/%s" (trimSuffix "/" $dir) .pool.file }}
{{- end }}

{{/*
The TANDEM_MODEL (and TANDEM_MODEL_NAME) of a worker of one pool, or of a router serving
`pools` (the router's each mounted where "tandem.routerModelDir" says). Call with
(dict "pools" $pools) for a router, (dict "pools" (list $p)) for a worker of $p.
*/}}
{{- define "tandem.modelEnv" -}}
{{- $single := eq (len .pools) 1 }}
{{- if $single }}
{{- $p := first .pools }}
- name: TANDEM_MODEL
  value: {{ include "tandem.poolModelPath" (dict "pool" $p "dir" $p.mountPath) | quote }}
{{- with $p.servedName }}
- name: TANDEM_MODEL_NAME
  value: {{ . | quote }}
{{- end }}
{{- else }}
{{- $models := list }}
{{- range .pools }}
{{- $path := include "tandem.poolModelPath" (dict "pool" . "dir" (include "tandem.routerModelDir" .)) }}
{{- $models = append $models (printf "%s=%s" .servedName $path) }}
{{- end }}
- name: TANDEM_MODEL
  value: {{ join "," $models | quote }}
{{- end }}
{{- end }}

{{/* Where a router serving several models mounts one pool's model directory. Call with a pool. */}}
{{- define "tandem.routerModelDir" -}}
{{- printf "%s/%s" (trimSuffix "/" .mountPath) .key }}
{{- end }}

{{/* The name of one pool's model volume in a pod: "model", or "model-<key>" in a router serving several. */}}
{{- define "tandem.modelVolumeName" -}}
{{- if .many }}model-{{ .pool.key }}{{ else }}model{{ end }}
{{- end }}

{{/*
The model volume of one pool. Call with (dict "pool" $p "many" false): many names it
for a router serving several pools.
*/}}
{{- define "tandem.modelVolume" -}}
{{- $m := .pool }}
{{- $name := include "tandem.modelVolumeName" . }}
{{- if eq $m.source "download" }}
- name: {{ $name }}
  emptyDir:
    sizeLimit: {{ $m.download.sizeLimit }}
{{- else if eq $m.source "pvc" }}
- name: {{ $name }}
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.existingClaim is required when model.source is pvc" $m.pvc.existingClaim }}
    readOnly: true
{{- else if eq $m.source "hostPath" }}
- name: {{ $name }}
  hostPath:
    path: {{ required "model.hostPath.path is required when model.source is hostPath" $m.hostPath.path }}
    type: Directory
{{- else if ne $m.source "image" }}
{{- fail (printf "model.source must be download, pvc, hostPath or image, not %q" $m.source) }}
{{- end }}
{{- end }}

{{/* The model volume's mount. Call with (dict "pool" $p "many" false). */}}
{{- define "tandem.modelMount" -}}
{{- $m := .pool }}
{{- if ne $m.source "image" }}
- name: {{ include "tandem.modelVolumeName" . }}
  mountPath: {{ ternary (include "tandem.routerModelDir" $m) $m.mountPath .many }}
  readOnly: true
  {{- if and (eq $m.source "pvc") $m.pvc.subPath }}
  subPath: {{ $m.pvc.subPath }}
  {{- end }}
{{- end }}
{{- end }}
