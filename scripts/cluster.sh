#!/usr/bin/env bash
# A real single-node Kubernetes cluster on this machine, without Docker or kind:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and
# kube-proxy (built from source by scripts/build-controlplane.sh), containerd +
# runc + the bridge CNI plugin from Debian, as background processes.
#
#   scripts/cluster.sh up           start (cleaning what a killed run left first);
#                                   prints `export KUBECONFIG=...` on stdout;
#                                   a healthy running cluster is kept as it is
#   scripts/cluster.sh up --fresh   a new cluster even when one is running
#   scripts/cluster.sh down         stop everything and remove every trace
#   scripts/cluster.sh down --purge ... and delete the state folder too
#   scripts/cluster.sh status       what runs, the node, the images
#   scripts/cluster.sh load F.tar   import an OCI image archive into the node
#   scripts/cluster.sh leftovers    list what a cluster leaves on the machine
#                                   (processes, mounts, links, chains, cgroups,
#                                   paths); empty after `down`
#
# State, logs, PKI, kubeconfig: .tandem/cluster/ (TANDEM_CLUSTER_DIR). Images:
# every .tandem/images/*.tar (TANDEM_IMAGES_DIR) is imported on `up` unless
# containerd already has the same digest under that name. Network: pods in
# 198.18.0.0/16 on the bridge tandem0 (gateway and node IP 198.18.0.1),
# Services in 198.19.0.0/16, routed from the host to the bridge; pods have no
# default route and a FORWARD rule drops anything crossing the bridge's edge.
# One cluster per machine (a flock on /run/lock/tandem-cluster.lock).
# Needs root. Progress goes to stderr.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${TANDEM_CLUSTER_DIR:-$repo_root/.tandem/cluster}"
IMAGES_DIR="${TANDEM_IMAGES_DIR:-$repo_root/.tandem/images}"
LOCK_FILE=/run/lock/tandem-cluster.lock
OWNER_FILE=/run/lock/tandem-cluster.owner # the state folder of the cluster up now

NODE_NAME=tandem-node
BRIDGE=tandem0
GATEWAY=198.18.0.1
POD_CIDR=198.18.0.0/16
SERVICE_CIDR=198.19.0.0/16
API_PORT=6443
ETCD_PORT=32379
ETCD_PEER_PORT=32380
PAUSE_REF=tandem.local/pause:latest
ECHO_REF=tandem.local/echo:latest
# Paths containerd and kubelet use whatever their configuration says.
SYSTEM_PATHS=(/run/containerd /run/containerd/s /var/lib/cni /var/lib/cni/results
    /var/lib/kubelet /var/lib/kubelet/device-plugins /var/log/containers)
CGROUP_NAMES=(kubepods k8s.io)
# In start order; stopped in reverse.
COMPONENTS=(etcd containerd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

RUN="$STATE/run"
LOGS="$STATE/logs"
PKI="$STATE/pki"
SOCK="$STATE/containerd/containerd.sock"
KUBECONFIG_ADMIN="$STATE/kubeconfig"

t0="$EPOCHREALTIME"
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
log() { printf 'cluster [%5ss] %s\n' "$(since "$t0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [[ $EUID -eq 0 ]] || die "run as root (it creates a bridge, mounts, cgroups)"; }

take_lock() {
    mkdir -p "$(dirname "$LOCK_FILE")"
    exec 9>"$LOCK_FILE"
    if ! flock -n 9; then
        log "waiting for another scripts/cluster.sh (lock $LOCK_FILE)"
        flock -w "${TANDEM_CLUSTER_LOCK_TIMEOUT:-900}" 9 || die "lock $LOCK_FILE still held"
    fi
}

kctl() { kubectl --kubeconfig "$KUBECONFIG_ADMIN" --cache-dir "$STATE/kube-cache" --request-timeout=10s "$@"; }
ctrc() { ctr --address "$SOCK" --namespace k8s.io "$@"; }

# -- processes ---------------------------------------------------------------

alive() { # PID: running and not a zombie
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ "${stat%% *}" != Z ]]
}

ours() { # PID: alive, and its command line names this state folder
    alive "$1" && tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" | grep -qF -- "$STATE/"
}

