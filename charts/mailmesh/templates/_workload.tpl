{{/*
One mailmesh service: Deployment (probes on the admin port, non-root read-only
security context, spread over zones and nodes, termination grace from the drain
settings), optional ClusterIP Service, PodDisruptionBudget and CPU HorizontalPodAutoscaler.
Parameters: root (the chart context), component, v (its values), binary, ports (list of
{name, port, servicePort?, appProtocol?}), service (bool), serviceType (ClusterIP by
default; a LoadBalancer keeps client addresses with externalTrafficPolicy Local), tls
(mount the certificate Secret at /etc/mailmesh/tls), stateless (no Kafka/S3 credentials),
sessionsMetric (the custom metric autoscaling.sessionsPerPod scales on), role (the
internal identity: its certificate is mounted at /etc/mailmesh/internal-tls).
*/}}
{{- define "mailmesh.workload" -}}
{{- $root := .root -}}
{{- $component := .component -}}
{{- $v := .v -}}
{{- $name := printf "%s-%s" (include "mailmesh.fullname" $root) $component -}}
{{- with $root -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  labels:
    {{- include "mailmesh.labels" . | nindent 4 }}
    app.kubernetes.io/component: {{ $component }}
spec:
  {{- if not $v.autoscaling.enabled }}
  replicas: {{ $v.replicas }}
  {{- end }}
  selector:
    matchLabels:
      app.kubernetes.io/instance: {{ .Release.Name }}
      app.kubernetes.io/component: {{ $component }}
  strategy:
    rollingUpdate:
      maxUnavailable: 0
      maxSurge: 1
  template:
    metadata:
      labels:
        {{- include "mailmesh.labels" . | nindent 8 }}
        app.kubernetes.io/component: {{ $component }}
      annotations:
        # Roll the pods when their own configuration file changes (not another
        # service's: one checksum per file).
        checksum/config: {{ index (include (print $root.Template.BasePath "/configmap.yaml") $root | fromYaml).data (printf "%s.toml" $.binary) | required (printf "no %s.toml in the ConfigMap" $.binary) | sha256sum }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ .Values.admin.port | quote }}
    spec:
      serviceAccountName: {{ include "mailmesh.serviceAccountName" . }}
      automountServiceAccountToken: false
      enableServiceLinks: false
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      terminationGracePeriodSeconds: {{ include "mailmesh.terminationGrace" . }}
      securityContext:
        {{- toYaml .Values.podSecurityContext | nindent 8 }}
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: topology.kubernetes.io/zone
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              app.kubernetes.io/instance: {{ .Release.Name }}
              app.kubernetes.io/component: {{ $component }}
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              app.kubernetes.io/instance: {{ .Release.Name }}
              app.kubernetes.io/component: {{ $component }}
      containers:
        - name: {{ $component }}
          image: {{ include "mailmesh.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          command: ["/usr/local/bin/{{ $.binary }}"]
          env:
            - name: MAILMESH_CONFIG
              value: /etc/mailmesh/{{ $.binary }}.toml
            {{- if not $.stateless }}
            {{- include "mailmesh.backendEnv" . | nindent 12 }}
            {{- end }}
            {{- if eq $component "storage" }}
            # Other replicas forward calls for the partitions this one owns to
            # this address (ADR 0005).
            - name: MAILMESH_STORAGE__ADVERTISE_HOST
              valueFrom:
                fieldRef:
                  fieldPath: status.podIP
            # Signs the session tokens of logged-in users (ADR 0006).
            - name: MAILMESH_STORAGE__SESSION_SECRET
              valueFrom:
                secretKeyRef:
                  name: {{ include "mailmesh.sessionSecretName" . }}
                  key: key
            # During a rotation: the secret before, still accepted (key `previous`).
            - name: MAILMESH_STORAGE__SESSION_SECRET_PREVIOUS
              valueFrom:
                secretKeyRef:
                  name: {{ include "mailmesh.sessionSecretName" . }}
                  key: previous
                  optional: true
            {{- end }}
            {{- if or (eq $component "smtp-ingress") (eq $component "delivery-worker") }}
            # Rewrites forwarded senders (worker) and takes bounces to them back (MX).
            - name: {{ if eq $component "smtp-ingress" }}MAILMESH_SMTP__SRS__SECRET{{ else }}MAILMESH_WORKER__SRS__SECRET{{ end }}
              valueFrom:
                secretKeyRef:
                  name: {{ include "mailmesh.srsSecretName" . }}
                  key: key
            {{- end }}
            {{- if and (eq $component "storage") .Values.storage.dkimKeySecret }}
            # Seals DKIM private keys in the directory log and snapshots.
            - name: MAILMESH_STORAGE__DKIM_KEY_SECRET
              valueFrom:
                secretKeyRef:
                  name: {{ .Values.storage.dkimKeySecret }}
                  key: key
            {{- end }}
            {{- if $.redis }}
            - name: MAILMESH_CACHE__REDIS__URL
              valueFrom:
                secretKeyRef:
                  name: {{ required "redis.urlSecret is required" .Values.redis.urlSecret }}
                  key: url
            {{- end }}
          ports:
            {{- range $.ports }}
            - name: {{ .name }}
              containerPort: {{ .port }}
            {{- end }}
            - name: admin
              containerPort: {{ .Values.admin.port }}
          startupProbe:
            httpGet:
              path: /livez
              port: admin
            periodSeconds: 2
            failureThreshold: 60
          livenessProbe:
            httpGet:
              path: /livez
              port: admin
            periodSeconds: 10
          readinessProbe:
            httpGet:
              path: /readyz
              port: admin
            periodSeconds: 5
            failureThreshold: 2
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- toYaml .Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: config
              mountPath: /etc/mailmesh
              readOnly: true
            - name: tmp
              mountPath: /tmp
            {{- if eq $component "storage" }}
            - name: index
              mountPath: /var/lib/mailmesh/index
            {{- end }}
            {{- if $.tls }}
            # A projected Secret: cert-manager renewals appear here and are reloaded.
            - name: tls
              mountPath: /etc/mailmesh/tls
              readOnly: true
            {{- end }}
            # This workload's identity between the services (renewals reloaded too).
            - name: internal-tls
              mountPath: /etc/mailmesh/internal-tls
              readOnly: true
            {{- if and (eq $component "auth-check") .Values.authCheck.arcSeal.secretName }}
            - name: arc-seal
              mountPath: /etc/mailmesh/arc
              readOnly: true
            {{- end }}
      volumes:
        - name: config
          configMap:
            name: {{ include "mailmesh.fullname" . }}-config
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
        {{- if eq $component "storage" }}
        - name: index
          emptyDir:
            sizeLimit: {{ .Values.storage.indexVolumeSize }}
        {{- end }}
        {{- if $.tls }}
        - name: tls
          secret:
            secretName: {{ include "mailmesh.tlsSecretName" $root }}
        {{- end }}
        - name: internal-tls
          secret:
            secretName: {{ include "mailmesh.fullname" . }}-internal-{{ required "role" $.role }}
        {{- if and (eq $component "auth-check") .Values.authCheck.arcSeal.secretName }}
        - name: arc-seal
          secret:
            secretName: {{ .Values.authCheck.arcSeal.secretName }}
        {{- end }}
{{- if $.service }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
  labels:
    {{- include "mailmesh.labels" . | nindent 4 }}
    app.kubernetes.io/component: {{ $component }}
spec:
  type: {{ $.serviceType | default "ClusterIP" }}
  {{- if eq ($.serviceType | default "ClusterIP") "LoadBalancer" }}
  # Keeps the client's source address (no SNAT), so SPF and logs see the real IP.
  externalTrafficPolicy: Local
  {{- end }}
  selector:
    app.kubernetes.io/instance: {{ .Release.Name }}
    app.kubernetes.io/component: {{ $component }}
  ports:
    {{- range $.ports }}
    - name: {{ .name }}
      port: {{ .servicePort | default .port }}
      targetPort: {{ .name }}
      {{- with .appProtocol }}
      appProtocol: {{ . }}
      {{- end }}
    {{- end }}
    {{- if ne ($.serviceType | default "ClusterIP") "LoadBalancer" }}
    - name: admin
      port: {{ .Values.admin.port }}
      targetPort: admin
    {{- end }}
{{- end }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $name }}
  labels:
    {{- include "mailmesh.labels" . | nindent 4 }}
    app.kubernetes.io/component: {{ $component }}
spec:
  minAvailable: {{ $v.podDisruptionBudget.minAvailable }}
  selector:
    matchLabels:
      app.kubernetes.io/instance: {{ .Release.Name }}
      app.kubernetes.io/component: {{ $component }}
{{- if $v.autoscaling.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $name }}
  labels:
    {{- include "mailmesh.labels" . | nindent 4 }}
    app.kubernetes.io/component: {{ $component }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  minReplicas: {{ $v.autoscaling.minReplicas }}
  maxReplicas: {{ $v.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $v.autoscaling.targetCPUUtilizationPercentage }}
    {{- if and $.sessionsMetric $v.autoscaling.sessionsPerPod }}
    # Open sessions per pod, from Prometheus through an adapter (e.g.
    # prometheus-adapter exposing this metric to the custom metrics API).
    - type: Pods
      pods:
        metric:
          name: {{ $.sessionsMetric }}
        target:
          type: AverageValue
          averageValue: {{ $v.autoscaling.sessionsPerPod | quote }}
    {{- end }}
{{- end }}
{{- end }}
{{- end -}}
