#!/usr/bin/env bash
# A real, throwaway Kubernetes control plane on loopback for shardq's end-to-end tests:
# etcd (Debian's etcd-server) + kube-apiserver v1.20.2 (https, static bearer token, RBAC)
# + kube-controller-manager (Deployment, ReplicaSet, StatefulSet, Job, endpoints, garbage
# collector, namespace, ... controllers). No scheduler and no kubelet: Pods stay Pending.
#
# With SHARDQ_CP_NODE_IP set, it is the control plane of a real node instead (the real-node tier,
# scripts/k8s/node.sh, which runs this script inside its private network namespace): the apiserver
# listens on every address of that namespace and advertises SHARDQ_CP_NODE_IP (the endpoint of the
# `kubernetes` Service, so pods reach it through kube-proxy), pods get service-account tokens
# (ServiceAccount admission and the token controller on), and kube-scheduler runs too.
#
# Usage:
#   scripts/k8s/control_plane.sh start  WORKDIR   # fresh cluster; prints WORKDIR/kubeconfig on stdout
#   scripts/k8s/control_plane.sh stop   WORKDIR   # stops exactly the processes recorded in WORKDIR
#   scripts/k8s/control_plane.sh status WORKDIR   # exit 0 if all three are running
#
# `start` first stops whatever an earlier `start` left recorded in WORKDIR, wipes its state and
# brings up a new empty cluster. It writes:
#   WORKDIR/kubeconfig   admin (system:masters) token, CA-verified https://127.0.0.1:PORT
#   WORKDIR/env          shell lines: KUBECONFIG, SHARDQ_K8S_SERVER, SHARDQ_K8S_TOKEN, SHARDQ_K8S_CA, ports
#   WORKDIR/pki/         ca.crt (+ keys), the apiserver's serving cert, the service-account key pair
#   WORKDIR/{etcd,kube-apiserver,kube-controller-manager}.{pid,log}
# `stop` keeps the *.log files and removes everything else.
#
# Environment:
#   SHARDQ_K8S_BIN            dir with kube-apiserver + kube-controller-manager (+ kube-scheduler
#                             with SHARDQ_CP_NODE_IP) (default: the build_kube.sh cache; built on
#                             first use if missing)
#   SHARDQ_CP_NODE_IP         the real node's address: see above (default: unset, loopback only)
#   SHARDQ_K8S_CACHE          that cache (default ~/.cache/shardq/k8s-bin)
#   SHARDQ_ETCD_PORT, SHARDQ_ETCD_PEER_PORT, SHARDQ_APISERVER_PORT, SHARDQ_KCM_PORT
#                             loopback ports (default: free ports picked at start)
#   SHARDQ_CP_TIMEOUT         seconds to wait for each component to become ready (default 90)
#   SHARDQ_CP_STOP_GRACE      seconds between SIGTERM and SIGKILL on stop (default 10)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
COMPONENTS_STOP_ORDER=(kube-scheduler kube-controller-manager kube-apiserver etcd)
NODE_IP=${SHARDQ_CP_NODE_IP:-}
TIMEOUT=${SHARDQ_CP_TIMEOUT:-90}
GRACE=${SHARDQ_CP_STOP_GRACE:-10}

log() { printf '[control_plane %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
usage() { echo "usage: $0 start|stop|status WORKDIR" >&2; exit 2; }

[ $# -eq 2 ] || usage
CMD=$1
W=$(realpath -m "$2")
[ "$W" != / ] || die "refusing to use / as WORKDIR"

# --- process bookkeeping ---------------------------------------------------------------------
# A PID file holds one PID. Before signalling it we check that the process is still the one we
# started: its command line must name WORKDIR (every component gets paths inside WORKDIR), so a
# recycled PID is never touched.
ours() {  # ours NAME -> prints the PID if WORKDIR/NAME.pid names a live process of this WORKDIR
    local f="$W/$1.pid" pid
    [ -f "$f" ] || return 1
    pid=$(cat "$f")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" | grep -F -- "$W/" >/dev/null || return 1
    # a zombie has exited already
    [ "$(awk '/^State:/{print $2}' "/proc/$pid/status" 2>/dev/null)" != Z ] || return 1
    echo "$pid"
}

alive() { [ -d "/proc/$1" ] && [ "$(awk '/^State:/{print $2}' "/proc/$1/status" 2>/dev/null)" != Z ]; }

stop_one() {  # stop_one NAME: SIGTERM, wait up to GRACE s, SIGKILL, wait up to 10 s
    local name=$1 pid i
    if pid=$(ours "$name"); then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < GRACE * 10; i++)); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then
            log "$name (pid $pid) still running after ${GRACE}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.1; done
            alive "$pid" && log "WARNING: $name (pid $pid) did not die"
        fi
    fi
    rm -f "$W/$name.pid"
}

