{{- define "uincall-enricher.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "uincall-enricher.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "uincall-enricher.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "uincall-enricher.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "uincall-enricher.selectorLabels" -}}
app.kubernetes.io/name: {{ include "uincall-enricher.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "uincall-enricher.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "uincall-enricher.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: uincall-enricher
{{- end }}

{{- define "uincall-enricher.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "uincall-enricher.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "uincall-enricher.secretName" -}}
{{- default (printf "%s-tokens" (include "uincall-enricher.fullname" .)) .Values.existingSecret }}
{{- end }}

{{/* The settings file: values.settings plus what the chart decides. */}}
{{- define "uincall-enricher.settings" -}}
{{- $s := deepCopy .Values.settings }}
{{- $api := default dict $s.api }}
{{- $_ := set $api "tokens_dir" "/var/run/secrets/uincall" }}
{{- $_ := set $s "api" $api }}
{{- $_ := set $s "http" (dict "listen" (printf "0.0.0.0:%d" (int .Values.metricsPort))) }}
{{- toToml $s }}
{{- end }}
