{{/* meshsplice.fullname is the name of every object of the release. */}}
{{- define "meshsplice.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "meshsplice.serviceAccountName" -}}
{{- default (include "meshsplice.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "meshsplice.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "meshsplice.labels" -}}
{{ include "meshsplice.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: meshsplice
{{- end -}}
