{{/*
Names, labels and the few values several templates derive.
*/}}

{{- define "shardq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* release-chart, or the release alone when it already contains the chart name */}}
{{- define "shardq.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "shardq.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "shardq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shardq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "shardq.labels" -}}
helm.sh/chart: {{ include "shardq.chart" . }}
{{ include "shardq.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "shardq.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "shardq.operatorName" -}}
{{- printf "%s-operator" (include "shardq.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "shardq.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "shardq.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The ShardqCluster; the operator names its objects after it (<name>-node, <name>-gateway;
   at most 47 characters so that StatefulSet pod and revision names fit in 63) */}}
{{- define "shardq.clusterName" -}}
{{- default (include "shardq.fullname" .) .Values.cluster.name | trunc 47 | trimSuffix "-" -}}
{{- end -}}

{{- define "shardq.gatewayService" -}}
{{- printf "%s-gateway" (include "shardq.clusterName" .) -}}
{{- end -}}

{{/* Labels the operator puts on the node and gateway objects (operator/reconcile.py labels) */}}
{{- define "shardq.clusterSelector" -}}
app.kubernetes.io/name: shardq
app.kubernetes.io/instance: {{ include "shardq.clusterName" . }}
app.kubernetes.io/managed-by: shardq-operator
{{- end -}}

{{- define "shardq.authSecretName" -}}
{{- default (printf "%s-auth" (include "shardq.fullname" .)) .Values.cluster.auth.existingSecret -}}
{{- end -}}
