{{/* Chart name, overridable. */}}
{{- define "lb-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of every object; the release name alone when it already contains the chart name. */}}
{{- define "lb-agent.fullname" -}}
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

{{- define "lb-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lb-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lb-agent.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "lb-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "lb-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lb-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lb-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The bpffs init container's image: its own if set, else the agent's. */}}
{{- define "lb-agent.mountImage" -}}
{{- $image := .Values.bpffs.mount.image }}
{{- if $image.repository }}
{{- printf "%s:%s" $image.repository ($image.tag | default "latest") }}
{{- else }}
{{- include "lb-agent.image" . }}
{{- end }}
{{- end }}

{{/* `host:port` for a listen address value. */}}
{{- define "lb-agent.hostPort" -}}
{{- printf "%s:%d" .bindAddress (.port | int) }}
{{- end }}

{{/* The agent's command line after the entrypoint: global flags, `run`, run flags (YAML list). */}}
{{- define "lb-agent.args" -}}
{{- $a := .Values.agent }}
{{- $args := list (printf "--pin-dir=%s" $a.pinDir) (printf "--log-format=%s" $a.logFormat) "run" }}
{{- range $a.interfaces }}
{{- $args = append $args (printf "--interface=%s" .) }}
{{- end }}
{{- with $a.nodePortAddresses }}
{{- $args = append $args (printf "--node-port-addresses=%s" (join "," .)) }}
{{- end }}
{{- $args = append $args (printf "--no-backend=%s" $a.noBackend) }}
{{- $args = append $args (printf "--hairpin-snat-address=%s" $a.hairpinSnatAddress) }}
{{- with $a.snatAddress }}
{{- $args = append $args (printf "--snat-address=%s" .) }}
{{- end }}
{{- $args = append $args (printf "--health-addr=%s" (include "lb-agent.hostPort" $a.health)) }}
{{- $args = append $args (printf "--metrics-addr=%s" (include "lb-agent.hostPort" $a.metrics)) }}
{{- /* Numbers arrive as floats: %v keeps a fraction, int64 avoids 1e+06 for big integers. */}}
{{- $args = append $args (printf "--kube-api-qps=%v" $a.kubeApiQps) }}
{{- $args = append $args (printf "--kube-api-burst=%d" ($a.kubeApiBurst | int64)) }}
{{- $args = append $args (printf "--min-sync-period=%s" $a.minSyncPeriod) }}
{{- $args = append $args (printf "--sync-period=%s" $a.syncPeriod) }}
{{- $args = append $args (printf "--conntrack-gc-interval=%s" $a.conntrackGcInterval) }}
{{- $args = append $args (printf "--conntrack-max=%d" ($a.conntrackMax | int64)) }}
{{- $args = append $args (printf "--max-services=%d" ($a.maxServices | int64)) }}
{{- $args = append $args (printf "--max-frontends=%d" ($a.maxFrontends | int64)) }}
{{- $args = append $args (printf "--max-backends=%d" ($a.maxBackends | int64)) }}
{{- $args = append $args (printf "--maglev-table-size=%d" ($a.maglevTableSize | int64)) }}
{{- $args = append $args (printf "--max-maglev-services=%d" ($a.maxMaglevServices | int64)) }}
{{- if $a.socketLB.enabled }}
{{- $args = append $args (printf "--socket-lb-cgroup=%s" (include "lb-agent.cgroupMount" .)) }}
{{- end }}
{{- $args = concat $args $a.extraArgs }}
{{- toYaml $args }}
{{- end }}

{{/* One HTTP probe on the health endpoint; `host` only when it does not listen everywhere. */}}
{{- define "lb-agent.probe" -}}
{{- $health := .root.Values.agent.health -}}
httpGet:
  path: /healthz
  port: {{ $health.port | int }}
  {{- if ne $health.bindAddress "0.0.0.0" }}
  host: {{ $health.bindAddress }}
  {{- end }}
{{- with .probe }}
{{- toYaml . | nindent 0 }}
{{- end }}
{{- end }}

{{/* Where the host's cgroup v2 root is mounted in the agent's container. */}}
{{- define "lb-agent.cgroupMount" -}}
/run/lb-agent/cgroupv2
{{- end }}
