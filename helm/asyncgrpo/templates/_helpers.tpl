{{- define "asyncgrpo.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "asyncgrpo.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* selector labels of one component: (dict "root" $ "component" "trainer") */}}
{{- define "asyncgrpo.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "asyncgrpo.image" -}}
{{ printf "%s:%s" .repository .tag | quote }}
{{- end -}}

{{- define "asyncgrpo.secretName" -}}
{{- .Values.keys.existingSecret | default (printf "%s-keys" (include "asyncgrpo.fullname" .)) -}}
{{- end -}}

{{/* the trainer's headless service, also the Indexed Job's name: pod i is NAME-i.NAME */}}
{{- define "asyncgrpo.trainerName" -}}
{{- printf "%s-trainer" (include "asyncgrpo.fullname" .) -}}
{{- end -}}

{{- define "asyncgrpo.rank0Host" -}}
{{- printf "%s-0.%s.%s.svc" (include "asyncgrpo.trainerName" .) (include "asyncgrpo.trainerName" .) .Release.Namespace -}}
{{- end -}}

{{- define "asyncgrpo.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "asyncgrpo.fullname" .) -}}
{{- else -}}
{{- required "redis.externalUrl is required when redis.enabled is false" .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* the keys every service reads from its environment (SGLang's api-key contract) */}}
{{- define "asyncgrpo.keyEnv" -}}
- name: ASYNCGRPO_API_KEY
  valueFrom: {secretKeyRef: {name: {{ include "asyncgrpo.secretName" . }}, key: api-key}}
- name: ASYNCGRPO_ADMIN_API_KEY
  valueFrom: {secretKeyRef: {name: {{ include "asyncgrpo.secretName" . }}, key: admin-api-key}}
{{- end -}}

{{/* our services' arguments after the command: the recipe, then where everything is */}}
{{- define "asyncgrpo.configArgs" -}}
- --config
- /etc/asyncgrpo/run.yaml
- --config
- /etc/asyncgrpo/deploy.yaml
{{- end -}}

{{- define "asyncgrpo.configVolume" -}}
- name: config
  configMap: {name: {{ include "asyncgrpo.fullname" . }}-config}
{{- end -}}

{{- define "asyncgrpo.configMount" -}}
- {name: config, mountPath: /etc/asyncgrpo, readOnly: true}
{{- end -}}

{{/* the model's and the data's volumes; with tinyTask.prepare both are the chart's tiny-task PVC */}}
{{- define "asyncgrpo.dataVolumes" -}}
{{- if .Values.tinyTask.prepare -}}
- name: models
  persistentVolumeClaim: {claimName: {{ include "asyncgrpo.fullname" . }}-tiny, readOnly: true}
- name: data
  persistentVolumeClaim: {claimName: {{ include "asyncgrpo.fullname" . }}-tiny, readOnly: true}
{{- else -}}
- name: models
  {{- toYaml .Values.model.volume | nindent 2 }}
- name: data
  {{- toYaml .Values.dataset.volume | nindent 2 }}
{{- end -}}
{{- end -}}

{{- define "asyncgrpo.dataMounts" -}}
- {name: models, mountPath: {{ .Values.model.mountPath }}, readOnly: true}
- {name: data, mountPath: {{ .Values.dataset.mountPath }}, readOnly: true}
{{- end -}}

{{- define "asyncgrpo.checkpointClaim" -}}
{{- .Values.checkpoints.existingClaim | default (printf "%s-checkpoints" (include "asyncgrpo.fullname" .)) -}}
{{- end -}}

{{/* prometheus.io annotations of a pod serving /metrics on `port` */}}
{{- define "asyncgrpo.scrape" -}}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* waits until the tiny task exists (tinyTask.prepare: the prepare Job writes it) */}}
{{- define "asyncgrpo.waitForTask" -}}
{{- if .Values.tinyTask.prepare }}
- name: wait-for-task
  image: {{ include "asyncgrpo.image" .Values.image }}
  command: [sh, -c, 'until [ -f {{ .Values.tinyTask.out }}/report.json ]; do echo waiting for the prepare Job; sleep 5; done']
  volumeMounts:
    {{- include "asyncgrpo.dataMounts" . | nindent 4 }}
  resources:
    requests: {cpu: 10m, memory: 32Mi}
    limits: {memory: 64Mi}
  securityContext:
    {{- include "asyncgrpo.containerSecurity" . | nindent 4 }}
{{- end }}
{{- end -}}

{{- define "asyncgrpo.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "asyncgrpo.containerSecurity" -}}
allowPrivilegeEscalation: false
capabilities: {drop: [ALL]}
{{- end -}}

{{- define "asyncgrpo.httpProbes" -}}
startupProbe:
  httpGet: {path: {{ .path }}, port: {{ .port }}}
  periodSeconds: 5
  failureThreshold: {{ .startupFailures | default 60 }}
readinessProbe:
  httpGet: {path: {{ .path }}, port: {{ .port }}}
  periodSeconds: 10
  timeoutSeconds: 5
livenessProbe:
  httpGet: {path: {{ .path }}, port: {{ .port }}}
  periodSeconds: 20
  timeoutSeconds: 5
  failureThreshold: 6
{{- end -}}

{{/*
"true" when the checkpoints volume can be mounted on several nodes (ReadWriteMany or ReadOnlyMany): generation pods
mount it (weight-sync's disk fallback) only then, since a ReadWriteOnce claim cannot attach to pods on other nodes.
A trainer spanning nodes needs it: refused otherwise, with the fix.
*/}}
{{- define "asyncgrpo.checkpointsShared" -}}
{{- $modes := .Values.checkpoints.accessModes | default list -}}
{{- if or (has "ReadWriteMany" $modes) (has "ReadOnlyMany" $modes) -}}true{{- end -}}
{{- end -}}

{{- define "asyncgrpo.checkRWX" -}}
{{- if and (gt (int .Values.trainer.nodes) 1) (not (has "ReadWriteMany" (.Values.checkpoints.accessModes | default list))) -}}
{{- fail (printf "trainer.nodes=%d puts trainer pods on several nodes, which all write the checkpoints volume: set checkpoints.accessModes to [ReadWriteMany] (a storage class that supports it) or trainer.nodes=1" (int .Values.trainer.nodes)) -}}
{{- end -}}
{{- end -}}

{{/* NCCL / gloo settings of the containers in weight-sync's broadcast group and the trainer's (values: nccl) */}}
{{- define "asyncgrpo.ncclEnv" -}}
{{- with .Values.nccl.socketIfname }}
- {name: NCCL_SOCKET_IFNAME, value: {{ . | quote }}}
{{- end }}
{{- range $k, $v := .Values.nccl.env }}
- {name: {{ $k }}, value: {{ $v | quote }}}
{{- end }}
{{- end -}}

{{/* the pod's ephemeral port range (nccl.portRange), where NCCL and gloo listen: a pod securityContext entry */}}
{{- define "asyncgrpo.portRangeSysctl" -}}
{{- with .Values.nccl.portRange }}
sysctls:
  - {name: net.ipv4.ip_local_port_range, value: {{ . | quote }}}
{{- end }}
{{- end -}}
