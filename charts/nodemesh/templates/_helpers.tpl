{{/* The chart name, or nameOverride. */}}
{{- define "nodemesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of cluster-scoped names: unique per release, since two releases in different
namespaces share one cluster scope.
*/}}
{{- define "nodemesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := include "nodemesh.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels on every object of the chart. */}}
{{- define "nodemesh.labels" -}}
app.kubernetes.io/name: {{ include "nodemesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* Selector labels of one component's pods: pass (list . "agent"). */}}
{{- define "nodemesh.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "nodemesh.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* The image: repository@digest, else repository:tag (default the chart's appVersion). */}}
{{- define "nodemesh.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The namespace of mesh-wide policies. */}}
{{- define "nodemesh.rootNamespace" -}}
{{- default .Release.Namespace .Values.rootNamespace }}
{{- end }}

{{/* The CA's Service (agents dial `<it>.<namespace>.svc`; the CA's certificate names it). */}}
{{- define "nodemesh.caService" -}}
{{- include "nodemesh.fullname" . }}-ca
{{- end }}
