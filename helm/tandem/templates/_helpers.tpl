{{/* Names: <release>-<chart>, truncated to a DNS label. */}}
{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tandem.fullname" -}}
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

{{- define "tandem.operator.fullname" -}}
{{- printf "%s-operator" (include "tandem.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tandem.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tandem
{{- end }}

{{- define "tandem.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "tandem.operator.labels" -}}
{{ include "tandem.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "tandem.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tandem.operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tandem.leaseName" -}}
{{- default (include "tandem.operator.fullname" .) .Values.operator.leaderElection.leaseName }}
{{- end }}

{{/* The image, by digest when one is given. */}}
{{- define "tandem.image" -}}
{{- $repo := required "image.repository is required" .Values.image.repository }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repo .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Fail fast on combinations the schema cannot express. */}}
{{- define "tandem.validate" -}}
{{- $op := .Values.operator }}
{{- if and (gt (int $op.replicas) 1) (not $op.leaderElection.enabled) }}
{{- fail "operator.replicas > 1 needs operator.leaderElection.enabled=true: two operators without a leader would fight over every object" }}
{{- end }}
{{- $le := $op.leaderElection }}
{{- if $le.enabled }}
{{- if not (and (lt (float64 $le.retryPeriod) (float64 $le.renewDeadline)) (lt (float64 $le.renewDeadline) (float64 $le.leaseDuration))) }}
{{- fail "operator.leaderElection needs retryPeriod < renewDeadline < leaseDuration" }}
{{- end }}
{{- end }}
{{- if and (not .Values.rbac.create) .Values.serviceAccount.create }}
{{- fail "rbac.create=false with serviceAccount.create=true leaves the new ServiceAccount without permissions: name an existing, bound ServiceAccount in serviceAccount.name and set serviceAccount.create=false" }}
{{- end }}
{{- end }}
