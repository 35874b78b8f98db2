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
{{ include "uincall-enricher.selectorLabels" . }}
{{ include "uincall-enricher.commonLabels" . }}
{{- end }}

{{/* The labels of every resource of the chart besides name and instance (and component). */}}
{{- define "uincall-enricher.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
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
The parts of the release besides the worker, each with its own
app.kubernetes.io/name, <name>-<component>, and app.kubernetes.io/component
<component>: the worker's selectors (name and instance; its Deployment's
cannot change) never match their pods, and theirs never match the worker's
pods or each other's. A dict: root (the chart's context) and component;
the full name fits in max characters (default 63).
*/}}
{{- define "uincall-enricher.component.name" -}}
{{- $suffix := printf "-%s" .component }}
{{- $base := include "uincall-enricher.name" .root | trunc (int (sub 63 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s%s" $base $suffix }}
{{- end }}

{{- define "uincall-enricher.component.fullname" -}}
{{- $suffix := printf "-%s" .component }}
{{- $max := int (default 63 .max) }}
{{- $base := include "uincall-enricher.fullname" .root | trunc (int (sub $max (len $suffix))) | trimSuffix "-" }}
{{- printf "%s%s" $base $suffix }}
{{- end }}

{{- define "uincall-enricher.component.selectorLabels" -}}
app.kubernetes.io/name: {{ include "uincall-enricher.component.name" . }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "uincall-enricher.component.labels" -}}
{{ include "uincall-enricher.component.selectorLabels" . }}
{{ include "uincall-enricher.commonLabels" .root }}
{{- end }}

{{/* The push receiver (ingest): <name>-ingest. */}}
{{- define "uincall-enricher.ingest.name" -}}
{{- include "uincall-enricher.component.name" (dict "root" . "component" "ingest") }}
{{- end }}

{{- define "uincall-enricher.ingest.fullname" -}}
{{- include "uincall-enricher.component.fullname" (dict "root" . "component" "ingest") }}
{{- end }}

{{- define "uincall-enricher.ingest.selectorLabels" -}}
{{- include "uincall-enricher.component.selectorLabels" (dict "root" . "component" "ingest") }}
{{- end }}

{{- define "uincall-enricher.ingest.labels" -}}
{{- include "uincall-enricher.component.labels" (dict "root" . "component" "ingest") }}
{{- end }}

{{/*
The nightly reconcile (reconcile.enabled): a CronJob <fullname>-reconcile,
within 52 characters (the Jobs it creates add 11 to the name).
*/}}
{{- define "uincall-enricher.reconcile.fullname" -}}
{{- include "uincall-enricher.component.fullname" (dict "root" . "component" "reconcile" "max" 52) }}
{{- end }}

{{- define "uincall-enricher.reconcile.labels" -}}
{{- include "uincall-enricher.component.labels" (dict "root" . "component" "reconcile") }}
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

{{/*
Pieces of the pod spec that every pod of the chart shares. podSpec: the
service account, image pull secrets, priority class and the pod's security
context; a dict: root (the chart's context) and securityContext.
*/}}
{{- define "uincall-enricher.podSpec" -}}
serviceAccountName: {{ include "uincall-enricher.serviceAccountName" .root }}
automountServiceAccountToken: false
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with .securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Where the pod may run: topologySpreadConstraints, nodeSelector, affinity and tolerations of a values map (the worker's, ingest's, reconcile's). */}}
{{- define "uincall-enricher.podPlacement" -}}
{{- with (get . "topologySpreadConstraints") }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (get . "nodeSelector") }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (get . "affinity") }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (get . "tolerations") }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The container's image and pull policy. */}}
{{- define "uincall-enricher.image" -}}
image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- end }}

{{/*
A container's env: POD_NAME, the Kafka client id (<clientId>-<pod name>),
the OTEL_* variables of values tracing, the Kafka credentials from Secrets
(kafka.existingSecret, sorted by property), then extraEnv. A dict: root,
clientId and extraEnv.
*/}}
{{- define "uincall-enricher.env" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
# The Kafka client id names the pod (broker logs, quotas).
- name: UINCALL__KAFKA__CLIENT_ID
  value: "{{ .clientId }}-$(POD_NAME)"
{{- with include "uincall-enricher.tracingEnv" .root | trim }}
{{ . }}
{{- end }}
{{- with (include "uincall-enricher.kafkaCredentials" .root | fromJson).env }}
{{ toYaml . }}
{{- end }}
{{- with .extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The mount of the Kafka credentials' files (kafka.existingSecret.files), when any. */}}
{{- define "uincall-enricher.kafkaVolumeMount" -}}
{{- $kafka := include "uincall-enricher.kafkaCredentials" . | fromJson }}
{{- if $kafka.sources }}
- name: kafka-credentials
  mountPath: {{ $kafka.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The volume of the Kafka credentials' files (kafka.existingSecret.files), when any. */}}
{{- define "uincall-enricher.kafkaVolume" -}}
{{- with (include "uincall-enricher.kafkaCredentials" . | fromJson).sources }}
# Kafka CA and client certificates: <secret>/<key> under the mount.
- name: kafka-credentials
  projected:
    sources:
      {{- toYaml . | nindent 6 }}
{{- end }}
{{- end }}

{{/*
The worker's volumes, which the reconcile's pods get too: the settings
file, the access tokens at api.tokens_dir, the Kafka credentials' files,
then extraVolumes; volumeMounts the same, then extraVolumeMounts.
*/}}
{{- define "uincall-enricher.volumeMounts" -}}
- name: config
  mountPath: /etc/uincall-enricher
  readOnly: true
- name: tokens
  mountPath: /var/run/secrets/uincall
  readOnly: true
{{- with include "uincall-enricher.kafkaVolumeMount" . | trim }}
{{ . }}
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "uincall-enricher.volumes" -}}
- name: config
  configMap:
    name: {{ include "uincall-enricher.fullname" . }}
- name: tokens
  secret:
    secretName: {{ include "uincall-enricher.secretName" . }}
{{- with include "uincall-enricher.kafkaVolume" . | trim }}
{{ . }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}
