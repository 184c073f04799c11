#!/usr/bin/env bash
# A real one-node Kubernetes v1.20 for shardq's real-node test tier (tests/e2e/): a real kubelet,
# containerd + runc, kube-proxy (iptables), kube-scheduler and a small cluster DNS, with the control
# plane of control_plane.sh, all inside ONE private network namespace ($NS) that this script makes.
# Pods are real containers on the bridge cni0 (10.244.0.0/24) of that namespace; nothing listens
# on the host's network but the apiserver forward on the host's 127.0.0.1 (api_forward.py).
#
# Usage:
#   scripts/k8s/real_node.sh up     WORKDIR [NAME=ARCHIVE ...]  # prints WORKDIR/kubeconfig
#   scripts/k8s/real_node.sh down   WORKDIR                     # stops everything, removes its traces
#   scripts/k8s/real_node.sh check  WORKDIR                     # exit 1 (and say what) if anything is left
#   scripts/k8s/real_node.sh status WORKDIR
#
# `up` first runs `down` on WORKDIR (a crashed run's leftovers go), then brings up an empty
# cluster and imports each image archive (`podman save --format oci-archive NAME`, which names
# the image NAME inside, e.g. localhost/shardq:realnode=/tmp/shardq.tar): pods use NAME with
# imagePullPolicy Never, since nothing can be pulled. It waits for the node to be Ready and makes the default StorageClass
# `local` (no provisioner, WaitForFirstConsumer) with $SHARDQ_RN_PVS static local PVs.
#
# It writes WORKDIR/kubeconfig (the host's view: https://127.0.0.1:<forward port>),
# WORKDIR/cp/kubeconfig (the view inside the namespace), WORKDIR/env (KUBECONFIG, SHARDQ_RN_BIN,
# SHARDQ_RN_NETNS) and NAME.{pid,log} for containerd, kubelet, kube-proxy, cluster-dns and
# api-forward. Run a client inside the namespace with `ip netns exec $NS CMD`: it then resolves
# Service names through the cluster DNS (/etc/netns/$NS/resolv.conf).
#
# Why it looks like this (each was met on the way; see docs/kubernetes.md):
# - hostNetwork on the host does not work (the kubelet refuses a loopback node IP, in-cluster
#   clients need kube-proxy for 10.0.0.1), hence a private network namespace for everything;
# - containerd and the kubelet must share one private mount namespace (the kubelet mounts pod
#   volumes that containerd then hands to runc; `ip netns exec` would also hide the cgroup mounts
#   under its fresh /sys): containerd is the first process of that namespace, and the kubelet,
#   kube-proxy, the DNS and the control plane are nsenter'ed into it;
# - the paths the kubelet and containerd write to whatever their flags say (/var/log/pods,
#   /run/containerd, /var/lib/cni, ...) and the kernel-wide sysctls the kubelet sets are
#   bind-mounted from WORKDIR in that mount namespace, so the host is not written to;
# - pods' cgroups go under /$NS in every hierarchy (the kubelet's cgroupRoot), removed by `down`;
# - containerd's root and state are a tmpfs in that mount namespace: they vanish with it (deleting
#   the unpacked image layers from disk took 20+ s on a busy machine);
# - ctr registers an archive's image only under a name that starts with --base-name (without it,
#   nothing, silently); --index-name instead wraps the image in a new index, which ctr 1.6.20
#   deletes again while it unpacks ("content digest ...: not found", 2 of ~16 ups here);
# - teardown order: kubelet first (or it restarts pods), then every container task (shims outlive
#   containerd), containerd, the proxy, the DNS, the control plane, the namespace, the cgroups.
#
# Environment:
#   SHARDQ_K8S_BIN      dir with the Kubernetes binaries (default: build_kube.sh's cache, built if missing)
#   SHARDQ_RN_NETNS     the network namespace (default shardq-rn)
#   SHARDQ_RN_PVS       local PersistentVolumes to make (default 8)
#   SHARDQ_RN_TIMEOUT   seconds to wait for each step of `up` (default 120)
#   SHARDQ_RN_CACHE     where the pause image archive is cached (default ~/.cache/shardq/real-node)
#
# Needs root. One node per machine at a time (the namespace and cgroup names are fixed): callers
# serialise with a lock (tests/e2e/conftest.py holds WORKDIR.lock for its run).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FILES=$HERE/real_node
NS=${SHARDQ_RN_NETNS:-shardq-rn}
NODE_IP=10.244.0.1          # cni0 in $NS: the node's address, the DNS, the apiserver's advertised address
POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.0.0.0/24    # control_plane.sh's --service-cluster-ip-range
NODE_NAME=node1
CGROUP_ROOT=/$NS
PAUSE_IMAGE=localhost/pause:3.4.1
PVS=${SHARDQ_RN_PVS:-8}
CONTAINERD_TMPFS=4g         # containerd's root and state: in memory, in the node's mount namespace
TIMEOUT=${SHARDQ_RN_TIMEOUT:-120}
GRACE=10
CACHE=$(realpath -m "${SHARDQ_RN_CACHE:-$HOME/.cache/shardq/real-node}")
# written by the kubelet, containerd or the CNI plugins whatever the flags: bind-mounted from WORKDIR
HOST_DIRS=(/run/containerd /var/lib/cni /var/log/pods /var/log/containers)
# kernel-wide sysctls the kubelet sets at start: it writes into WORKDIR copies instead
KUBELET_SYSCTLS=(vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops
                 kernel/keys/root_maxkeys kernel/keys/root_maxbytes)