stop_all() {
    local c
    for c in "${COMPONENTS_STOP_ORDER[@]}"; do stop_one "$c"; done
    # state that is worthless without the processes; logs stay for post-mortems
    rm -rf "$W/etcd-data" "$W/pki" "$W/tokens.csv" "$W/kubeconfig" "$W/kcm-kubeconfig" "$W/env" "$W/kcm-certs" \
        "$W/scheduler-certs"
}

status() {
    local c rc=0 pid
    local components=(etcd kube-apiserver kube-controller-manager)
    [ -z "$NODE_IP" ] || components+=(kube-scheduler)
    for c in "${components[@]}"; do
        if pid=$(ours "$c"); then echo "$c: running (pid $pid)"; else echo "$c: not running"; rc=1; fi
    done
    return "$rc"
}

# --- helpers for start -----------------------------------------------------------------------
need_packages() {  # install Debian packages that are missing
    local missing=() p
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "missing Debian packages: ${missing[*]} (run as root, or install them)"
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get -o DPkg::Lock::Timeout=300 -qq update
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get -o DPkg::Lock::Timeout=300 -y -qq \
        install --no-install-recommends "${missing[@]}" >/dev/null
}

free_port() {  # a TCP port nothing listens on at 127.0.0.1 right now
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

port_in_use() {  # port_in_use PORT
    python3 - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.settimeout(0.5)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
PY
}

pick_port() {  # pick_port VALUE_OR_EMPTY EXCLUDED...
    local want=$1 p
    shift
    if [ -n "$want" ] && [ "$want" != 0 ]; then
        port_in_use "$want" && die "port 127.0.0.1:$want is already in use"
        echo "$want"
        return
    fi
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        p=$(free_port)
        case " $* " in *" $p "*) continue ;; esac
        echo "$p"
        return
    done
    die "could not find a free loopback port"
}

launch() {  # launch NAME CMD...: background, stdin /dev/null, output to NAME.log, PID to NAME.pid,
            # without our lock fd 9 (or the daemon would hold WORKDIR/.lock for its lifetime)
    local name=$1
    shift
    "$@" </dev/null >"$W/$name.log" 2>&1 9>&- &
    local pid=$! i
    echo "$pid" > "$W/$name.pid"
    # Until the forked child has exec'd, its cmdline is this script's: wait for the exec so that
    # `ours` (and with it wait_for and stop) recognises the process from here on.
    for ((i = 0; i < 100; i++)); do
        ours "$name" >/dev/null && break
        alive "$pid" || break   # exited at once: wait_for reports it with its log
        sleep 0.05
    done
    log "started $name (pid $pid, log $W/$name.log)"
}

wait_for() {  # wait_for NAME WHAT URL REGEX CURL_ARGS...: until URL's body matches REGEX, NAME dies, or TIMEOUT
    local name=$1 what=$2 url=$3 want=$4 t0=$SECONDS
    shift 4
    while :; do
        if ! ours "$name" >/dev/null; then
            tail -n 30 "$W/$name.log" >&2 || true
            die "$name exited during start (log: $W/$name.log)"
        fi
        if curl -fsS --max-time 2 "$@" "$url" 2>/dev/null | grep -qE "$want"; then
            log "$name: $what after $((SECONDS - t0)) s"
            return 0
        fi
        if ((SECONDS - t0 >= TIMEOUT)); then
            tail -n 30 "$W/$name.log" >&2 || true
            die "$name not ready after ${TIMEOUT}s at $url (log: $W/$name.log)"
        fi
        sleep 0.25
    done
}

make_pki() {
    local p="$W/pki"
    mkdir -p "$p"
    chmod 700 "$p"
    # A CA of our own, so clients verify the apiserver's certificate (no insecure-skip-tls-verify,
    # no urllib3 warnings in tests).
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=shardq-test-ca" \
        -keyout "$p/ca.key" -out "$p/ca.crt" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
        -keyout "$p/apiserver.key" -out "$p/apiserver.csr" 2>/dev/null
    printf '%s\n' \
        "basicConstraints=CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth" \
        "subjectKeyIdentifier=hash" \
        "authorityKeyIdentifier=keyid,issuer" \
        "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local${NODE_IP:+,IP:$NODE_IP}" \
        > "$p/apiserver.ext"
    openssl x509 -req -in "$p/apiserver.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial \
        -days 365 -extfile "$p/apiserver.ext" -out "$p/apiserver.crt" 2>/dev/null
    # service-account token signing key pair
    openssl genrsa -out "$p/sa.key" 2048 2>/dev/null
    openssl rsa -in "$p/sa.key" -pubout -out "$p/sa.pub" 2>/dev/null
    rm -f "$p/apiserver.csr" "$p/apiserver.ext" "$p/ca.srl"
}