pid_of() { # NAME: the pid from its pid file when that process is ours
    local pid
    pid="$(cat "$RUN/$1.pid" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && ours "$pid" && echo "$pid"
}

spawn() { # NAME CMD...: start in its own session, log, pid file; fd 9 (the lock) not inherited
    local name="$1"
    shift
    setsid "$@" </dev/null >>"$LOGS/$name.log" 2>&1 9>&- &
    echo $! >"$RUN/$name.pid"
}

stop_pids() { # TIMEOUT PID...: SIGTERM, wait, SIGKILL
    local timeout="$1" pid deadline left
    shift
    (($# > 0)) || return 0
    kill -TERM "$@" 2>/dev/null || true
    deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)); do
        left=0
        for pid in "$@"; do alive "$pid" && left=1; done
        ((left)) || return 0
        sleep 0.1
    done
    for pid in "$@"; do
        if alive "$pid"; then
            log "pid $pid ignored SIGTERM for ${timeout}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    sleep 0.2
}

stop_component() { # NAME [TIMEOUT]
    local pid
    if pid="$(pid_of "$1")"; then
        stop_pids "${2:-15}" "$pid"
    fi
    rm -f "$RUN/$1.pid"
}

shim_pids() { # containerd shims started for our containerd (they outlive it)
    local dir cmd
    for dir in /proc/[0-9]*; do
        cmd="$(tr '\0' ' ' 2>/dev/null <"$dir/cmdline")" || continue
        [[ "$cmd" == *containerd-shim* && "$cmd" == *"-address $SOCK "* ]] && echo "${dir#/proc/}"
    done
    return 0
}

cgroup_hierarchies() { awk '$3 == "cgroup" || $3 == "cgroup2" { print $2 }' /proc/self/mounts; }

our_cgroups() { # existing kubepods / k8s.io cgroup folders, deepest first
    local h n
    for h in $(cgroup_hierarchies); do
        for n in "${CGROUP_NAMES[@]}"; do
            [[ -d "$h/$n" ]] && find "$h/$n" -depth -type d
        done
    done
    return 0
}

cgroup_pids() { # processes in those cgroups (each once)
    local d
    while read -r d; do
        [[ -n "$d" ]] && cat "$d/cgroup.procs" 2>/dev/null
    done < <(our_cgroups) | sort -un
}

# -- mounts, paths -------------------------------------------------------------

