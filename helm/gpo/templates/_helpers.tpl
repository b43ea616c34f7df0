{{/* Names and labels. */}}
{{- define "gpo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gpo.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "gpo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "gpo.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "gpo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "gpo.coordinator" -}}{{ include "gpo.fullname" . }}-coordinator{{- end -}}
{{- define "gpo.worker" -}}{{ include "gpo.fullname" . }}-worker{{- end -}}
{{- define "gpo.etcd" -}}{{ include "gpo.fullname" . }}-etcd{{- end -}}

{{- define "gpo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "gpo.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "gpo.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "gpo.workerImage" -}}
{{- $repo := default .Values.image.repository .Values.worker.image.repository -}}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.worker.image.tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{/* The run's name (--run-name in etcd; also its folder's name). */}}
{{- define "gpo.runName" -}}
{{- default (include "gpo.fullname" .) .Values.run.name -}}
{{- end -}}

{{/* The run's folder on the checkpoint volume (--out). */}}
{{- define "gpo.runDir" -}}
{{- printf "/var/lib/gpo/runs/%s" (default (include "gpo.fullname" .) .Values.run.name) -}}
{{- end -}}

{{/* The Secret holding the TLS files and the token. */}}
{{- define "gpo.credentialsSecret" -}}{{ include "gpo.fullname" . }}-credentials{{- end -}}
{{- define "gpo.tlsSecret" -}}{{ default (include "gpo.credentialsSecret" .) .Values.tls.existingSecret }}{{- end -}}
{{- define "gpo.tokenSecret" -}}{{ default (include "gpo.credentialsSecret" .) .Values.token.existingSecret }}{{- end -}}

{{/* The coordinator's URL as the workers dial it. */}}
{{- define "gpo.coordinatorURL" -}}
{{- printf "%s://%s.%s.svc:%d" (ternary "https" "http" .Values.tls.enabled) (include "gpo.coordinator" .) .Release.Namespace (int .Values.coordinator.grpcPort) -}}
{{- end -}}

{{/* etcd endpoints, comma-separated; empty when etcd.mode is none. */}}
{{- define "gpo.etcdEndpoints" -}}
{{- if eq .Values.etcd.mode "external" -}}
{{- join "," .Values.etcd.external.endpoints -}}
{{- else if eq .Values.etcd.mode "bundled" -}}
{{- $svc := include "gpo.etcd" . -}}
{{- $ns := .Release.Namespace -}}
{{- $eps := list -}}
{{- range $i := until (int .Values.etcd.bundled.replicas) -}}
{{- $eps = append $eps (printf "http://%s-%d.%s.%s.svc:2379" $svc $i $svc $ns) -}}
{{- end -}}
{{- join "," $eps -}}
{{- end -}}
{{- end -}}

{{/* Flags shared by the coordinator and the workers (all PENDING, all off by default). */}}
{{- define "gpo.commonArgs" -}}
{{- if ne .Values.etcd.mode "none" }}
- --etcd
- {{ include "gpo.etcdEndpoints" . | quote }}
- --run-name
- {{ include "gpo.runName" . | quote }}
{{- end }}
{{- if .Values.metrics.enabled }}
- --metrics-addr
- {{ printf "0.0.0.0:%d" (int .Values.metrics.port) | quote }}
{{- end }}
{{- if eq .Values.logFormat "json" }}
- --log-format
- json
{{- end }}
{{- if .Values.tls.enabled }}
- --tls-cert
- /etc/gpo/tls/tls.crt
- --tls-key
- /etc/gpo/tls/tls.key
- --tls-ca
- /etc/gpo/tls/ca.crt
{{- end }}
{{- if .Values.token.enabled }}
- --token-file
- /etc/gpo/token/token
{{- end }}
{{- end -}}

{{/* Credential volumes and mounts. */}}
{{- define "gpo.credentialVolumes" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "gpo.tlsSecret" . }}
    defaultMode: 0440
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
      - {key: ca.crt, path: ca.crt}
{{- end }}
{{- if .Values.token.enabled }}
- name: token
  secret:
    secretName: {{ include "gpo.tokenSecret" . }}
    defaultMode: 0440
    items:
      - {key: token, path: token}
{{- end }}
{{- end -}}

{{- define "gpo.credentialMounts" -}}
{{- if .Values.tls.enabled }}
- {name: tls, mountPath: /etc/gpo/tls, readOnly: true}
{{- end }}
{{- if .Values.token.enabled }}
- {name: token, mountPath: /etc/gpo/token, readOnly: true}
{{- end }}
{{- end -}}

{{/* Probes. With the health endpoints (PENDING) HTTP; without, a TCP check of gRPC. */}}
{{- define "gpo.coordinatorProbes" -}}
{{- if .Values.metrics.enabled }}
startupProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: 5
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: metrics}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
{{- else }}
startupProbe:
  tcpSocket: {port: grpc}
  periodSeconds: 5
  failureThreshold: 120
livenessProbe:
  tcpSocket: {port: grpc}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  tcpSocket: {port: grpc}
  periodSeconds: 5
  failureThreshold: 2
{{- end }}
{{- end -}}

{{- define "gpo.validate" -}}
{{- if and (gt (int .Values.coordinator.replicas) 1) (eq .Values.etcd.mode "none") -}}
{{- fail "coordinator.replicas > 1 needs etcd.mode bundled or external: without etcd each coordinator would run its own, separate run" -}}
{{- end -}}
{{- if and (gt (int .Values.coordinator.replicas) 1) (not .Values.metrics.enabled) -}}
{{- fail "coordinator.replicas > 1 needs metrics.enabled: only /readyz keeps the standby out of the coordinator Service" -}}
{{- end -}}
{{- if and (eq .Values.etcd.mode "external") (empty .Values.etcd.external.endpoints) -}}
{{- fail "etcd.mode external needs etcd.external.endpoints" -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) -}}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" -}}
{{- end -}}
{{- if and .Values.run.data.path (not .Values.run.data.existingClaim) -}}
{{- fail "run.data.path needs run.data.existingClaim: the volume that holds the dataset" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) (or (not .Values.tls.cert) (not .Values.tls.key) (not .Values.tls.ca)) -}}
{{- fail "tls.enabled needs tls.existingSecret, or tls.cert, tls.key and tls.ca" -}}
{{- end -}}
{{- end -}}
