{{/* Names and labels shared by every mailmesh object. */}}

{{- define "mailmesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mailmesh.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "mailmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mailmesh.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The mail domain every default host name derives from; nothing renders
without it (no host would be right, and clients would be told of *.localhost). */}}
{{- define "mailmesh.mailDomain" -}}
{{- required "mailDomain is required: the hosts are mx.<mailDomain> (MX), smtp.<mailDomain> (submission) and mail.<mailDomain> (IMAP/POP3); set e.g. --set mailDomain=example.com" .Values.mailDomain -}}
{{- end -}}

{{/* The hosts the chart announces (NOTES) and the services name themselves. */}}
{{- define "mailmesh.mxHost" -}}
{{- .Values.smtpIngress.hostname | default (printf "mx.%s" (include "mailmesh.mailDomain" .)) -}}
{{- end -}}

{{- define "mailmesh.submissionHost" -}}
{{- .Values.submission.hostname | default (printf "smtp.%s" (include "mailmesh.mailDomain" .)) -}}
{{- end -}}

{{- define "mailmesh.gatewayHost" -}}
{{- .Values.gateway.hostname | default (printf "mail.%s" (include "mailmesh.mailDomain" .)) -}}
{{- end -}}

{{/* The Secret holding the TLS certificate. */}}
{{- define "mailmesh.tlsSecretName" -}}
{{- if .Values.tls.secretName -}}
{{- .Values.tls.secretName -}}
{{- else if .Values.tls.certManager.enabled -}}
{{- printf "%s-tls" (include "mailmesh.fullname" .) -}}
{{- else -}}
{{- fail "tls.secretName is required (or enable tls.certManager)" -}}
{{- end -}}
{{- end -}}

{{/*
Credentials for the queue and the object store, from Secrets (never the ConfigMap).
Pods set `enableServiceLinks: false`: mailmesh reads every MAILMESH_* variable as
configuration and refuses unknown keys, and Kubernetes would otherwise inject
MAILMESH_<SERVICE>_PORT variables for the chart's Services.
*/}}
{{- define "mailmesh.backendEnv" -}}
{{- with .Values.s3.credentialsSecret }}
- name: MAILMESH_OBJECT_STORE__S3__ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: access-key-id
- name: MAILMESH_OBJECT_STORE__S3__SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: secret-access-key
{{- end }}
{{- with .Values.kafka.saslPasswordSecret }}
- name: MAILMESH_QUEUE__KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: password
{{- end }}
{{- end -}}

{{- define "mailmesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Seconds Kubernetes waits after SIGTERM: readiness grace + drain + margin. */}}
{{- define "mailmesh.terminationGrace" -}}
{{- $grace := trimSuffix "s" .Values.shutdown.readinessGrace | int -}}
{{- $drain := trimSuffix "s" .Values.shutdown.drainTimeout | int -}}
{{- add $grace $drain 10 -}}
{{- end -}}

{{/* The configuration sections every service shares: admin port, telemetry,
shutdown, queue and object store. */}}
{{- define "mailmesh.commonConfig" -}}
{{ include "mailmesh.serviceConfig" . }}
{{ include "mailmesh.backendConfig" . }}
{{- end -}}

{{/* What every service reads: admin port, telemetry, shutdown. */}}
{{- define "mailmesh.serviceConfig" -}}
[admin]
listen = "0.0.0.0:{{ .Values.admin.port }}"

[telemetry]
log_format = {{ .Values.telemetry.logFormat | quote }}
log_level = {{ .Values.telemetry.logLevel | quote }}
{{- with .Values.telemetry.otlpEndpoint }}
otlp_endpoint = {{ . | quote }}
{{- end }}

[shutdown]
readiness_grace = {{ .Values.shutdown.readinessGrace | quote }}
drain_timeout = {{ .Values.shutdown.drainTimeout | quote }}
{{- end -}}

{{/* Where services with state find it: the Kafka queue and the object store. */}}
{{- define "mailmesh.backendConfig" -}}
[queue.kafka]
brokers = {{ required "kafka.brokers is required" .Values.kafka.brokers | quote }}
replication_factor = {{ .Values.kafka.topic.replicationFactor }}
{{- with .Values.kafka.properties }}

[queue.kafka.properties]
{{- range $k, $v := . }}
{{ $k | quote }} = {{ $v | quote }}
{{- end }}
{{- end }}

[object_store.s3]
bucket = {{ required "s3.bucket is required" .Values.s3.bucket | quote }}
region = {{ .Values.s3.region | quote }}
path_style = {{ .Values.s3.pathStyle }}
{{- with .Values.s3.endpoint }}
endpoint = {{ . | quote }}
{{- end }}
{{- end -}}

{{/* [cache.redis.sentinel] when redis.sentinel.master is set. */}}
{{- define "mailmesh.redisSentinel" -}}
{{- with .Values.redis.sentinel }}
{{- if .master -}}
[cache.redis.sentinel]
master = {{ .master | quote }}
nodes = [{{ range $i, $n := .nodes }}{{ if $i }}, {{ end }}{{ printf "redis://%s" $n | quote }}{{ end }}]
{{- end }}
{{- end }}
{{- end -}}

{{/* [internal_tls]: the workload's certificate for mutual TLS between the services,
mounted from its Secret at /etc/mailmesh/internal-tls (ADR 0006). */}}
{{- define "mailmesh.internalTlsConfig" -}}
[internal_tls]
cert_file = "/etc/mailmesh/internal-tls/tls.crt"
key_file = "/etc/mailmesh/internal-tls/tls.key"
ca_file = "/etc/mailmesh/internal-tls/ca.crt"
reload_interval = {{ .Values.internalTls.reloadInterval | quote }}
{{- end -}}

{{/* The Secret with the session-token key storage signs with. */}}
{{- define "mailmesh.sessionSecretName" -}}
{{- .Values.storage.sessionSecret | default (printf "%s-session" (include "mailmesh.fullname" .)) -}}
{{- end -}}

{{/* The Secret with the SRS key smtp-ingress and the delivery worker share. */}}
{{- define "mailmesh.srsSecretName" -}}
{{- .Values.srs.secretName | default (printf "%s-srs" (include "mailmesh.fullname" .)) -}}
{{- end -}}
