{{/* The release's full name, at most 63 characters. */}}
{{- define "arl.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "arl.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: arl
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{ include "arl.selectorLabels" . }}
{{- end -}}

{{/* Labels that select the controllers' pods. Each pool's NetworkPolicy lets pods named
     arl-operator or arl-gateway in this namespace reach its managers. */}}
{{- define "arl.selectorLabels" -}}
app.kubernetes.io/name: arl-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels that select the gateway's pods. */}}
{{- define "arl.gatewaySelectorLabels" -}}
app.kubernetes.io/name: arl-gateway
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels on the gateway's objects. */}}
{{- define "arl.gatewayLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: arl
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{ include "arl.gatewaySelectorLabels" . }}
{{- end -}}

{{- define "arl.serviceAccountName" -}}
{{- default (include "arl.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "arl.gatewayServiceAccountName" -}}
{{- printf "%s-gateway" (include "arl.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "arl.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{- define "arl.managerImage" -}}
{{- printf "%s:%s" .Values.manager.image.repository (default .Chart.AppVersion .Values.manager.image.tag) -}}
{{- end -}}
