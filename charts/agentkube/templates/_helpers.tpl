{{- define "agentkube.labels" -}}
app.kubernetes.io/name: agentkube
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "agentkube.operatorName" -}}
{{ .Release.Name }}-operator
{{- end -}}


{{- define "agentkube.nodeAgentName" -}}
{{ .Release.Name }}-node-agent
{{- end -}}

{{- define "agentkube.image" -}}
{{ .image.repository }}:{{ .image.tag | default .appVersion }}
{{- end -}}

{{/* The node agent's CSI driver name: agentkube.contract.CSI_DRIVER (a unit test keeps them equal). */}}
{{- define "agentkube.csiDriver" -}}
csi.agentkube.dev
{{- end }}

{{- define "agentkube.gatewayName" -}}
{{ .Release.Name }}-gateway
{{- end -}}

{{/* The key the operator and the gateway share; each sandbox's runtime token is derived from it. */}}
{{- define "agentkube.runtimeKeyName" -}}
{{ .Release.Name }}-runtime-key
{{- end -}}

{{/* The operator's Deployment of one shard: the unsharded name when there is one shard. */}}
{{- define "agentkube.operatorDeploymentName" -}}
{{- if gt (int .context.Values.operator.shards) 1 -}}
{{ include "agentkube.operatorName" .context }}-shard-{{ .shard }}
{{- else -}}
{{ include "agentkube.operatorName" .context }}
{{- end -}}
{{- end -}}