write_kubeconfig() {  # write_kubeconfig FILE SERVER TOKEN
    local ca
    ca=$(base64 -w0 < "$W/pki/ca.crt")
    touch "$1"
    chmod 600 "$1"
    cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: shardq-e2e
  cluster:
    server: $2
    certificate-authority-data: $ca
users:
- name: shardq-admin
  user:
    token: $3
contexts:
- name: shardq-e2e
  context:
    cluster: shardq-e2e
    user: shardq-admin
    namespace: default
current-context: shardq-e2e
EOF
}

start() {
    mkdir -p "$W"
    exec 9>"$W/.lock"
    flock -w 60 9 || die "another control_plane.sh holds $W/.lock"

    if ours etcd >/dev/null || ours kube-apiserver >/dev/null || ours kube-controller-manager >/dev/null \
        || ours kube-scheduler >/dev/null; then
        log "an earlier control plane is recorded in $W: stopping it first"
    fi
    stop_all
    rm -f "$W"/*.log

    need_packages etcd-server openssl curl
    command -v python3 >/dev/null || die "python3 is needed (to pick free ports)"

    local bin=${SHARDQ_K8S_BIN:-}
    if [ -z "$bin" ]; then
        bin=$(realpath -m "${SHARDQ_K8S_CACHE:-$HOME/.cache/shardq/k8s-bin}")
        if [ ! -x "$bin/kube-apiserver" ] || [ ! -x "$bin/kube-controller-manager" ] \
            || { [ -n "$NODE_IP" ] && [ ! -x "$bin/kube-scheduler" ]; }; then
            log "no cached Kubernetes binaries: running build_kube.sh (~5 min, once)"
            bin=$("$HERE/build_kube.sh")
        fi
    fi
    local apiserver="$bin/kube-apiserver" kcm="$bin/kube-controller-manager" scheduler="$bin/kube-scheduler"
    [ -x "$apiserver" ] || die "no kube-apiserver in $bin (run scripts/k8s/build_kube.sh)"
    [ -x "$kcm" ] || die "no kube-controller-manager in $bin (run scripts/k8s/build_kube.sh)"
    [ -z "$NODE_IP" ] || [ -x "$scheduler" ] || die "no kube-scheduler in $bin (run scripts/k8s/build_kube.sh)"

    # Loopback only (the test kubelet tier), or a real node's control plane (see the header).
    local bind=127.0.0.1 advertise=127.0.0.1 api_mode=(--disable-admission-plugins ServiceAccount)
    local controllers='*,-serviceaccount-token'
    if [ -n "$NODE_IP" ]; then
        bind=0.0.0.0 advertise=$NODE_IP controllers='*'
        # the kubelet's name (node1) resolves nowhere: logs and exec go to its InternalIP
        api_mode=(--kubelet-preferred-address-types InternalIP)
    fi

    # Anything going wrong from here on stops what was started.
    trap 'rc=$?; if [ $rc -ne 0 ]; then log "start failed: stopping what was started"; stop_all; fi' EXIT

    local etcd_port peer_port api_port kcm_port sched_port
    etcd_port=$(pick_port "${SHARDQ_ETCD_PORT:-}")
    peer_port=$(pick_port "${SHARDQ_ETCD_PEER_PORT:-}" "$etcd_port")
    api_port=$(pick_port "${SHARDQ_APISERVER_PORT:-}" "$etcd_port" "$peer_port")
    kcm_port=$(pick_port "${SHARDQ_KCM_PORT:-}" "$etcd_port" "$peer_port" "$api_port")
    sched_port=$(pick_port "" "$etcd_port" "$peer_port" "$api_port" "$kcm_port")
    log "ports: etcd $etcd_port (peer $peer_port), kube-apiserver $api_port, kube-controller-manager $kcm_port"

    make_pki
    local token server="https://127.0.0.1:$api_port"
    token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
    (umask 077 && echo "$token,shardq-admin,shardq-admin,system:masters" > "$W/tokens.csv")

    # etcd: a fresh data dir per start, so every run begins with an empty cluster.
    mkdir -p "$W/etcd-data"
    chmod 700 "$W/etcd-data"
    launch etcd etcd --name shardq-e2e --data-dir "$W/etcd-data" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" \
        --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-cluster "shardq-e2e=http://127.0.0.1:$peer_port" \
        --initial-cluster-state new --log-level warn
    wait_for etcd "/health ok" "http://127.0.0.1:$etcd_port/health" '"health": ?"true"'

    launch kube-apiserver "$apiserver" \
        --etcd-servers "http://127.0.0.1:$etcd_port" \
        --bind-address "$bind" --advertise-address "$advertise" \
        --secure-port "$api_port" --insecure-port 0 \
        --tls-cert-file "$W/pki/apiserver.crt" --tls-private-key-file "$W/pki/apiserver.key" \
        --client-ca-file "$W/pki/ca.crt" \
        --token-auth-file "$W/tokens.csv" --authorization-mode RBAC \
        --service-account-issuer https://kubernetes.default.svc \
        --service-account-key-file "$W/pki/sa.pub" \
        --service-account-signing-key-file "$W/pki/sa.key" \
        --service-cluster-ip-range 10.0.0.0/24 \
        "${api_mode[@]}" \
        --enable-priority-and-fairness=false \
        --allow-privileged=true \
        --profiling=false
    write_kubeconfig "$W/kubeconfig" "$server" "$token"
    wait_for kube-apiserver "/readyz ok" "$server/readyz" '^ok' --cacert "$W/pki/ca.crt" -H "Authorization: Bearer $token"

    # The controller manager serves /healthz on its own loopback port (self-signed cert; /healthz is
    # always allowed; no delegated authn/authz: nothing but /healthz is needed there). Off the
    # real node, serviceaccount-token is off, like the ServiceAccount admission plugin, so Pods
    # need no token secrets.
    launch kube-controller-manager "$kcm" \
        --kubeconfig "$W/kubeconfig" \
        --leader-elect=false \
        --port 0 --bind-address 127.0.0.1 --secure-port "$kcm_port" --cert-dir "$W/kcm-certs" \
        --service-account-private-key-file "$W/pki/sa.key" --root-ca-file "$W/pki/ca.crt" \
        --controllers "$controllers" \
        --profiling=false
    wait_for kube-controller-manager "/healthz ok" "https://127.0.0.1:$kcm_port/healthz" '^ok' -k
    # /healthz answers before the controllers run; the serviceaccount controller creating
    # default/default shows they do (the others start in the same second).
    wait_for kube-controller-manager "controllers running (ServiceAccount default/default exists)" \
        "$server/api/v1/namespaces/default/serviceaccounts/default" '"kind": ?"ServiceAccount"' \
        --cacert "$W/pki/ca.crt" -H "Authorization: Bearer $token"

    if [ -n "$NODE_IP" ]; then
        launch kube-scheduler "$scheduler" \
            --kubeconfig "$W/kubeconfig" \
            --leader-elect=false \
            --port 0 --bind-address 127.0.0.1 --secure-port "$sched_port" --cert-dir "$W/scheduler-certs" \
            --profiling=false
        wait_for kube-scheduler "/healthz ok" "https://127.0.0.1:$sched_port/healthz" '^ok' -k
    fi

    cat > "$W/env" <<EOF
export KUBECONFIG=$W/kubeconfig
export SHARDQ_K8S_SERVER=$server
export SHARDQ_K8S_TOKEN=$token
export SHARDQ_K8S_CA=$W/pki/ca.crt
export SHARDQ_ETCD_PORT=$etcd_port
export SHARDQ_APISERVER_PORT=$api_port
export SHARDQ_KCM_PORT=$kcm_port
EOF
    chmod 600 "$W/env"
    trap - EXIT
    log "control plane up: $server (kubeconfig $W/kubeconfig; stop: $0 stop $W)"
    echo "$W/kubeconfig"
}

case "$CMD" in
    start) start ;;
    stop)
        if [ -d "$W" ]; then
            exec 9>"$W/.lock"
            # stop must work even if something wedged the lock: warn and go on
            flock -w 60 9 || log "WARNING: $W/.lock still held after 60 s; stopping anyway"
            stop_all
            rm -f "$W/.lock"
        fi
        log "stopped ($W)"
        ;;
    status) status ;;
    *) usage ;;
esac
