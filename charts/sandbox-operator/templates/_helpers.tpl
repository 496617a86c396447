{{/* The chart's name (app.kubernetes.io/name): nameOverride, else the chart's. */}}
{{- define "sandbox-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Every object's name prefix: fullnameOverride, else <release>-<name> (the release's name alone
when it already contains the chart's name). */}}
{{- define "sandbox-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "sandbox-operator.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sandbox-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ include "sandbox-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The operator's pods: the component label is what sandbox NetworkPolicies admit for usage scrapes. */}}
{{- define "sandbox-operator.operatorSelector" -}}
app.kubernetes.io/name: {{ include "sandbox-operator.name" . }}
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
app.kubernetes.io/name: {{ include "sandbox-operator.name" . }}
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


{{/* NetworkPolicy egress rules every pod of the chart needs: the cluster DNS pods (networkPolicy.dns,
as in every sandbox's policy) and the Kubernetes API server (networkPolicy.apiServer). */}}
{{- define "sandbox-operator.baseEgress" -}}
{{- $np := .Values.networkPolicy -}}
{{- $dnsPeer := dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" $np.dns.namespace)) "podSelector" (dict "matchLabels" (include "sandbox-operator.dnsPodLabels" . | fromYaml)) -}}
{{- $dns := dict "to" (list $dnsPeer) "ports" (list (dict "protocol" "UDP" "port" 53) (dict "protocol" "TCP" "port" 53)) -}}
{{- $apiPorts := list -}}
{{- range $np.apiServer.ports }}{{ $apiPorts = append $apiPorts (dict "protocol" "TCP" "port" .) }}{{ end -}}
{{- $api := dict "ports" $apiPorts -}}
{{- with $np.apiServer.cidrs }}
{{- $blocks := list -}}
{{- range . }}{{ $blocks = append $blocks (dict "ipBlock" (dict "cidr" .)) }}{{ end -}}
{{- $_ := set $api "to" $blocks -}}
{{- end -}}
{{- toYaml (list $dns $api) -}}
{{- end -}}

{{/* Labels of the cluster DNS pods: networkPolicy.dns.podLabels, else k8s-app: kube-dns (the
operator's default, api/names.py DEFAULT_DNS_POD_LABELS). */}}
{{- define "sandbox-operator.dnsPodLabels" -}}
{{- toYaml (default (dict "k8s-app" "kube-dns") .Values.networkPolicy.dns.podLabels) -}}
{{- end -}}
