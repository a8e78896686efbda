{{/* Names and labels shared by every object of the release. */}}
{{- define "imagegenx.fullname" -}}
{{- printf "%s-imagegenx" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "imagegenx.labels" -}}
app.kubernetes.io/name: imagegenx
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component (api or worker): call with (list . "api"). */}}
{{- define "imagegenx.selector" -}}
app.kubernetes.io/name: imagegenx
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* Where a component's pods may run: call with .Values.api or .Values.worker. */}}
{{- define "imagegenx.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "imagegenx.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "imagegenx.secretName" -}}
{{- default (include "imagegenx.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "imagegenx.queueUrl" -}}
{{- if .Values.nats.enabled -}}
{{- printf "nats://%s-nats:4222" .Release.Name -}}
{{- else -}}
{{- required "queueUrl is needed when nats.enabled is false" .Values.queueUrl -}}
{{- end -}}
{{- end -}}

{{- define "imagegenx.natsMonitoring" -}}
{{- default (printf "%s-nats-headless.%s.svc.cluster.local:8222" .Release.Name .Release.Namespace) .Values.natsMonitoringEndpoint -}}
{{- end -}}

{{- define "imagegenx.databaseUrl" -}}
{{- if .Values.secrets.databaseUrl -}}
{{- .Values.secrets.databaseUrl -}}
{{- else if .Values.postgresql.enabled -}}
{{- $pg := .Values.postgresql.auth -}}
{{- printf "postgresql+psycopg://%s:%s@%s-postgresql:5432/%s" $pg.username (required "postgresql.auth.password is needed" $pg.password) .Release.Name $pg.database -}}
{{- else -}}
{{- fail "secrets.databaseUrl is needed when postgresql.enabled is false" -}}
{{- end -}}
{{- end -}}

{{/* Volumes and mounts every imagegenx container has: models (read-only), LoRAs, spool, webhook secret. */}}
{{- define "imagegenx.volumes" -}}
- name: models
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-models" (include "imagegenx.fullname" .)) .Values.modelVolume.existingClaim }}
    readOnly: true
- name: loras
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-loras" (include "imagegenx.fullname" .)) .Values.loraVolume.existingClaim }}
- name: data
  emptyDir: {}
- name: webhook-secret
  secret:
    secretName: {{ include "imagegenx.secretName" . }}
    items:
      - key: webhook_secret
        path: webhook_secret
{{- end -}}

{{/* loraReadOnly: workers only read LoRAs. */}}
{{- define "imagegenx.volumeMounts" -}}
- name: models
  mountPath: {{ .root.Values.modelVolume.mountPath }}
  readOnly: true
- name: loras
  mountPath: {{ .root.Values.loraVolume.mountPath }}
  readOnly: {{ .loraReadOnly }}
- name: data
  mountPath: /var/lib/imagegenx
# The app reads the webhook signing secret beside the spool folder (api/app.py _webhook_secret).
- name: webhook-secret
  mountPath: /var/lib/imagegenx/webhook_secret
  subPath: webhook_secret
  readOnly: true
{{- end -}}

{{/* Environment every imagegenx container has: the ConfigMap, and the secret keys one by one. */}}
{{- define "imagegenx.envFrom" -}}
- configMapRef:
    name: {{ include "imagegenx.fullname" . }}
{{- end -}}

{{- define "imagegenx.secretEnv" -}}
{{- $secret := include "imagegenx.secretName" . -}}
{{- range list "IMAGEGENX_STORAGE__DATABASE_URL" "IMAGEGENX_STORAGE__S3_ACCESS_KEY_ID" "IMAGEGENX_STORAGE__S3_SECRET_ACCESS_KEY" }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ . }}
{{- end }}
{{- end -}}

{{/* The durable pull consumer of one priority lane in the stream: call with (list . lane). Must match
     src/imagegenx/queue/jetstream.py (tests/test_deploy.py checks it against a real queue). */}}
{{- define "imagegenx.laneConsumer" -}}
{{- printf "P%d" (int (index . 1)) -}}
{{- end -}}
