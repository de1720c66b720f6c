{{/* Names follow Helm's conventions: <release>-<chart>, cut to 63 characters. */}}
{{- define "gentrain.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gentrain.fullname" -}}
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

{{/* The RayCluster's name is short: KubeRay derives pod and service names from it. */}}
{{- define "gentrain.rayClusterName" -}}
{{- printf "%s-ray" (include "gentrain.fullname" .) | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "gentrain.mlflowName" -}}
{{- printf "%s-mlflow" (include "gentrain.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gentrain.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "gentrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "gentrain.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "gentrain.rayAuthSecret" -}}
{{- default (printf "%s-ray-token" (include "gentrain.fullname" .)) .Values.ray.auth.existingSecret }}
{{- end }}

{{- define "gentrain.mlflowAuthSecret" -}}
{{- default (printf "%s-auth" (include "gentrain.mlflowName" .)) .Values.mlflow.auth.existingSecret }}
{{- end }}

{{/*
A generated secret value that survives `helm upgrade`: reuse the live Secret's key when
there is one (lookup answers nothing under `helm template`, so a fresh value then).
Call with (dict "root" . "name" SECRET "key" KEY "length" N).
*/}}
{{- define "gentrain.secretValue" -}}
{{- $live := lookup "v1" "Secret" .root.Release.Namespace .name }}
{{- if and $live (hasKey ($live.data | default dict) .key) }}
{{- index $live.data .key }}
{{- else }}
{{- randAlphaNum (int .length) | b64enc }}
{{- end }}
{{- end }}

{{/* Environment every Ray container gets: where MLflow is, and its credentials. */}}
{{- define "gentrain.rayEnv" -}}
# Ray's usage statistics would be sent from inside the cluster: off.
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- if .Values.mlflow.enabled }}
- name: MLFLOW_TRACKING_URI
  value: {{ printf "http://%s.%s.svc:%d" (include "gentrain.mlflowName" .) .Release.Namespace (int .Values.mlflow.port) | quote }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ include "gentrain.mlflowAuthSecret" . }}
      key: admin-username
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "gentrain.mlflowAuthSecret" . }}
      key: admin-password
{{- end }}
{{- with .Values.ray.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The pod-level parts shared by head and worker templates. */}}
{{- define "gentrain.rayPodCommon" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The RayClusterSpec, shared by the RayCluster and the RayJob's own cluster.
Call with (dict "root" . "jobSpec" BOOL): jobSpec mounts the job's spec ConfigMap on the head.
*/}}
{{- define "gentrain.rayClusterSpec" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
rayVersion: {{ $v.ray.version | quote }}
{{- if $v.ray.auth.enabled }}
authOptions:
  mode: token
  secretName: {{ include "gentrain.rayAuthSecret" $root }}
{{- end }}
enableInTreeAutoscaling: {{ $v.ray.autoscaler.enabled }}
{{- if $v.ray.autoscaler.enabled }}
autoscalerOptions:
  idleTimeoutSeconds: {{ int $v.ray.autoscaler.idleTimeoutSeconds }}
  upscalingMode: {{ $v.ray.autoscaler.upscalingMode }}
  resources:
    {{- toYaml $v.ray.autoscaler.resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.containerSecurityContext | nindent 4 }}
{{- end }}
headGroupSpec:
  serviceType: ClusterIP
  rayStartParams:
    {{- toYaml $v.ray.head.rayStartParams | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "gentrain.labels" $root | nindent 8 }}
        app.kubernetes.io/component: ray-head
    spec:
      {{- include "gentrain.rayPodCommon" $root | nindent 6 }}
      containers:
        - name: ray-head
          image: {{ include "gentrain.image" $root }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          ports:
            - {name: gcs-server, containerPort: 6379}
            - {name: dashboard, containerPort: 8265}
            - {name: client, containerPort: 10001}
          env:
            {{- include "gentrain.rayEnv" $root | nindent 12 }}
          {{- with $v.ray.envFrom }}
          envFrom:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          resources:
            {{- toYaml $v.ray.head.resources | nindent 12 }}
          securityContext:
            {{- toYaml $v.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - {name: shm, mountPath: /dev/shm}
            {{- if $v.ray.sharedVolume.existingClaim }}
            - {name: shared, mountPath: {{ $v.ray.sharedVolume.mountPath }}}
            {{- end }}
            {{- if .jobSpec }}
            - {name: job-spec, mountPath: /spec, readOnly: true}
            {{- end }}
      volumes:
        - name: shm
          emptyDir: {medium: Memory, sizeLimit: {{ $v.ray.shmSizeLimit }}}
        {{- if $v.ray.sharedVolume.existingClaim }}
        - name: shared
          persistentVolumeClaim: {claimName: {{ $v.ray.sharedVolume.existingClaim }}}
        {{- end }}
        {{- if .jobSpec }}
        - name: job-spec
          configMap: {name: {{ printf "%s-job-spec" (include "gentrain.fullname" $root) }}}
        {{- end }}
      {{- with $v.ray.head.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.ray.head.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.ray.head.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
workerGroupSpecs:
  {{- range $v.ray.workerGroups }}
  - groupName: {{ .name }}
    replicas: {{ int .minReplicas }}
    minReplicas: {{ int .minReplicas }}
    maxReplicas: {{ int .maxReplicas }}
    rayStartParams:
      {{- toYaml (.rayStartParams | default dict) | nindent 6 }}
    template:
      metadata:
        labels:
          {{- include "gentrain.labels" $root | nindent 10 }}
          app.kubernetes.io/component: ray-worker
      spec:
        {{- include "gentrain.rayPodCommon" $root | nindent 8 }}
        {{- with $v.ray.serviceAccountName }}
        serviceAccountName: {{ . }}
        {{- end }}
        containers:
          - name: ray-worker
            image: {{ include "gentrain.image" $root }}
            imagePullPolicy: {{ $v.image.pullPolicy }}
            env:
              {{- include "gentrain.rayEnv" $root | nindent 14 }}
            {{- with $v.ray.envFrom }}
            envFrom:
              {{- toYaml . | nindent 14 }}
            {{- end }}
            resources:
              {{- toYaml .resources | nindent 14 }}
            securityContext:
              {{- toYaml $v.containerSecurityContext | nindent 14 }}
            volumeMounts:
              - {name: shm, mountPath: /dev/shm}
              {{- if $v.ray.sharedVolume.existingClaim }}
              - {name: shared, mountPath: {{ $v.ray.sharedVolume.mountPath }}}
              {{- end }}
        volumes:
          - name: shm
            emptyDir: {medium: Memory, sizeLimit: {{ $v.ray.shmSizeLimit }}}
          {{- if $v.ray.sharedVolume.existingClaim }}
          - name: shared
            persistentVolumeClaim: {claimName: {{ $v.ray.sharedVolume.existingClaim }}}
          {{- end }}
        {{- with .nodeSelector }}
        nodeSelector:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with .tolerations }}
        tolerations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with .affinity }}
        affinity:
          {{- toYaml . | nindent 10 }}
        {{- end }}
  {{- end }}
{{- end }}

{{- define "gentrain.jobOverrides" -}}
{{- range .Values.job.overrides }} '{{ . }}'{{- end }}
{{- end }}
