{{/* The name of every object of a release: the release's name. */}}
{{- define "buildshuttle.fullname" -}}
{{ .Release.Name }}
{{- end }}

{{- define "buildshuttle.selectorLabels" -}}
app.kubernetes.io/name: buildshuttle
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "buildshuttle.labels" -}}
{{ include "buildshuttle.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{/* The Secret whose keys become env vars of the service and of every worker pod. */}}
{{- define "buildshuttle.secretName" -}}
{{- if .Values.existingSecret -}}
{{ .Values.existingSecret }}
{{- else -}}
{{ include "buildshuttle.fullname" . }}-env
{{- end -}}
{{- end }}

{{/* The worker pods' ServiceAccount: `<release>-worker` (made by the chart), or the one
named, or none (the namespace's default). */}}
{{- define "buildshuttle.workerServiceAccount" -}}
{{- if .Values.worker.serviceAccount.create -}}
{{ include "buildshuttle.fullname" . }}-worker
{{- else -}}
{{ .Values.worker.serviceAccount.name }}
{{- end -}}
{{- end }}

{{- define "buildshuttle.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end }}
