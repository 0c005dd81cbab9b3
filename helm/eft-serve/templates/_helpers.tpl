{{/* Names and labels shared by the templates. */}}

{{/* 47 characters at most: KubeRay >= 1.4 refuses longer RayService names (its RayCluster
names take 6 more, within 53), and every other object adds a suffix of 14 or fewer,
within the 63 of a Service name. */}}
{{- define "eft-serve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 47 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "eft-serve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selects the head pod (the Ray dashboard's Service). */}}
{{- define "eft-serve.headSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
eft-serve/role: head
{{- end -}}

{{/* Selects the pods that host a gateway: the head and the gateway worker groups' pods. */}}
{{- define "eft-serve.gatewaySelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
eft-serve/gateway: "true"
{{- end -}}

{{/* The application's config: values.serve plus the ports, the pod bind address, TLS/auth
files and the gateway's pinning to the head pod. */}}
{{- define "eft-serve.serveArgs" -}}
{{- $args := deepCopy .Values.serve -}}
{{- $models := dict -}}
{{- range .Values.serve.models -}}
{{- $_ := set $models .name (omit . "name") -}}
{{- end -}}
{{- $_ := set $args "models" $models -}}
{{- $_ := set $args "grpc_port" (int .Values.ports.grpc) -}}
{{- $_ := set $args "http_port" (int .Values.ports.http) -}}
{{- $_ := set $args "metrics_port" (int .Values.ports.metrics) -}}
{{- $_ := set $args "host" "0.0.0.0" -}}
{{- $_ := set $args "gateway_resources" (dict "eft-gateway" 1) -}}
{{- if .Values.serve.gateway_autoscaling -}}
{{- $args = omit $args "gateway_replicas" -}}
{{- end -}}
{{- if .Values.tls.enabled -}}
{{- $_ := set $args "tls" (dict "cert_file" "/etc/eft/tls/tls.crt" "key_file" "/etc/eft/tls/tls.key") -}}
{{- end -}}
{{- if .Values.auth.enabled -}}
{{- $_ := set $args "auth_token_file" (printf "/etc/eft/auth/%s" .Values.auth.secretKey) -}}
{{- end -}}
{{- toYaml $args -}}
{{- end -}}

{{- define "eft-serve.image" -}}
image: {{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- end -}}

{{- define "eft-serve.modelVolumeMount" -}}
{{- if .Values.modelVolume.persistentVolumeClaim }}
- name: models
  mountPath: {{ .Values.modelVolume.mountPath }}
  readOnly: {{ .Values.modelVolume.readOnly }}
{{- end }}
{{- end -}}

{{- define "eft-serve.modelVolume" -}}
{{- if .Values.modelVolume.persistentVolumeClaim }}
- name: models
  persistentVolumeClaim:
    claimName: {{ .Values.modelVolume.persistentVolumeClaim }}
    readOnly: {{ .Values.modelVolume.readOnly }}
{{- end }}
{{- end -}}

{{/* The port KubeRay polls for Ray Serve's health contract (GET /-/healthz, plain HTTP):
the gateway's HTTP port, or with TLS on its scrape port, which answers it in plaintext. */}}
{{- define "eft-serve.healthzPort" -}}
{{- if .Values.tls.enabled }}{{ .Values.ports.metrics }}{{ else }}{{ .Values.ports.http }}{{ end -}}
{{- end -}}

{{/* rayStartParams as the CRD takes them: every value a string (numbers are refused);
whole numbers in full (YAML reads 1000000000 as a float, which would print 1e+09). */}}
{{- define "eft-serve.rayStartParams" -}}
{{- range $key, $value := . }}
{{- if and (kindIs "float64" $value) (eq (float64 (int64 $value)) $value) }}
{{ $key }}: {{ int64 $value | toString | quote }}
{{- else }}
{{ $key }}: {{ $value | toString | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* A gateway's container ports: the public ones, named as KubeRay looks for them. */}}
{{- define "eft-serve.gatewayPorts" -}}
- {name: serve-grpc, containerPort: {{ .Values.ports.grpc }}}
{{- if .Values.tls.enabled }}
- {name: eft-http, containerPort: {{ .Values.ports.http }}}
- {name: serve, containerPort: {{ .Values.ports.metrics }}}  # plaintext /-/healthz: KubeRay's check speaks no TLS
{{- else }}
- {name: serve, containerPort: {{ .Values.ports.http }}}
- {name: eft-metrics, containerPort: {{ .Values.ports.metrics }}}
{{- end }}
{{- end -}}

{{/* A gateway's TLS and token files. */}}
{{- define "eft-serve.gatewayMounts" -}}
{{- if .Values.tls.enabled }}
- {name: tls, mountPath: /etc/eft/tls, readOnly: true}
{{- end }}
{{- if .Values.auth.enabled }}
- {name: auth, mountPath: /etc/eft/auth, readOnly: true}
{{- end }}
{{- end -}}

{{- define "eft-serve.gatewayVolumes" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret: {secretName: {{ .Values.tls.secretName }}}
{{- end }}
{{- if .Values.auth.enabled }}
- name: auth
  secret: {secretName: {{ .Values.auth.secretName }}}
{{- end }}
{{- end -}}

{{/* A gateway pod's drain on deletion: kubelet runs the preStop hook before it sends SIGTERM
(which stops Ray at once), and the grace period covers the hook's wait. */}}
{{- define "eft-serve.gatewayLifecycle" -}}
lifecycle:
  preStop:
    exec:
      command: ["eft", "drain", "--metrics-port", {{ .Values.ports.metrics | toString | quote }}, "--timeout", {{ .Values.serve.drain_timeout_s | toString | quote }}]
{{- end -}}

{{- define "eft-serve.gatewayGracePeriod" -}}
terminationGracePeriodSeconds: {{ add (int .Values.serve.drain_timeout_s) 30 }}
{{- end -}}