our_mounts() { # mount points under the state folder or the system paths, deepest first
    local p prefixes=("$STATE/" /run/containerd/ /var/lib/kubelet/ /var/lib/cni/)
    awk '{ print $5 }' /proc/self/mountinfo | while read -r p; do
        p="$(printf '%b' "${p//\\/\\\\0}")" # mountinfo escapes blanks as \040
        for prefix in "${prefixes[@]}"; do
            [[ "$p/" == "$prefix"* ]] && { echo "$p"; break; }
        done
    done | awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2- | uniq
}

unmount_all() {
    local p pass
    for pass in 1 2 3; do
        while read -r p; do
            [[ -n "$p" ]] || continue
            umount "$p" 2>/dev/null || umount -l "$p" 2>/dev/null || true
        done < <(our_mounts)
        [[ -z "$(our_mounts)" ]] && return 0
    done
    log "warning: still mounted: $(our_mounts | tr '\n' ' ')"
}

remove_tree() { # PATH: rm -rf, but never across a mount point
    local path="$1"
    [[ -e "$path" ]] || return 0
    if awk '{ print $5 }' /proc/self/mountinfo | grep -qF -- "$path"; then
        log "warning: not removing $path: something is mounted under it"
        return 0
    fi
    rm -rf --one-file-system -- "$path"
}

# -- network -----------------------------------------------------------------

iptables_cmds() {
    local c
    for c in iptables ip6tables; do command -v "$c" >/dev/null && echo "$c"; done
    return 0
}

our_chains() { # "CMD TABLE CHAIN" for every KUBE-*, CNI-*, TANDEM-* chain
    local ipt t
    for ipt in $(iptables_cmds); do
        for t in filter nat mangle; do
            "$ipt" -w 5 -t "$t" -S 2>/dev/null |
                awk -v c="$ipt" -v t="$t" '$1 == "-N" && $2 ~ /^(KUBE-|CNI-|TANDEM-)/ { print c, t, $2 }'
        done
    done
    return 0
}

remove_chains() {
    local ipt t chain rule
    # Rules in any chain that jump to one of ours, then our chains themselves.
    for ipt in $(iptables_cmds); do
        for t in filter nat mangle; do
            "$ipt" -w 5 -t "$t" -S 2>/dev/null |
                awk '$1 == "-A" && / -j (KUBE-|CNI-|TANDEM-)/ && $2 !~ /^(KUBE-|CNI-|TANDEM-)/' |
                while read -r rule; do
                    eval "\"$ipt\" -w 5 -t $t -D ${rule#-A }" 2>/dev/null || true
                done
        done
    done
    while read -r ipt t chain; do
        [[ -n "$chain" ]] && "$ipt" -w 5 -t "$t" -F "$chain" 2>/dev/null || true
    done < <(our_chains)
    while read -r ipt t chain; do
        [[ -n "$chain" ]] && "$ipt" -w 5 -t "$t" -X "$chain" 2>/dev/null || true
    done < <(our_chains)
}

our_nft_tables() { # kube-proxy's tables, and tables `up` found absent that hold no rule now
    command -v nft >/dev/null || return 0
    local family name
    nft list tables 2>/dev/null | while read -r _ family name; do
        if [[ "$name" == kube-proxy ]]; then
            echo "$family $name"
        elif [[ -f "$STATE/nft-tables" ]] && ! grep -qxF "table $family $name" "$STATE/nft-tables" &&
            ! nft -j list table "$family" "$name" 2>/dev/null | grep -q '"rule"'; then
            echo "$family $name"
        fi
    done
}

bridge_links() { # the bridge's ports (veths), then the bridge
    ip link show "$BRIDGE" >/dev/null 2>&1 || return 0
    ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }'
    echo "$BRIDGE"
}

save_sysctls() {
    [[ -f "$RUN/sysctl.saved" ]] && return 0
    {
        echo "net.ipv4.ip_forward=$(sysctl -n net.ipv4.ip_forward)"
        local v
        v="$(sysctl -n net.bridge.bridge-nf-call-iptables 2>/dev/null)" &&
            echo "net.bridge.bridge-nf-call-iptables=$v"
    } >"$RUN/sysctl.saved"
    return 0
}

restore_sysctls() {
    local f line
    for f in "$STATE"/run/sysctl.saved; do
        [[ -f "$f" ]] || continue
        while read -r line; do
            [[ -n "$line" ]] && sysctl -q -w "$line" >/dev/null 2>&1 || true
        done <"$f"
        rm -f "$f"
    done
    return 0
}

# -- teardown ----------------------------------------------------------------

graceful_pods() { # delete every pod while the node still runs, so containers stop cleanly
    pid_of kube-apiserver >/dev/null && pid_of kubelet >/dev/null && [[ -f "$KUBECONFIG_ADMIN" ]] || return 0
    stop_component kube-controller-manager 10
    stop_component kube-scheduler 10
    log "deleting pods"
    kctl delete pods --all --all-namespaces --grace-period=5 --wait=true --timeout=40s >/dev/null 2>&1 ||
        log "warning: pods not all gone gracefully; they are killed"
}

remove_cri_containers() { # tasks and containers left in containerd (killed run or slow pods)
    pid_of containerd >/dev/null || return 0
    local ids id
    ids="$(ctrc tasks ls -q 2>/dev/null || true)"
    for id in $ids; do ctrc tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    for id in $ids; do ctrc tasks delete -f "$id" >/dev/null 2>&1 || true; done
    for id in $(ctrc containers ls -q 2>/dev/null || true); do
        ctrc containers delete "$id" >/dev/null 2>&1 || true
    done
}

