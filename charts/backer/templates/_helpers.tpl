{{/* The image of a component: (include "backer.image" (list . .Values.server)) */}}
{{- define "backer.image" -}}
{{- $root := index . 0 -}}{{- $c := index . 1 -}}
{{ $root.Values.image.registry }}{{ $c.image.repository }}:{{ $root.Values.image.tag | default $root.Chart.AppVersion }}
{{- end }}

{{- define "backer.labels" -}}
app.kubernetes.io/part-of: backer
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{- define "backer.serverHost" -}}
backer-server.{{ .Release.Namespace }}.svc
{{- end }}

{{/* Non-root, read-only, no capabilities: the operator and the server. */}}
{{- define "backer.restricted" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities: {drop: [ALL]}
seccompProfile: {type: RuntimeDefault}
{{- end }}

{{- define "backer.repositoryUrl" -}}
{{- if eq .Values.repository.type "s3" -}}
{{- $s3 := .Values.repository.s3 -}}
s3://{{ $s3.bucket }}/{{ $s3.prefix }}?region={{ $s3.region }}{{ if $s3.endpoint }}&endpoint={{ $s3.endpoint }}{{ end }}{{ if $s3.pathStyle }}&path_style=true{{ end }}
{{- else -}}
/var/lib/backer/repository
{{- end -}}
{{- end }}

{{/* "true" when a path of the list covers the path: (include "backer.covered" (list "/var/lib/kubelet/pods" .Values.agent.hostPaths)) */}}
{{- define "backer.covered" -}}
{{- $path := index . 0 -}}
{{- $covered := false -}}
{{- range (index . 1) -}}
{{- $p := trimSuffix "/" . -}}
{{- if or (eq $p "") (eq $p $path) (hasPrefix (printf "%s/" $p) $path) -}}
{{- $covered = true -}}
{{- end -}}
{{- end -}}
{{- if $covered }}true{{ end -}}
{{- end }}

{{- define "backer.exposed" -}}
{{- if ne .Values.server.service.type "ClusterIP" }}true{{ end -}}
{{- end }}

{{/* The port external hosts dial. */}}
{{- define "backer.externalPort" -}}
{{- if .Values.server.externalPort -}}
{{ .Values.server.externalPort }}
{{- else if eq .Values.server.service.type "NodePort" -}}
{{ required "server.service.nodePort: set the node port (30000-32767) of the exposed data port; external hosts' enrolment bundles name it" .Values.server.service.nodePort }}
{{- else -}}
7071
{{- end -}}
{{- end }}

{{/* The name external hosts (and, unexposed, the in-cluster agents) reach the server at. */}}
{{- define "backer.externalName" -}}
{{- if include "backer.exposed" . -}}
{{ required "server.externalName: set the DNS name or IP address external hosts reach the server at (needed with server.service.type NodePort or LoadBalancer)" .Values.server.externalName }}
{{- else -}}
{{ .Values.server.externalName | default (include "backer.serverHost" .) }}
{{- end -}}
{{- end }}

{{/* Nodes that get a BackerClient: operator.clientNodeSelector, and not the control plane unless agent.controlPlane. */}}
{{- define "backer.clientNodeSelector" -}}
{{- $terms := list -}}
{{- with .Values.operator.clientNodeSelector }}{{ $terms = append $terms . }}{{ end -}}
{{- if not .Values.agent.controlPlane }}{{ $terms = append $terms "!node-role.kubernetes.io/control-plane" }}{{ end -}}
{{ join "," $terms }}
{{- end }}

{{- define "backer.serverToml" -}}
[server]
MgmtPort = 7070
DataPort = 7071
RestApiPort = 7080
ExternalName = "{{ include "backer.externalName" . }}"
{{- if include "backer.exposed" . }}
ExternalPort = {{ include "backer.externalPort" . }}
{{- end }}
DataTransferInterface = "0.0.0.0"

[repository]
Localization = "{{ include "backer.repositoryUrl" . }}"

[clients]
ConfigFile = "clients/"
{{- end }}