DAEMONS_STOP_ORDER=(kubelet containerd kube-proxy cluster-dns api-forward)
PACKAGES=(containerd runc containernetworking-plugins conntrack iptables etcd-server openssl curl
          gcc libc6-dev podman)

log() { printf '[real_node %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
usage() { echo "usage: $0 up WORKDIR [NAME=ARCHIVE ...] | down WORKDIR | check WORKDIR | status WORKDIR | tag WORKDIR SOURCE TARGET" >&2; exit 2; }

[ $# -ge 2 ] || usage
CMD=$1
W=$(realpath -m "$2")
shift 2
[ "$W" != / ] || die "refusing to use / as WORKDIR"

# --- process bookkeeping (as control_plane.sh: a PID counts only if its command line names W) -----
ours() {
    local f="$W/$1.pid" pid
    [ -f "$f" ] || return 1
    pid=$(cat "$f")
    [[ "$pid" =~ ^[0-9]+$ ]] && [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" | grep -F -- "$W/" >/dev/null || return 1
    [ "$(awk '/^State:/{print $2}' "/proc/$pid/status" 2>/dev/null)" != Z ] || return 1
    echo "$pid"
}

alive() { [ -d "/proc/$1" ] && [ "$(awk '/^State:/{print $2}' "/proc/$1/status" 2>/dev/null)" != Z ]; }

wait_gone() {  # wait_gone SECONDS PID...: until none is alive; 1 if some still are
    local deadline=$((SECONDS + $1)) p left
    shift
    while :; do
        left=0
        for p in "$@"; do alive "$p" && left=1; done
        [ "$left" = 0 ] && return 0
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

stop_one() {  # SIGTERM, GRACE s, SIGKILL
    local pid
    if pid=$(ours "$1"); then
        log "stopping $1 (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_gone "$GRACE" "$pid"; then
            log "$1 (pid $pid) still running after ${GRACE}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            wait_gone 10 "$pid" || log "WARNING: $1 (pid $pid) did not die"
        fi
    fi
    rm -f "$W/$1.pid"
}

launch() {  # launch NAME CMD...: a daemon in its own session, output in NAME.log, PID in NAME.pid
    local name=$1 i
    shift
    setsid "$@" </dev/null >"$W/$name.log" 2>&1 &
    echo $! > "$W/$name.pid"
    for ((i = 0; i < 100; i++)); do  # until the exec chain (setsid, nsenter, ...) reached the daemon
        ours "$name" >/dev/null && break
        alive "$!" || break
        sleep 0.05
    done
    log "started $name (pid $!, log $W/$name.log)"
}

wait_for() {  # wait_for WHAT DAEMON CMD...: until CMD succeeds; fails if DAEMON exits or at TIMEOUT
    local what=$1 daemon=$2 t0=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [ -n "$daemon" ] && ! ours "$daemon" >/dev/null; then
            tail -n 30 "$W/$daemon.log" >&2 || true
            die "$daemon exited while waiting for $what (log: $W/$daemon.log)"
        fi
        [ $((SECONDS - t0)) -lt "$TIMEOUT" ] || die "no $what after ${TIMEOUT}s"
        sleep 0.25
    done
    log "$what after $((SECONDS - t0)) s"
}

in_node() {  # in_node CMD...: run CMD in the node's network and mount namespaces (containerd's)
    local pid
    pid=$(ours containerd) || die "containerd is not running"
    nsenter -t "$pid" -m -n -- "$@"
}

ctr_() { in_node ctr --address "$W/containerd/containerd.sock" --namespace k8s.io "$@"; }

kubectl_() { KUBECONFIG="$W/kubeconfig" "$BIN/kubectl" --request-timeout 10s "$@"; }

need_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get -o DPkg::Lock::Timeout=300 -qq update
    DEBIAN_FRONTEND=noninteractive timeout 1200 apt-get -o DPkg::Lock::Timeout=300 -y -qq \
        install --no-install-recommends "${missing[@]}" >/dev/null
}

find_binaries() {
    BIN=${SHARDQ_K8S_BIN:-}
    [ -n "$BIN" ] || BIN=$("$HERE/build_kube.sh")
    local b
    for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
        [ -x "$BIN/$b" ] || die "no $b in $BIN (scripts/k8s/build_kube.sh builds it)"
    done
}

cgroup_dirs() {  # our cgroup in every mounted hierarchy (v1 controllers and the v2 unified one)
    awk -v root="$CGROUP_ROOT" '$3 == "cgroup" || $3 == "cgroup2" {print $2 root}' /proc/self/mounts
}

# --- the files the daemons read ------------------------------------------------------------------
write_configs() {
    mkdir -p "$W/cni" "$W/containerd" "$W/volume-plugins" "$W/localpv" "$W/sysctl"
    : > "$W/resolv.conf"   # the base of the pods' resolv.conf: nothing of the host's
    cat > "$W/cni/10-shardq-rn.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "shardq-rn", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$W/cni-ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}
]}
EOF
    cat > "$W/containerd.toml" <<EOF
version = 2
root = "$W/containerd/root"
state = "$W/containerd/state"
oom_score = 0
# snapshotters this machine cannot use only fill the log
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$W/containerd/containerd.sock"
[ttrpc]
  address = "$W/containerd/containerd.ttrpc.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$W/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true        # no CAP_SYS_RESOURCE here: never lower a score
  netns_mounts_under_state_dir = true  # pod network namespaces pinned under WORKDIR
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$W/cni"
EOF
    cat > "$W/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
# the apiserver's log and exec calls come without a client certificate
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupRoot: $CGROUP_ROOT
failSwapOn: false
oomScoreAdj: 0
clusterDomain: cluster.local
clusterDNS: [$NODE_IP]
resolvConf: $W/resolv.conf
volumePluginDir: $W/volume-plugins
# the images were imported and cannot be pulled again: never collect them, never evict for disk
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
syncFrequency: 10s
nodeStatusUpdateFrequency: 5s
EOF
}

pause_archive() {  # an OCI archive of the pause image, built once per pause.c (cached in $CACHE)
    local key tar tmp
    key=$(sha256sum "$FILES/pause.c" | cut -c1-16)
    tar=$CACHE/pause-$key.tar
    if [ ! -s "$tar" ]; then
        log "building $PAUSE_IMAGE from $FILES/pause.c"
        mkdir -p "$CACHE"
        tmp=$(mktemp -d)
        gcc -Os -static -o "$tmp/pause" "$FILES/pause.c"
        printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' > "$tmp/Containerfile"
        export CONTAINERS_CONF=${CONTAINERS_CONF:-$HERE/containers.conf}
        timeout 300 podman build -q --pull=never --network=none -t "$PAUSE_IMAGE" "$tmp" >/dev/null
        timeout 300 podman save --format oci-archive -o "$tar.tmp" "$PAUSE_IMAGE" >/dev/null
        mv "$tar.tmp" "$tar"
        rm -rf "$tmp"
    fi
    echo "$tar"
}

# --- the node's mount namespace: its first process sets it up, then becomes containerd ------------
mount_namespace() {
    mount --make-rprivate /
    local d src k f
    for d in "${HOST_DIRS[@]}"; do
        src=$W/host$d
        mkdir -p "$src"
        if [ ! -e "$d" ]; then  # a mount point on the host's disk: made here, removed by `down`
            mkdir "$d"
            echo "$d" >> "$W/made-dirs"
        fi
        mount --bind "$src" "$d"
    done
    for k in "${KUBELET_SYSCTLS[@]}"; do
        f=$W/sysctl/${k//\//.}
        cat "/proc/sys/$k" > "$f"
        mount --bind "$f" "/proc/sys/$k"
    done
    # containerd's root and state (images, unpacked layers, containers' writable layers) live in
    # memory: gone with this namespace, instead of ~30k files to delete from a busy disk
    mkdir -p "$W/containerd"
    mount -t tmpfs -o "size=$CONTAINERD_TMPFS,mode=0711" shardq-rn-containerd "$W/containerd"
    exec containerd --config "$W/containerd.toml"
}

# --- up ------------------------------------------------------------------------------------------
make_netns() {
    local made=0
    mountpoint -q /run/netns 2>/dev/null || made=1
    echo "$made" > "$W/netns-mount-made"   # ip netns add makes /run/netns a mount point if it is none
    [ -d /etc/netns ] || { mkdir /etc/netns; echo /etc/netns >> "$W/made-dirs"; }
    ip netns add "$NS"
    stat -L -c %i "/run/netns/$NS" > "$W/netns.inode"
    ip netns exec "$NS" sh -euc "
        ip link set lo up
        ip link add cni0 type bridge
        ip addr add $NODE_IP/24 dev cni0
        ip link set cni0 up
        ip route add $SERVICE_CIDR dev cni0   # ClusterIPs are reachable from the namespace itself
        sysctl -qw net.ipv4.ip_forward=1"
    mkdir -p "/etc/netns/$NS"
    printf 'nameserver %s\nsearch svc.cluster.local cluster.local\n' "$NODE_IP" > "/etc/netns/$NS/resolv.conf"
}

make_cgroups() {
    local d parent
    while read -r d; do
        mkdir -p "$d"
        parent=$(dirname "$d")
        if [ -f "$d/cpuset.cpus" ] && [ -z "$(cat "$d/cpuset.cpus")" ]; then
            cat "$parent/cpuset.cpus" > "$d/cpuset.cpus"
            cat "$parent/cpuset.mems" > "$d/cpuset.mems"
        fi
    done < <(cgroup_dirs)
}

storage() {  # the default StorageClass and PVS local volumes on node1
    local n
    {
        cat <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
EOF
        for ((n = 0; n < PVS; n++)); do
            mkdir -p "$W/localpv/pv$n"
            cat <<EOF
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: local-pv$n}
spec:
  capacity: {storage: 5Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: local
  local: {path: $W/localpv/pv$n}
  nodeAffinity:
    required:
      nodeSelectorTerms: [{matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [$NODE_NAME]}]}]
EOF
        done
    } | kubectl_ apply -f - >/dev/null
}