teardown() { # everything but the state folder's durable parts (pki, containerd root, logs)
    local graceful="${1:-1}" name i pids
    ((graceful)) && graceful_pods
    stop_component kube-proxy 10
    stop_component kubelet 15
    remove_cri_containers
    for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
        stop_component "${COMPONENTS[i]}" 15
    done
    # What outlives containerd: shims and the containers' processes.
    pids="$(shim_pids) $(cgroup_pids)"
    # shellcheck disable=SC2086
    stop_pids 5 $pids
    unmount_all
    while read -r name; do
        [[ -n "$name" ]] && rmdir "$name" 2>/dev/null || true
    done < <(our_cgroups)
    while read -r name; do
        [[ -n "$name" ]] && ip link delete "$name" 2>/dev/null || true
    done < <(bridge_links)
    ip route del "$SERVICE_CIDR" 2>/dev/null || true
    remove_chains
    while read -r name; do
        [[ -n "$name" ]] && nft delete table $name 2>/dev/null || true
    done < <(our_nft_tables)
    restore_sysctls
    if [[ -f "$STATE/system-paths" ]]; then
        # Deepest first; only the ones this cluster created.
        while read -r name; do
            [[ -n "$name" ]] && remove_tree "$name"
        done < <(sort -r "$STATE/system-paths")
    fi
    for name in "$RUN" "$STATE/containerd/state" "$STATE/containerd/runc" "$STATE/kubelet" "$SOCK" "$SOCK.ttrpc"; do
        remove_tree "$name"
    done
    if [[ -f "$OWNER_FILE" && "$(cat "$OWNER_FILE")" == "$STATE" ]]; then
        rm -f "$OWNER_FILE"
    fi
}

leftovers() { # one line per trace of a cluster on this machine
    local name pid p
    for name in "${COMPONENTS[@]}"; do
        pid="$(pid_of "$name")" && echo "process $name $pid"
    done
    for pid in $(shim_pids); do echo "process containerd-shim $pid"; done
    for pid in $(cgroup_pids); do echo "process in-pod $pid"; done
    while read -r p; do [[ -n "$p" ]] && echo "mount $p"; done < <(our_mounts)
    while read -r p; do [[ -n "$p" ]] && echo "cgroup $p"; done < <(our_cgroups)
    while read -r p; do [[ -n "$p" ]] && echo "link $p"; done < <(bridge_links)
    ip route show "$SERVICE_CIDR" 2>/dev/null | sed 's/^/route /'
    while read -r p; do [[ -n "$p" ]] && echo "nftables table $p"; done < <(our_nft_tables)
    while read -r p; do [[ -n "$p" ]] && echo "chain $p"; done < <(our_chains)
    [[ -f "$RUN/sysctl.saved" ]] && echo "sysctl not restored: $(tr '\n' ' ' <"$RUN/sysctl.saved")"
    if [[ -f "$STATE/system-paths" ]]; then
        while read -r p; do [[ -e "$p" ]] && echo "path $p"; done <"$STATE/system-paths"
    fi
    for p in "$RUN" "$STATE/containerd/state" "$STATE/kubelet" "$SOCK"; do
        [[ -e "$p" ]] && echo "path $p"
    done
    [[ -f "$OWNER_FILE" ]] && echo "path $OWNER_FILE ($(cat "$OWNER_FILE"))"
    return 0
}

# -- bring-up ----------------------------------------------------------------

ensure_packages() {
    local want=(containerd runc containernetworking-plugins iptables nftables conntrack socat openssl curl)
    local missing=() p
    for p in "${want[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "missing packages (${missing[*]}) and no apt-get"
    log "installing ${missing[*]} from Debian"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=300 "${missing[@]}" >&2
    command -v kubectl >/dev/null || die "kubectl is not on PATH"
}

build_binaries() {
    local out
    out="$("$repo_root/scripts/build-controlplane.sh")" || die "scripts/build-controlplane.sh failed"
    BIN="$(tail -n1 <<<"$out")"
    for name in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy pause echo; do
        [[ -x "$BIN/$name" ]] || die "$BIN/$name missing: run scripts/build-controlplane.sh"
    done
}

pack_images() { # the pause and echo images, rebuilt when their binary changed
    mkdir -p "$STATE/images"
    local name ref
    for name in pause echo; do
        ref="$PAUSE_REF"
        [[ $name == echo ]] && ref="$ECHO_REF"
        if [[ ! -f "$STATE/images/$name.tar" || "$BIN/$name" -nt "$STATE/images/$name.tar" ]]; then
            python3 "$repo_root/e2e/cluster/oci.py" pack "$STATE/images/$name.tar" "$ref" "$BIN/$name" >/dev/null
        fi
    done
    return 0
}

