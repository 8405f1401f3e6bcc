{{/* Name of the DaemonSet, its ServiceAccount and the prefix of every other resource. */}}
{{- define "eztunnel.name" -}}
{{- .Values.resourceName | default "eztunnel" | trunc 40 | trimSuffix "-" -}}
{{- end }}

{{/* Labels on every top-level resource. */}}
{{- define "eztunnel.labels" -}}
app.kubernetes.io/name: eztunnel
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: eztunnel
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
istio.io/rev: {{ .Values.revision | default "default" | quote }}
{{- with .Values.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
metadata of a top-level resource. Arguments: list of the root context, the resource name, its
`app` label and a dict of annotations (merged over .Values.annotations).
*/}}
{{- define "eztunnel.metadata" -}}
{{- $ctx := index . 0 }}
{{- $labels := include "eztunnel.labels" $ctx | fromYaml }}
{{- $_ := set $labels "app" (index . 2) }}
{{- $annotations := mustMergeOverwrite (deepCopy ($ctx.Values.annotations | default dict)) (index . 3) -}}
name: {{ index . 1 }}
namespace: {{ $ctx.Release.Namespace }}
labels:
  {{- toYaml $labels | nindent 2 }}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The agent pods' selector (immutable once installed: keep it small). */}}
{{- define "eztunnel.selectorLabels" -}}
app: {{ include "eztunnel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels that keep a pod out of the mesh it serves (sidecar injection and ambient capture). */}}
{{- define "eztunnel.meshExclusionLabels" -}}
sidecar.istio.io/inject: "false"
istio.io/dataplane-mode: none
{{- end }}

{{- define "eztunnel.image" -}}
{{- if contains "/" .Values.image -}}
{{ .Values.image }}
{{- else -}}
{{ .Values.hub }}/{{ .Values.image | default "eztunnel-plugin" }}:{{ .Values.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{/* Image reference plus pull policy, for a container. */}}
{{- define "eztunnel.containerImage" -}}
image: {{ include "eztunnel.image" . | quote }}
{{- with .Values.imagePullPolicy }}
imagePullPolicy: {{ . }}
{{- end }}
{{- end }}

{{/* imagePullSecrets list entries (empty when none). */}}
{{- define "eztunnel.imagePullSecrets" -}}
{{- range .Values.imagePullSecrets }}
- name: {{ . }}
{{- end }}
{{- end }}

{{/* Control plane address, like ztunnel: istiod[-<revision>].<istioNamespace>.svc:15012. */}}
{{- define "eztunnel.xdsAddress" -}}
{{- if .Values.xdsAddress -}}
{{ .Values.xdsAddress }}
{{- else -}}
istiod{{ with .Values.revision }}-{{ . }}{{ end }}.{{ .Values.istioNamespace }}.svc:15012
{{- end -}}
{{- end }}

{{/*
Pin directory inside the container. Not below /sys: the runtimes' default AppArmor profiles deny
writes under /sys/fs/ (except cgroup), and pinning is a write.
*/}}
{{- define "eztunnel.pinDir" -}}
/host/sys/fs/bpf/{{ .Values.bpffs.pinDir }}
{{- end }}

{{/* The admin socket's directory, mounted from the node at the same path. */}}
{{- define "eztunnel.adminSocketDir" -}}
{{ dir .Values.adminSocket }}
{{- end }}

{{/* Where the host's cgroup v2 mount appears inside the agent container. */}}
{{- define "eztunnel.cgroupMount" -}}
/host/sys/fs/cgroup
{{- end }}

{{/*
Capabilities of the agent and the per-node uninstall container, measured on kernel 6.18 by running
every BPF step of the agent (load, link create, pin, query, detach, unpin) under a reduced bounding
set: BPF + NET_ADMIN + PERFMON is enough on every kernel the data plane supports (6.10+, for its
sk_msg BPF link; CAP_BPF exists since 5.8, and since 5.11 BPF memory is charged to the memory
cgroup, so no SYS_RESOURCE for RLIMIT_MEMLOCK).
*/}}
{{- define "eztunnel.capabilities" -}}
capabilities:
  drop:
    - ALL
  add:
    # BPF: bpf(2) map creation, BTF and program loading (kernel >= 5.8 split this out of SYS_ADMIN).
    - BPF
    # NET_ADMIN: the SOCKHASH map and sock_ops/sk_msg/sk_skb programs are "net admin" BPF types:
    # loading them, attaching them (cgroup sock_ops link, sk_msg/sk_skb on the SOCKHASH) and
    # BPF_PROG_QUERY on the cgroup need it.
    - NET_ADMIN
    # PERFMON: the sk_msg program bounds what it queues on a peer socket by reading the peer's
    # queue length with CO-RE probe reads (bpf_probe_read_kernel) and keeps the peer's socket
    # address in its map; the verifier allows both only with PERFMON.
    - PERFMON
    # Not added: SYS_ADMIN (only BPF_*_GET_FD_BY_ID / GET_NEXT_ID need it; the agent keeps its own
    # fds and pins instead; leaving it out also allows allowPrivilegeEscalation: false),
    # SYS_RESOURCE (no memlock rlimit on 5.11+), NET_RAW, SYS_PTRACE (no raw sockets, no netns entry).
    {{- range .Values.extraCapabilities }}
    - {{ . }}
    {{- end }}
{{- end }}

{{/* Container securityContext shared by the agent and the per-node uninstall container. */}}
{{- define "eztunnel.securityContext" -}}
securityContext:
{{- if .Values.privileged }}
  # privileged=true: needed only to mount bpffs on hosts that lack it (Bidirectional propagation).
  privileged: true
{{- else }}
  privileged: false
  {{- include "eztunnel.capabilities" . | nindent 2 }}
{{- end }}
  # false unless Kubernetes refuses it: with privileged or CAP_SYS_ADMIN it must not be false.
  allowPrivilegeEscalation: {{ or .Values.privileged (has "SYS_ADMIN" .Values.extraCapabilities) (has "CAP_SYS_ADMIN" .Values.extraCapabilities) }}
  readOnlyRootFilesystem: true
  # Root: bpffs is mode 0700 root:root and the pins are created as root. Kubernetes has no
  # ambient capabilities, so a non-root user could not use the capabilities above.
  runAsUser: 0
  runAsGroup: 0
  runAsNonRoot: false
{{- with .Values.seLinuxOptions }}
  seLinuxOptions:
    {{- toYaml . | nindent 4 }}
{{- end }}
  seccompProfile:
    type: {{ .Values.seccompProfile.type }}
    {{- if eq .Values.seccompProfile.type "Localhost" }}
    localhostProfile: {{ .Values.seccompProfile.localhostProfile | quote }}
    {{- end }}
{{- if and .Values.appArmorProfile (semverCompare ">=1.30-0" .Capabilities.KubeVersion.GitVersion) }}
  appArmorProfile:
    type: {{ .Values.appArmorProfile }}
{{- end }}
{{- end }}

{{/*
Before Kubernetes 1.30 the AppArmor profile is a per-container pod annotation. Arguments: list of
the root context, the pod's annotations dict (updated in place) and the container names.
*/}}
{{- define "eztunnel.addAppArmorAnnotations" -}}
{{- $ctx := index . 0 }}
{{- $annotations := index . 1 }}
{{- if and $ctx.Values.appArmorProfile (not (semverCompare ">=1.30-0" $ctx.Capabilities.KubeVersion.GitVersion)) }}
{{- range (index . 2) }}
{{- $_ := set $annotations (printf "container.apparmor.security.beta.kubernetes.io/%s" .) (eq $ctx.Values.appArmorProfile "Unconfined" | ternary "unconfined" "runtime/default") }}
{{- end }}
{{- end }}
{{- end }}

{{/* Scheduling shared by the agent and the per-node uninstall pods: the same nodes. */}}
{{- define "eztunnel.scheduling" -}}
nodeSelector:
  kubernetes.io/os: linux
  {{- with .Values.nodeSelector }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/*
bpffs volume and mount. Unprivileged: only the pin directory (kubelet creates it on the node's
bpffs; on a node without bpffs the mkdir fails and the pod reports it). Privileged: the whole
bpffs root with Bidirectional propagation (Kubernetes allows it nowhere else), so the init
container can mount bpffs on the node first.
*/}}
{{- define "eztunnel.bpffsVolume" -}}
- name: bpffs
  hostPath:
{{- if .Values.privileged }}
    path: {{ .Values.bpffs.hostPath }}
    type: Directory
{{- else }}
    path: {{ printf "%s/%s" (trimSuffix "/" .Values.bpffs.hostPath) .Values.bpffs.pinDir }}
    type: DirectoryOrCreate
{{- end }}
{{- end }}

{{- define "eztunnel.bpffsMount" -}}
- name: bpffs
{{- if .Values.privileged }}
  mountPath: /host/sys/fs/bpf
  mountPropagation: Bidirectional
{{- else }}
  mountPath: {{ include "eztunnel.pinDir" . }}
{{- end }}
{{- end }}

{{/* Pod-level securityContext of every pod of the chart: containers without their own profile. */}}
{{- define "eztunnel.podSecurityContext" -}}
securityContext:
  seccompProfile:
    type: RuntimeDefault
{{- end }}

{{/* privileged=true only: mount bpffs on the host when it is missing. */}}
{{- define "eztunnel.mountBpffsContainer" -}}
{{- if .Values.privileged }}
- name: mount-bpffs
  {{- include "eztunnel.containerImage" . | nindent 2 }}
  command:
    - sh
    - -c
    - '[ "$(stat -f -c %T /host/sys/fs/bpf)" = bpf_fs ] || mount -t bpf bpf /host/sys/fs/bpf'
  securityContext:
    privileged: true
    readOnlyRootFilesystem: true
    runAsUser: 0
    # Ignored by the runtimes for privileged containers; stated so no container lacks one.
    seccompProfile:
      type: RuntimeDefault
  volumeMounts:
    {{- include "eztunnel.bpffsMount" . | nindent 4 }}
{{- end }}
{{- end }}

{{/* Helm post-delete hook annotations (a dict); the argument is the weight. */}}
{{- define "eztunnel.hookAnnotations" -}}
{{- dict "helm.sh/hook" "post-delete" "helm.sh/hook-weight" (toString .) "helm.sh/hook-delete-policy" "before-hook-creation,hook-succeeded" | toYaml }}
{{- end }}

{{/* For containers that need no privilege at all (uninstall waiters, the teardown's sleeper). */}}
{{- define "eztunnel.restrictedSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65534
runAsGroup: 65534
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
A post-delete hook Job running files/uninstall_wait.py.
Arguments: dict ctx, name, weight, timeout (seconds), args (list).
*/}}
{{- define "eztunnel.waitJob" -}}
{{- $ := .ctx }}
{{- $sa := printf "%s-uninstall" (include "eztunnel.name" $) -}}
apiVersion: batch/v1
kind: Job
metadata:
  {{- include "eztunnel.metadata" (list $ .name $sa (include "eztunnel.hookAnnotations" .weight | fromYaml)) | nindent 2 }}
spec:
  backoffLimit: 2
  # A little longer than the waiter's own timeout, which fails it with a clear message first.
  activeDeadlineSeconds: {{ add .timeout 60 }}
  template:
    metadata:
      labels:
        app: {{ $sa }}
        app.kubernetes.io/instance: {{ $.Release.Name }}
        app.kubernetes.io/name: eztunnel
        app.kubernetes.io/component: uninstall
        {{- include "eztunnel.meshExclusionLabels" $ | nindent 8 }}
      annotations:
        sidecar.istio.io/inject: "false"
    spec:
      serviceAccountName: {{ $sa }}
      # The waiter reads the Kubernetes API with this token (see the hook Role).
      automountServiceAccountToken: true
      restartPolicy: Never
      {{- include "eztunnel.podSecurityContext" $ | nindent 6 }}
      nodeSelector:
        kubernetes.io/os: linux
      {{- with (include "eztunnel.imagePullSecrets" $) }}
      imagePullSecrets:
        {{- . | nindent 8 }}
      {{- end }}
      containers:
        - name: wait
          {{- include "eztunnel.containerImage" $ | nindent 10 }}
          command:
            - python3
            - /etc/eztunnel-uninstall/uninstall_wait.py
            {{- range .args }}
            - {{ . | quote }}
            {{- end }}
            - --namespace={{ $.Release.Namespace }}
            - --timeout={{ .timeout }}
          env:
            - name: PYTHONDONTWRITEBYTECODE
              value: "1"
          securityContext:
            {{- include "eztunnel.restrictedSecurityContext" $ | nindent 12 }}
          resources:
            requests:
              cpu: 10m
              memory: 32Mi
            limits:
              memory: 128Mi
          volumeMounts:
            - name: script
              mountPath: /etc/eztunnel-uninstall
              readOnly: true
      volumes:
        - name: script
          configMap:
            name: {{ $sa }}
{{- end }}

{{- define "eztunnel.criticalPodsQuotaSpec" -}}
hard:
  pods: {{ .Values.resourceQuotas.pods | quote }}
scopeSelector:
  matchExpressions:
    - operator: In
      scopeName: PriorityClass
      values:
        - system-node-critical
{{- end }}