import_image() {  # import_image NAME ARCHIVE: the archive's image, which must be named NAME in it
    local name=$1 archive=$2 repository=$1
    [[ "${name##*/}" != *:* ]] || repository=${name%:*}   # the name without its tag
    log "importing $archive as $name"
    ctr_ images import --base-name "$repository" "$archive" >/dev/null
    ctr_ images ls -q | grep -xF "$name" >/dev/null || die "$archive holds no image named $name"
}

node_ready() {
    [ "$(kubectl_ get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

up() {
    [ "$(id -u)" = 0 ] || die "needs root (network namespace, mounts, cgroups)"
    local images=("$@") image name archive t0=$SECONDS cpid
    for image in "${images[@]}"; do
        [[ "$image" == *=* ]] || die "an image is NAME=ARCHIVE, not '$image'"
        [ -s "${image#*=}" ] || die "no image archive ${image#*=}"
    done
    need_packages
    find_binaries
    mkdir -p "$W"
    down_all
    rm -f "$W/netns.inode" "$W/netns-mount-made" "$W/made-dirs"   # the last run's records
    [ ! -e "/run/netns/$NS" ] || die "a network namespace $NS exists that $W did not make: is another node up?"
    trap 'rc=$?; if [ $rc -ne 0 ]; then log "up failed: tearing down"; down_all; fi' EXIT
    rm -f "$W"/*.log
    local pause
    pause=$(pause_archive)
    write_configs
    make_netns
    make_cgroups

    launch containerd nsenter --net="/run/netns/$NS" unshare --mount --propagation private -- \
        "$HERE/real_node.sh" _mount_namespace "$W"
    wait_for "containerd answering" containerd ctr_ version
    cpid=$(ours containerd)

    log "control plane (control_plane.sh in the node's namespaces)"
    in_node env SHARDQ_CP_NODE_IP="$NODE_IP" SHARDQ_K8S_BIN="$BIN" "$HERE/control_plane.sh" start "$W/cp" >/dev/null

    import_image "$PAUSE_IMAGE" "$pause"
    for image in "${images[@]}"; do
        import_image "${image%%=*}" "${image#*=}"
    done

    launch kubelet nsenter -t "$cpid" -m -n -- "$BIN/kubelet" \
        --config "$W/kubelet.yaml" --kubeconfig "$W/cp/kubeconfig" \
        --container-runtime remote --container-runtime-endpoint "unix://$W/containerd/containerd.sock" \
        --root-dir "$W/kubelet" --cert-dir "$W/kubelet-pki" \
        --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --v 1
    # iptables mode; the conntrack flags keep it from setting kernel-wide sysctls
    launch kube-proxy nsenter -t "$cpid" -m -n -- "$BIN/kube-proxy" \
        --kubeconfig "$W/cp/kubeconfig" --proxy-mode iptables --hostname-override "$NODE_NAME" \
        --cluster-cidr "$POD_CIDR" --bind-address "$NODE_IP" \
        --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249 \
        --conntrack-max-per-core 0 --conntrack-tcp-timeout-established 0 \
        --conntrack-tcp-timeout-close-wait 0
    launch cluster-dns nsenter -t "$cpid" -m -n -- python3 "$FILES/cluster_dns.py" \
        --env "$W/cp/env" --listen "$NODE_IP"
    rm -f "$W/api-forward.port"
    local api_port
    api_port=$(. "$W/cp/env" && echo "$SHARDQ_APISERVER_PORT")
    launch api-forward python3 "$FILES/api_forward.py" --netns "/run/netns/$NS" \
        --target "127.0.0.1:$api_port" --port-file "$W/api-forward.port"
    wait_for "the apiserver forward" api-forward test -s "$W/api-forward.port"
    sed "s|server: https://127.0.0.1:$api_port|server: https://127.0.0.1:$(cat "$W/api-forward.port")|" \
        "$W/cp/kubeconfig" > "$W/kubeconfig"
    chmod 600 "$W/kubeconfig"
    cat > "$W/env" <<EOF
export KUBECONFIG=$W/kubeconfig
export SHARDQ_RN_BIN=$BIN
export SHARDQ_RN_NETNS=$NS
EOF
    wait_for "node $NODE_NAME Ready" kubelet node_ready
    storage
    trap - EXIT
    log "node up in $((SECONDS - t0)) s: KUBECONFIG=$W/kubeconfig (inside $NS: $W/cp/kubeconfig)"
    echo "$W/kubeconfig"
}

# --- down ----------------------------------------------------------------------------------------
netns_pids() {  # PIDs in the network namespace recorded at up (by the inode of /run/netns/$NS)
    local inode
    inode=$(cat "$W/netns.inode" 2>/dev/null) || return 0
    { stat -L -c '%i %n' /proc/[0-9]*/ns/net 2>/dev/null || true; } \
        | awk -v i="$inode" '$1 == i {split($2, p, "/"); print p[3]}'
}

cgroup_pids() {  # PIDs in the pods' cgroups (containers run in their own network namespaces)
    local d
    while read -r d; do
        if [ -d "$d" ]; then find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null || true; fi
    done < <(cgroup_dirs) | sort -un
}

stop_containers() {  # every task SIGKILLed and deleted, every container deleted
    ours containerd >/dev/null || return 0
    local ids id i
    ids=$(ctr_ tasks ls -q 2>/dev/null) || return 0
    [ -z "$ids" ] || log "stopping $(echo "$ids" | wc -l) container tasks"
    for id in $ids; do ctr_ tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    for ((i = 0; i < 50; i++)); do
        ctr_ tasks ls 2>/dev/null | awk 'NR > 1 && $3 != "STOPPED"' | grep . >/dev/null || break
        sleep 0.1
    done
    for id in $ids; do ctr_ tasks delete -f "$id" >/dev/null 2>&1 || true; done
    for id in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$id" >/dev/null 2>&1 || true; done
}

down_all() {
    local d pids
    stop_one kubelet
    stop_containers
    for d in "${DAEMONS_STOP_ORDER[@]:1}"; do stop_one "$d"; done
    if [ -d "$W/cp" ]; then "$HERE/control_plane.sh" stop "$W/cp" || true; fi
    # What is still in the node's network namespace or the pods' cgroups was started by the node
    # (a shim, a container's process). The namespace counts only while it is the one `up` made.
    pids=$(cgroup_pids)
    if [ -e "/run/netns/$NS" ] && [ "$(stat -L -c %i "/run/netns/$NS")" = "$(cat "$W/netns.inode" 2>/dev/null)" ]; then
        pids="$pids $(netns_pids)"
    fi
    pids=$(echo $pids)
    if [ -n "$pids" ]; then
        log "killing what is left in the node's namespaces: $(echo $pids)"
        kill -KILL $pids 2>/dev/null || true
        wait_gone 10 $pids || log "WARNING: still alive: $(echo $pids)"
    fi
    if [ -s "$W/netns.inode" ] && [ -e "/run/netns/$NS" ]; then
        ip netns del "$NS" || log "WARNING: ip netns del $NS failed"
    fi
    rm -rf "/etc/netns/$NS"
    if [ "$(cat "$W/netns-mount-made" 2>/dev/null)" = 1 ] && mountpoint -q /run/netns \
        && [ -z "$(ls -A /run/netns)" ]; then
        umount /run/netns && rmdir /run/netns 2>/dev/null || true
    fi
    remove_cgroups
    log "namespace and cgroups removed"
    if [ -f "$W/made-dirs" ]; then
        tac "$W/made-dirs" | while read -r d; do
            [ ! -e "$d" ] || rmdir "$d" 2>/dev/null || log "WARNING: $d is not empty"
        done
    fi
    rm -rf "$W/containerd" "$W/kubelet" "$W/kubelet-pki" "$W/cni" "$W/cni-ipam" "$W/localpv" \
        "$W/host" "$W/sysctl" "$W/volume-plugins" "$W/env" "$W/kubeconfig" "$W/api-forward.port"
    # kept for `check`: netns.inode, netns-mount-made, made-dirs (`up` starts them anew)
}

remove_cgroups() {  # depth first; a cgroup whose last task just died may take a moment to go
    local d i
    while read -r d; do
        [ -d "$d" ] || continue
        for ((i = 0; i < 50; i++)); do
            find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
            [ -d "$d" ] || break
            sleep 0.1
        done
        [ ! -d "$d" ] || log "WARNING: cgroup $d could not be removed"
    done < <(cgroup_dirs)
}

# --- check: what a run left behind ----------------------------------------------------------------
check() {
    local problems=() d p pids line
    for d in "${DAEMONS_STOP_ORDER[@]}"; do
        if p=$(ours "$d"); then problems+=("process $d (pid $p)"); fi
    done
    [ ! -f "$W/cp/kube-apiserver.pid" ] || problems+=("control plane pid files in $W/cp")
    for p in $(netns_pids) $(cgroup_pids); do
        problems+=("process $p in the node's namespace or cgroups: $(tr '\0' ' ' 2>/dev/null < "/proc/$p/cmdline" | cut -c1-120)")
    done
    for p in /proc/[0-9]*; do
        [ "${p#/proc/}" != $$ ] || continue
        if tr '\0' ' ' 2>/dev/null < "$p/cmdline" | grep -E -- "(--config|--root-dir|--kubeconfig|-address|--env|--port-file) $W/" >/dev/null; then
            problems+=("process ${p#/proc/}: $(tr '\0' ' ' 2>/dev/null < "$p/cmdline" | cut -c1-120)")
        fi
    done
    [ ! -e "/run/netns/$NS" ] || problems+=("network namespace $NS")
    [ ! -e "/etc/netns/$NS" ] || problems+=("/etc/netns/$NS")
    if [ "$(cat "$W/netns-mount-made" 2>/dev/null)" = 1 ] && mountpoint -q /run/netns && [ -z "$(ls -A /run/netns)" ]; then
        problems+=("the mount of /run/netns that ip netns add made")
    fi
    while read -r line; do problems+=("mount: $line"); done < <(
        awk -v w="$W/" -v ns="/run/netns/$NS" 'index($5, w) == 1 || $5 == ns {print $5}' /proc/self/mountinfo
        for d in "${HOST_DIRS[@]}"; do awk -v d="$d" '$5 == d {print $5}' /proc/self/mountinfo; done)
    while read -r d; do [ ! -d "$d" ] || problems+=("cgroup $d"); done < <(cgroup_dirs)
    if [ -f "$W/made-dirs" ]; then
        while read -r d; do [ ! -e "$d" ] || problems+=("directory $d"); done < "$W/made-dirs"
    fi
    if [ ${#problems[@]} -gt 0 ]; then
        printf 'left behind: %s\n' "${problems[@]}"
        return 1
    fi
    echo "nothing left behind by $W"
}

status() {
    local d rc=0 p
    for d in "${DAEMONS_STOP_ORDER[@]}"; do
        if p=$(ours "$d"); then echo "$d: running (pid $p)"; else echo "$d: not running"; rc=1; fi
    done
    "$HERE/control_plane.sh" status "$W/cp" || rc=1
    return "$rc"
}

case "$CMD" in
    up) up "$@" ;;
    down)
        [ "$(id -u)" = 0 ] || die "needs root"
        BIN=${SHARDQ_K8S_BIN:-}
        mkdir -p "$W"
        down_all
        log "down ($W; logs kept)"
        ;;
    check) check ;;
    status) status ;;
    tag)  # tag SOURCE TARGET: another name for an image containerd holds (an "upgrade" offline)
        [ $# -eq 2 ] || die "usage: real_node.sh tag WORKDIR SOURCE TARGET"
        ctr_ images tag --force "$1" "$2" >/dev/null
        echo "$2"
        ;;
    _mount_namespace) mount_namespace ;;
    *) usage ;;
esac
