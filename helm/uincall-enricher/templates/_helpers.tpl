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
{{- if .Values.ingest.enabled }}
{{- $ingest := default dict $s.ingest }}
{{- $_ := set $ingest "listen" (printf "0.0.0.0:%d" (int .Values.ingest.port)) }}
{{- $_ := set $s "ingest" $ingest }}
{{- end }}
{{- toToml $s }}
{{- end }}

{{/*
The OTEL_* variables of values tracing, as a YAML list (empty unless
tracing.otlpEndpoint is set); they follow POD_NAME in a container's env.
*/}}
{{- define "uincall-enricher.tracingEnv" -}}
{{- with .Values.tracing }}
{{- if .otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .otlpEndpoint | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.pod.name=$(POD_NAME),k8s.namespace.name={{ $.Release.Namespace }}"
{{- with .serviceName }}
- name: OTEL_SERVICE_NAME
  value: {{ . | quote }}
{{- end }}
{{- with .sampler }}
- name: OTEL_TRACES_SAMPLER
  value: {{ . | quote }}
{{- end }}
{{- with .samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The push receiver (ingest). Its pods have their own app.kubernetes.io/name,
<name>-ingest: the worker's selectors (name and instance; its Deployment's
cannot change) never match them, and the receiver's never match the
worker's pods.
*/}}
{{- define "uincall-enricher.ingest.name" -}}
{{- printf "%s-ingest" (include "uincall-enricher.name" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "uincall-enricher.ingest.fullname" -}}
{{- printf "%s-ingest" (include "uincall-enricher.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "uincall-enricher.ingest.selectorLabels" -}}
app.kubernetes.io/name: {{ include "uincall-enricher.ingest.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: ingest
{{- end }}

{{- define "uincall-enricher.ingest.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "uincall-enricher.ingest.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: uincall-enricher
{{- end }}

{{/* The receiver's replicas: at least this many run (the HPA's minimum when it scales them). */}}
{{- define "uincall-enricher.ingest.minReplicas" -}}
{{- if .Values.ingest.autoscaling.enabled }}
{{- .Values.ingest.autoscaling.minReplicas }}
{{- else }}
{{- .Values.ingest.replicaCount }}
{{- end }}
{{- end }}

{{/*
Kafka credentials from Secrets (values kafka.existingSecret), as JSON:
"env", one variable per librdkafka property sorted by property (a
secretKeyRef, or the path of a mounted file), and "sources", the projected
volume's sources (one Secret each, its items at <secret>/<key>). Both empty
when nothing is mapped.
*/}}
{{- define "uincall-enricher.kafkaCredentials" -}}
{{- $c := default dict (dig "existingSecret" dict (default dict .Values.kafka)) }}
{{- $name := default "" $c.name }}
{{- $props := default dict $c.properties }}
{{- $files := default dict $c.files }}
{{- $settings := default dict (dig "kafka" "properties" dict .Values.settings) }}
{{- $root := "/etc/uincall-enricher/kafka" }}
{{- $byProperty := dict }}
{{- $bySecret := dict }}
{{- range $prop, $key := $props }}
{{- if not $name }}
{{- fail (printf "kafka.existingSecret.properties maps %s to key %q, but kafka.existingSecret.name is empty: name the Secret" $prop $key) }}
{{- end }}
{{- $_ := set $byProperty $prop (dict "valueFrom" (dict "secretKeyRef" (dict "name" $name "key" $key))) }}
{{- end }}
{{- range $prop, $f := $files }}
{{- $secret := $name }}
{{- $key := $f }}
{{- if kindIs "map" $f }}
{{- $secret = $f.secret }}
{{- $key = $f.key }}
{{- else if not $name }}
{{- fail (printf "kafka.existingSecret.files maps %s to key %q, but kafka.existingSecret.name is empty: name the Secret, or use {secret: <name>, key: %s}" $prop $f $f) }}
{{- end }}
{{- if hasKey $props $prop }}
{{- fail (printf "kafka.existingSecret: %s is in both properties and files" $prop) }}
{{- end }}
{{- $_ := set $byProperty $prop (dict "value" (printf "%s/%s/%s" $root $secret $key)) }}
{{- $keys := default list (get $bySecret $secret) }}
{{- if not (has $key $keys) }}
{{- $_ := set $bySecret $secret (append $keys $key) }}
{{- end }}
{{- end }}
{{- $env := list }}
{{- range $prop, $entry := $byProperty }}
{{- if hasKey $settings $prop }}
{{- fail (printf "%s is set both in settings.kafka.properties and in kafka.existingSecret: keep it in one place" $prop) }}
{{- end }}
{{- $var := printf "UINCALL__KAFKA__PROPERTIES__%s" ($prop | upper | replace "." "_") }}
{{- $env = append $env (merge (dict "name" $var) $entry) }}
{{- end }}
{{- $sources := list }}
{{- range $secret, $keys := $bySecret }}
{{- $items := list }}
{{- range $key := sortAlpha $keys }}
{{- $items = append $items (dict "key" $key "path" (printf "%s/%s" $secret $key)) }}
{{- end }}
{{- $sources = append $sources (dict "secret" (dict "name" $secret "items" $items)) }}
{{- end }}
{{- toJson (dict "env" $env "sources" $sources "mountPath" $root) }}
{{- end }}
