{{/* The chart's name. */}}
{{- define "tgi-mp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The objects' name: the release name when it contains the chart's name. */}}
{{- define "tgi-mp.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tgi-mp.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tgi-mp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tgi-mp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tgi-mp.labels" -}}
helm.sh/chart: {{ include "tgi-mp.chart" . }}
{{ include "tgi-mp.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tgi-mp.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tgi-mp.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image: gpu.imageTag with GPUs, else image.tag. */}}
{{- define "tgi-mp.image" -}}
{{- $tag := .Values.image.tag }}
{{- if gt (int .Values.gpu.count) 0 }}
{{- $tag = .Values.gpu.imageTag }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository (toString $tag) }}
{{- end }}

{{/* --num-shard: one shard per GPU with GPUs, else server.numShard. */}}
{{- define "tgi-mp.numShard" -}}
{{- if gt (int .Values.gpu.count) 0 }}
{{- int .Values.gpu.count }}
{{- else }}
{{- int .Values.server.numShard }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the preStop sleep, then the server's drain
(server.gracefulTerminationTimeout, the value the container is given), then a
margin for answering what the drain cut and stopping the engine. Computed here
from the same values as the container's flag and hook, so they cannot drift.
*/}}
{{- define "tgi-mp.terminationGracePeriodSeconds" -}}
{{- $drain := float64 .Values.server.gracefulTerminationTimeout }}
{{- if le $drain 0.0 }}
{{- fail "server.gracefulTerminationTimeout must be above 0" }}
{{- end }}
{{- $margin := int .Values.server.terminationGraceMarginSeconds }}
{{- if lt $margin 10 }}
{{- fail "server.terminationGraceMarginSeconds must be at least 10 (the server answers the requests a drain cuts for up to 10 s)" }}
{{- end }}
{{- add (int .Values.server.preStopSleepSeconds) (int (ceil $drain)) $margin }}
{{- end }}

{{/* Whether the chart creates its Secret, and for which keys. */}}
{{- define "tgi-mp.createHfToken" -}}
{{- if and .Values.hfToken.value (not .Values.hfToken.existingSecret) }}true{{ end }}
{{- end }}
{{- define "tgi-mp.createApiKey" -}}
{{- if and .Values.apiKey.value (not .Values.apiKey.existingSecret) }}true{{ end }}
{{- end }}

{{/* The cache volume's claim name (created or existing). */}}
{{- define "tgi-mp.cacheClaimName" -}}
{{- default (printf "%s-cache" (include "tgi-mp.fullname" .)) .Values.cache.persistentVolumeClaim.existingClaim }}
{{- end }}
