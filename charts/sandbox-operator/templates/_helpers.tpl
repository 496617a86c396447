{{- define "sandbox-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sandbox-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The operator's pods: the component label is what sandbox NetworkPolicies admit for usage scrapes. */}}
{{- define "sandbox-operator.operatorSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "sandbox-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sandbox-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The gateway's objects: <fullname>-gateway. */}}
{{- define "sandbox-operator.gatewayFullname" -}}
{{- printf "%s-gateway" (include "sandbox-operator.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The gateway's pods: sandbox NetworkPolicies admit ingress only from this component label. */}}
{{- define "sandbox-operator.gatewaySelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "sandbox-operator.gatewayServiceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create -}}
{{- default (include "sandbox-operator.gatewayFullname" .) .Values.gateway.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.gateway.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the token key: the user's, else the one the chart generates. */}}
{{- define "sandbox-operator.gatewayTokenSecret" -}}
{{- default (printf "%s-token-key" (include "sandbox-operator.gatewayFullname" .)) .Values.gateway.tokenKey.existingSecret -}}
{{- end -}}

{{/* The gateway's image: gateway.image, field by field falling back to operator.image. */}}
{{- define "sandbox-operator.gatewayImage" -}}
{{- $gw := .Values.gateway.image -}}
{{- $op := .Values.operator.image -}}
{{- printf "%s:%s" (default $op.repository $gw.repository) (default (default .Chart.AppVersion $op.tag) $gw.tag) -}}
{{- end -}}
