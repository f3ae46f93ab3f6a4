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