make_pki() {
    mkdir -p "$PKI"
    if [[ -f "$PKI/done" ]]; then
        return 0
    fi
    log "making the PKI"
    local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    (
        cd "$PKI"
        openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.crt -days 3650 -subj /CN=tandem-cluster-ca \
            -addext basicConstraints=critical,CA:TRUE \
            -addext keyUsage=critical,keyCertSign,cRLSign,digitalSignature 2>/dev/null
        leaf() { # NAME SUBJECT EKU [SANS]
            local ext="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=$3"
            [[ -n "${4:-}" ]] && ext+=$'\n'"subjectAltName=$4"
            printf '%s\n' "$ext" >"$1.ext"
            openssl req -new "${ec[@]}" -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
            openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -set_serial "0x$(openssl rand -hex 16)" \
                -days 3650 -out "$1.crt" -extfile "$1.ext" 2>/dev/null
            rm -f "$1.csr" "$1.ext"
        }
        leaf apiserver /CN=kube-apiserver serverAuth \
            "IP:$GATEWAY,IP:${SERVICE_CIDR%.0/16}.1,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
        leaf kubelet-serving "/O=system:nodes/CN=system:node:$NODE_NAME" serverAuth "IP:$GATEWAY,DNS:$NODE_NAME"
        leaf admin /O=system:masters/CN=tandem-admin clientAuth
        leaf apiserver-kubelet-client /O=system:masters/CN=kube-apiserver-kubelet-client clientAuth
        leaf kube-controller-manager /CN=system:kube-controller-manager clientAuth
        leaf kube-scheduler /CN=system:kube-scheduler clientAuth
        leaf kube-proxy /CN=system:kube-proxy clientAuth
        leaf kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
        openssl ecparam -name prime256v1 -genkey -noout -out sa.key
        openssl ec -in sa.key -pubout -out sa.pub 2>/dev/null
        chmod 600 ./*.key
        touch done
    )
}

write_kubeconfig() { # FILE USER (a cert/key pair in the PKI)
    local b64="base64 -w0"
    cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: tandem
  cluster:
    server: https://$GATEWAY:$API_PORT
    certificate-authority-data: $($b64 "$PKI/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $($b64 "$PKI/$2.crt")
    client-key-data: $($b64 "$PKI/$2.key")
contexts:
- name: tandem
  context: {cluster: tandem, user: $2, namespace: default}
current-context: tandem
EOF
    chmod 600 "$1"
}

write_configs() {
    mkdir -p "$STATE/config" "$STATE/cni/net.d" "$STATE/cni/networks"
    local u
    for u in kube-controller-manager kube-scheduler kube-proxy kubelet; do
        write_kubeconfig "$STATE/config/$u.kubeconfig" "$u"
    done
    # Written before containerd starts: containerd 1.6 never picks up a later file.
    cat >"$STATE/cni/net.d/10-tandem.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "tandem",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "isDefaultGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$STATE/cni/networks",
        "ranges": [[{"subnet": "$POD_CIDR", "rangeStart": "198.18.1.1", "gateway": "$GATEWAY"}]],
        "routes": [{"dst": "$SERVICE_CIDR"}]
      }
    }
  ]
}
EOF
    cat >"$STATE/config/containerd.toml" <<EOF
version = 2
root = "$STATE/containerd/root"
state = "$STATE/containerd/state"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_REF"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$STATE/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
    max_conf_num = 1
EOF
    cat >"$STATE/config/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $GATEWAY
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$SOCK
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
resolvConf: ""
oomScoreAdj: 0
maxOpenFiles: 20000
podLogsDir: $STATE/pod-logs
clusterDomain: cluster.local
serializeImagePulls: false
registerNode: true
rotateCertificates: false
serverTLSBootstrap: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "50Mi", nodefs.available: "1%", nodefs.inodesFree: "1%", imagefs.available: "1%"}
evictionPressureTransitionPeriod: 10s
nodeStatusUpdateFrequency: 5s
EOF
    cat >"$STATE/config/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $STATE/config/kube-proxy.kubeconfig}
mode: nftables
hostnameOverride: $NODE_NAME
clusterCIDR: $POD_CIDR
detectLocalMode: ClusterCIDR
nodePortAddresses: ["$GATEWAY/32"]
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
iptables: {localhostNodePorts: false}
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

record_system_paths() { # the ones that do not exist yet are ours to remove on `down`
    local p
    # After the cleanup of a killed run: what exists now is not ours.
    for p in "${SYSTEM_PATHS[@]}"; do [[ -e "$p" ]] || echo "$p"; done >"$STATE/system-paths"
    # Likewise nftables tables (iptables-nft makes `ip filter`, `ip6 nat`... on first use).
    nft list tables >"$STATE/nft-tables" 2>/dev/null || true
}

setup_network() {
    save_sysctls
    ip link add "$BRIDGE" type bridge
    sysctl -q -w "net.ipv6.conf.$BRIDGE.disable_ipv6=1" >/dev/null 2>&1 || true
    ip addr add "$GATEWAY/16" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    # ClusterIPs from the host: through the bridge, from the gateway address.
    ip route add "$SERVICE_CIDR" dev "$BRIDGE" src "$GATEWAY"
    # Pod -> Service -> pod on the same bridge passes through iptables/nftables.
    sysctl -q -w net.bridge.bridge-nf-call-iptables=1 >/dev/null 2>&1 || true
    # Nothing crosses the bridge's edge, either way.
    iptables -w 5 -N TANDEM-FORWARD
    iptables -w 5 -A TANDEM-FORWARD -i "$BRIDGE" ! -o "$BRIDGE" -j DROP
    iptables -w 5 -A TANDEM-FORWARD -o "$BRIDGE" ! -i "$BRIDGE" -j DROP
    iptables -w 5 -I FORWARD 1 -j TANDEM-FORWARD
}

wait_for() { # WHAT TIMEOUT COMPONENT CMD...: poll CMD until it succeeds
    local what="$1" timeout="$2" component="$3" deadline pid
    shift 3
    deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if [[ -n "$component" ]] && ! pid_of "$component" >/dev/null; then
            log "$component exited; the end of $LOGS/$component.log:"
            tail -n 30 "$LOGS/$component.log" >&2 || true
            return 1
        fi
        if ((SECONDS >= deadline)); then
            log "timed out after ${timeout}s waiting for $what"
            [[ -n "$component" ]] && tail -n 30 "$LOGS/$component.log" >&2
            return 1
        fi
        sleep 0.2
    done
}

https_ok() { # URL: answers "ok" to the admin certificate
    [[ "$(curl -sf --max-time 3 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "$1")" == ok ]]
}

node_ready() {
    [[ "$(kctl get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}

archive_refs() { # FILE: "NAME DIGEST" per image in an OCI archive
    python3 "$repo_root/e2e/cluster/oci.py" refs "$1"
}

import_image() { # FILE: into the k8s.io namespace, unless every name is there with its digest
    local file="$1" refs have name digest missing=0 started="$EPOCHREALTIME"
    refs="$(archive_refs "$file")" || die "$file: not an OCI image archive"
    [[ -n "$refs" ]] || die "$file: no image with a ref name annotation in its index.json"
    have="$(ctrc images ls 2>/dev/null | awk 'NR > 1 { print $1, $3 }')"
    while read -r name digest; do
        grep -qxF "$name $digest" <<<"$have" || missing=1
    done <<<"$refs"
    if ((missing == 0)); then
        log "image $(awk '{ printf "%s ", $1 }' <<<"$refs")already imported ($(basename "$file"))"
        return 0
    fi
    ctrc images import --no-unpack=false "$file" >/dev/null 2>&1 ||
        ctrc images import "$file" >&2 || die "ctr images import $file failed"
    log "imported $(awk '{ printf "%s ", $1 }' <<<"$refs")from $(basename "$file") in $(since "$started")s"
}

start_containerd() {
    spawn containerd containerd --config "$STATE/config/containerd.toml"
    wait_for "containerd" 60 containerd ctr --address "$SOCK" version
}

up() {
    need_root
    take_lock
    if [[ -f "$OWNER_FILE" && "$(cat "$OWNER_FILE")" != "$STATE" ]]; then
        local other
        other="$(cat "$OWNER_FILE")"
        if [[ -d "$other/run" ]] && TANDEM_CLUSTER_DIR="$other" "$0" leftovers 2>/dev/null | grep -q '^process '; then
            die "a cluster from $other runs on this machine; stop it with TANDEM_CLUSTER_DIR=$other $0 down"
        fi
    fi
    local all=1 name
    for name in "${COMPONENTS[@]}"; do pid_of "$name" >/dev/null || all=0; done
    if ((all)) && [[ "${1:-}" != --fresh ]] && https_ok "https://$GATEWAY:$API_PORT/readyz" && node_ready; then
        log "already up"
        local file
        for file in "$IMAGES_DIR"/*.tar; do
            if [[ -f "$file" ]]; then import_image "$file"; fi
        done
        echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
        return 0
    fi

    ensure_packages
    local t=$EPOCHREALTIME
    build_binaries
    pack_images
    log "binaries and images ready ($(since "$t")s): $BIN"

    if [[ -n "$(leftovers)" ]]; then
        t=$EPOCHREALTIME
        log "cleaning what a previous run left"
        teardown 0
        log "cleaned in $(since "$t")s"
    fi
    # A fresh cluster each time; the PKI (so old kubeconfigs keep working), the
    # containerd root (imported images) and old logs stay.
    remove_tree "$STATE/etcd"
    remove_tree "$STATE/pod-logs"
    mkdir -p "$RUN" "$LOGS" "$STATE/containerd"
    for name in "$LOGS"/*.log; do [[ -f "$name" ]] && mv -f "$name" "$name.prev"; done
    echo "$STATE" >"$OWNER_FILE"
    up_done=0
    trap 'on_exit' EXIT
    make_pki
    write_kubeconfig "$KUBECONFIG_ADMIN" admin
    write_configs
    record_system_paths
    setup_network

    local t_cp=$EPOCHREALTIME
    spawn etcd "$BIN/etcd" --name=tandem --data-dir="$STATE/etcd" \
        --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster="tandem=http://127.0.0.1:$ETCD_PEER_PORT" --initial-cluster-state=new \
        --listen-metrics-urls="" --unsafe-no-fsync --log-level=warn
    start_containerd
    if [[ -n "$(ctrc containers ls -q 2>/dev/null)" ]]; then
        # A killed run's containers: remove them, then restart so the CRI forgets them.
        log "removing a previous run's containers"
        remove_cri_containers
        stop_component containerd 15
        start_containerd
    fi
    wait_for "etcd" 60 etcd curl -sf --max-time 2 "http://127.0.0.1:$ETCD_PORT/health"
    spawn kube-apiserver "$BIN/kube-apiserver" \
        --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
        --bind-address="$GATEWAY" --advertise-address="$GATEWAY" --secure-port="$API_PORT" \
        --cert-dir="$STATE/run/apiserver-certs" \
        --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
        --client-ca-file="$PKI/ca.crt" \
        --kubelet-certificate-authority="$PKI/ca.crt" \
        --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
        --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
        --kubelet-preferred-address-types=InternalIP \
        --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
        --service-cluster-ip-range="$SERVICE_CIDR" \
        --allow-privileged=true --profiling=false --v=1

    # The sandbox image before the kubelet; the others beside the rest of the start.
    import_image "$STATE/images/pause.tar"
    (
        t_img=$EPOCHREALTIME
        import_image "$STATE/images/echo.tar"
        for file in "$IMAGES_DIR"/*.tar; do
            if [[ -f "$file" ]]; then import_image "$file"; fi
        done
        log "images imported ($(since "$t_img")s)"
    ) &
    local imports=$!

    wait_for "kube-apiserver /readyz" 120 kube-apiserver https_ok "https://$GATEWAY:$API_PORT/readyz"
    log "apiserver ready ($(since "$t_cp")s after etcd started)"
    spawn kube-controller-manager "$BIN/kube-controller-manager" \
        --kubeconfig="$STATE/config/kube-controller-manager.kubeconfig" \
        --authentication-kubeconfig="$STATE/config/kube-controller-manager.kubeconfig" \
        --authorization-kubeconfig="$STATE/config/kube-controller-manager.kubeconfig" \
        --bind-address=127.0.0.1 --secure-port=10257 --cert-dir="$STATE/run/kcm-certs" \
        --use-service-account-credentials=true \
        --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
        --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
        --service-cluster-ip-range="$SERVICE_CIDR" --allocate-node-cidrs=false \
        --leader-elect=false --controllers='*' --profiling=false --v=1 \
        --kube-api-qps=200 --kube-api-burst=400
    spawn kube-scheduler "$BIN/kube-scheduler" \
        --kubeconfig="$STATE/config/kube-scheduler.kubeconfig" \
        --authentication-kubeconfig="$STATE/config/kube-scheduler.kubeconfig" \
        --authorization-kubeconfig="$STATE/config/kube-scheduler.kubeconfig" \
        --bind-address=127.0.0.1 --secure-port=10259 --cert-dir="$STATE/run/scheduler-certs" \
        --leader-elect=false --profiling=false --v=1
    local t_node=$EPOCHREALTIME
    spawn kubelet "$BIN/kubelet" --config="$STATE/config/kubelet.yaml" \
        --kubeconfig="$STATE/config/kubelet.kubeconfig" --root-dir="$STATE/kubelet" \
        --cert-dir="$STATE/kubelet/pki" --node-ip="$GATEWAY" --hostname-override="$NODE_NAME" --v=1
    spawn kube-proxy "$BIN/kube-proxy" --config="$STATE/config/kube-proxy.yaml" --v=1

    log "waiting for node $NODE_NAME to be Ready"
    wait_for "node $NODE_NAME Ready" 120 kubelet node_ready
    log "node Ready ($(since "$t_node")s after kubelet started)"
    wait_for "the default ServiceAccount" 60 kube-controller-manager kctl get serviceaccount default -n default
    wait "$imports" || die "importing images failed"
    for name in "${COMPONENTS[@]}"; do
        pid_of "$name" >/dev/null || { log "$name is not running"; tail -n 30 "$LOGS/$name.log" >&2; false; }
    done
    up_done=1
    log "up in $(since "$t0")s; logs in $LOGS"
    echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
}

on_exit() {
    ((up_done)) && return 0
    if [[ "${TANDEM_CLUSTER_KEEP_ON_FAILURE:-0}" == 1 ]]; then
        log "up failed; left running for inspection (logs in $LOGS); 'scripts/cluster.sh down' cleans"
    else
        log "up failed; tearing down (TANDEM_CLUSTER_KEEP_ON_FAILURE=1 keeps it; logs in $LOGS)"
        teardown 0
    fi
}

down() {
    need_root
    take_lock
    teardown 1
    if [[ "${1:-}" == --purge ]]; then
        remove_tree "$STATE"
        log "purged $STATE"
    fi
    log "down in $(since "$t0")s"
}

status() {
    local name pid
    for name in "${COMPONENTS[@]}"; do
        if pid="$(pid_of "$name")"; then echo "$name: running (pid $pid)"; else echo "$name: stopped"; fi
    done
    if pid_of kube-apiserver >/dev/null; then
        kctl get nodes -o wide 2>&1 || true
        echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
    fi
    if pid_of containerd >/dev/null; then
        ctrc images ls 2>/dev/null | awk 'NR == 1 || $1 !~ /^sha256:/ { print $1, $3, $4, $5 }'
    fi
}

load() {
    need_root
    [[ $# -ge 1 ]] || die "usage: $0 load FILE.tar..."
    take_lock
    pid_of containerd >/dev/null || die "the cluster is not up"
    local file
    for file in "$@"; do
        [[ -f "$file" ]] || die "no such file: $file"
        import_image "$file"
    done
}

case "${1:-}" in
up) shift; up "$@" ;;
down) shift; down "$@" ;;
status) status ;;
load) shift; load "$@" ;;
leftovers) leftovers ;;
*)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
