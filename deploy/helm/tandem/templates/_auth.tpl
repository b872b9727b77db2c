{{/*
How the routers and workers know each other: mutual TLS (tls.*) and the cluster token
(clusterAuth.*). The env, volumes and mounts every router and worker shares, and the
material the chart generates itself.
*/}}

{{/* Where the TLS certificate comes from: existingSecret, certManager or generated. Call with $. */}}
{{- define "tandem.tlsSource" -}}
{{- if .Values.tls.existingSecret }}existingSecret
{{- else if .Values.tls.certManager.enabled }}certManager
{{- else }}generated
{{- end }}
{{- end }}

{{/* The Secret every router and worker mounts for TLS. */}}
{{- define "tandem.tlsSecretName" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "tandem.fullname" .)) }}
{{- end }}

{{/* The Secret holding the cluster token. */}}
{{- define "tandem.clusterTokenSecretName" -}}
{{- .Values.clusterAuth.existingSecret | default (printf "%s-cluster-token" (include "tandem.fullname" .)) }}
{{- end }}

{{/*
The material the chart makes itself, once per render, kept in .Values._tandemAuth (a dict;
every template of the chart sees the same .Values, so the Secrets and the pods' checksum
agree): "tls" (base64 ca.crt, tls.crt, tls.key, and notAfter) when the certificate is
generated, "token" (base64) when the chart holds the cluster token. An existing Secret of
the release (`lookup`) is reused, so `helm upgrade` keeps both; `helm template` sees no
cluster and makes new ones. Renders nothing.
*/}}
{{- define "tandem.generatedAuth" -}}
{{- if not (hasKey .Values "_tandemAuth") }}
{{- $g := dict }}
{{- $ns := .Release.Namespace }}
{{- if and .Values.tls.enabled (eq (include "tandem.tlsSource" .) "generated") }}
{{- $gen := .Values.tls.generated }}
{{- $server := required "tls.serverName is required" .Values.tls.serverName }}
{{- if gt (int $gen.certDays) (int $gen.caDays) }}
{{- fail (printf "tls.generated.certDays (%d) must not exceed tls.generated.caDays (%d)" (int $gen.certDays) (int $gen.caDays)) }}
{{- end }}
{{- $old := lookup "v1" "Secret" $ns (include "tandem.tlsSecretName" .) }}
{{- $data := dig "data" (dict) $old }}
{{- $oldServer := dig "metadata" "annotations" "tandem/tls-server-name" "" $old }}
{{- if and (index $data "tls.crt") (index $data "tls.key") (index $data "ca.crt") (eq $oldServer $server) }}
{{- $_ := set $g "tls" (dict "ca.crt" (index $data "ca.crt") "tls.crt" (index $data "tls.crt") "tls.key" (index $data "tls.key") "notAfter" (dig "metadata" "annotations" "tandem/tls-not-after" "" $old)) }}
{{- else }}
{{- /* RSA 2048; the certificate names the server name as a DNS SAN and allows server and client auth. */}}
{{- $ca := genCA (printf "%s CA" (include "tandem.fullname" .)) (int $gen.caDays) }}
{{- $cert := genSignedCert $server nil (list $server) (int $gen.certDays) $ca }}
{{- $notAfter := dateInZone "2006-01-02" (now | dateModify (printf "+%dh" (mul 24 (int $gen.certDays)))) "UTC" }}
{{- $_ := set $g "tls" (dict "ca.crt" ($ca.Cert | b64enc) "tls.crt" ($cert.Cert | b64enc) "tls.key" ($cert.Key | b64enc) "notAfter" $notAfter) }}
{{- end }}
{{- end }}
{{- if not .Values.clusterAuth.existingSecret }}
{{- $old := lookup "v1" "Secret" $ns (include "tandem.clusterTokenSecretName" .) }}
{{- $token := dig "data" .Values.clusterAuth.secretKey "" $old }}
{{- $_ := set $g "token" ($token | default (randAlphaNum 48 | b64enc)) }}
{{- end }}
{{- $_ := set .Values "_tandemAuth" $g }}
{{- end }}
{{- end }}

{{/*
A checksum of what the chart generated (certificate and token), for the pods' annotations:
when a rotation makes new ones, the pods restart and read them. Empty when the chart
generated nothing (existing Secrets and cert-manager: restart the pods yourself).
*/}}
{{- define "tandem.authChecksum" -}}
{{- include "tandem.generatedAuth" . }}
{{- $g := index .Values "_tandemAuth" }}
{{- $cert := dig "tls" "tls.crt" "" $g }}
{{- $token := dig "token" "" $g }}
{{- if or $cert $token }}
{{- printf "%s\n%s" $cert $token | sha256sum }}
{{- end }}
{{- end }}

{{/* Environment of every router and worker for mutual TLS (tls.enabled): the mounted Secret's files. */}}
{{- define "tandem.tlsEnv" -}}
{{- if .Values.tls.enabled }}
{{- $dir := trimSuffix "/" .Values.tls.mountPath }}
- name: TANDEM_TLS_CERT
  value: {{ printf "%s/tls.crt" $dir | quote }}
- name: TANDEM_TLS_KEY
  value: {{ printf "%s/tls.key" $dir | quote }}
- name: TANDEM_TLS_CA
  value: {{ printf "%s/ca.crt" $dir | quote }}
- name: TANDEM_TLS_SERVER_NAME
  value: {{ .Values.tls.serverName | quote }}
{{- end }}
{{- end }}

{{/* Environment of every router and worker for the cluster token (on a line of its own). */}}
{{- define "tandem.clusterTokenEnv" }}
- name: TANDEM_CLUSTER_TOKEN_FILE
  value: {{ printf "%s/token" (trimSuffix "/" .Values.clusterAuth.mountPath) | quote }}
{{- end }}

{{/* The TLS Secret and the cluster token as volumes; readable by the pods' group (fsGroup) only. */}}
{{- define "tandem.authVolumes" -}}
{{- if .Values.tls.enabled }}
{{- if and (eq (include "tandem.tlsSource" .) "certManager") (not .Values.tls.certManager.issuerRef.name) }}
{{- fail "tls.certManager.issuerRef.name is required when tls.certManager.enabled is true (an Issuer or ClusterIssuer that writes ca.crt)" }}
{{- end }}
- name: tls
  secret:
    secretName: {{ include "tandem.tlsSecretName" . }}
    defaultMode: 0440
{{- end }}
- name: cluster-token
  secret:
    secretName: {{ include "tandem.clusterTokenSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ required "clusterAuth.secretKey is required" .Values.clusterAuth.secretKey }}
        path: token
{{- end }}

{{- define "tandem.authMounts" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ .Values.tls.mountPath }}
  readOnly: true
{{- end }}
- name: cluster-token
  mountPath: {{ .Values.clusterAuth.mountPath }}
  readOnly: true
{{- end }}
