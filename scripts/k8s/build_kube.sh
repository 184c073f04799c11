#!/usr/bin/env bash
# Build the Kubernetes v1.20.2 binaries offline from Debian's `kubernetes` source package, for
# shardq's end-to-end Kubernetes tiers, and cache them: kube-apiserver and kube-controller-manager
# (the test kubelet tier, tests/test_e2e_k8s.py), and kube-scheduler, kubelet, kube-proxy and
# kubectl (the real-node tier, tests/e2e/). All of them come out of ONE `make`: they share most of
# their packages (client-go, apimachinery, the API types), so each package compiles once.
#
# No registry this project can reach ships these binaries, but Debian's source package carries
# the whole tree with vendor/, so it builds with Debian's Go and nothing else.
#
# Usage:  scripts/k8s/build_kube.sh            # log lines on stderr, the binary dir on stdout
#         BIN=$(scripts/k8s/build_kube.sh)
#
# Environment:
#   SHARDQ_K8S_CACHE     where the binaries are cached   (default ~/.cache/shardq/k8s-bin)
#   SHARDQ_K8S_SRC       where the source is unpacked    (default /var/tmp/shardq-k8s-src)
#   SHARDQ_K8S_KEEP_SRC  1 = keep the ~2 GB source/build tree after a successful build (default 0)
#   SHARDQ_K8S_REBUILD   1 = ignore the cache and build again
#
# Cold: ~7 min on 2 cores (plus apt downloads the first time). Cached: well under a second.
# Needs root for apt-get (only when packages or the deb-src entry are missing).
set -euo pipefail

CACHE=$(realpath -m "${SHARDQ_K8S_CACHE:-$HOME/.cache/shardq/k8s-bin}")
SRC=$(realpath -m "${SHARDQ_K8S_SRC:-/var/tmp/shardq-k8s-src}")
KEEP_SRC=${SHARDQ_K8S_KEEP_SRC:-0}
REBUILD=${SHARDQ_K8S_REBUILD:-0}
KUBE_VERSION=v1.20.2
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
# Bump RECIPE when the way the binaries are built changes: the cache is keyed on it.
RECIPE="shardq-k8s-build-2 $KUBE_VERSION ${BINARIES[*]} reflect2=debian"
STAMP="$CACHE/BUILD_INFO"
APT_LOCK_WAIT=300        # seconds apt waits for another apt/dpkg to finish
APT_TIMEOUT=1200         # seconds any one apt-get call may take
BUILD_TIMEOUT=3600       # seconds `make` may take (cold is ~7 min on 2 cores)

log() { printf '[build_kube %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

cached() {
    [ -f "$STAMP" ] && [ "$(head -n1 "$STAMP")" = "$RECIPE" ] || return 1
    local b
    for b in "${BINARIES[@]}"; do [ -x "$CACHE/$b" ] || return 1; done
}

if [ "$REBUILD" != 1 ] && cached; then
    log "cached: ${BINARIES[*]} $KUBE_VERSION in $CACHE"
    echo "$CACHE"
    exit 0
fi

# One build at a time per cache dir (two CI jobs on one machine must not build into each other).
mkdir -p "$(dirname "$CACHE")"
exec 9>"$CACHE.lock"
log "waiting for the build lock $CACHE.lock (at most 3600 s)"
flock -w 3600 9 || die "another build holds $CACHE.lock for more than an hour"
if [ "$REBUILD" != 1 ] && cached; then   # built by whoever held the lock before us
    log "cached (built by a concurrent run): $CACHE"
    echo "$CACHE"
    exit 0
fi

[ "$(id -u)" = 0 ] || log "not root: apt-get steps will fail if anything is missing"
APT_UPDATED=0
apt_get() {
    if [ "$1" = update ]; then
        [ "$APT_UPDATED" = 0 ] || return 0
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive timeout "$APT_TIMEOUT" \
        apt-get -o DPkg::Lock::Timeout="$APT_LOCK_WAIT" -y -qq "$@"
}

# --- 1. a deb-src entry for the mirror this machine already uses -------------------------------
debian_mirror() {
    local m=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        m=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
        m=$(awk '$1=="deb" && $0 !~ /security/ {for(i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' \
            /etc/apt/sources.list)
    fi
    [ -n "$m" ] || die "cannot find this machine's Debian mirror in /etc/apt/sources.list{,.d/debian.sources}"
    echo "$m"
}
# shellcheck source=/dev/null
CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
if ! apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes'; then
    MIRROR=$(debian_mirror)
    log "adding deb-src for $MIRROR $CODENAME (/etc/apt/sources.list.d/shardq-debsrc.sources)"
    printf 'Types: deb-src\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$MIRROR" "$CODENAME" > /etc/apt/sources.list.d/shardq-debsrc.sources
    log "apt-get update"
    apt_get update
    apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes' \
        || die "Debian $CODENAME has no 'kubernetes' source package on $MIRROR"
fi

# --- 2. build dependencies ---------------------------------------------------------------------
REFLECT2=/usr/share/gocode/src/github.com/modern-go/reflect2
DEPS=(golang-go dpkg-dev make rsync golang-github-modern-go-reflect2-dev)
missing=()
for p in "${DEPS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt_get update
    apt_get install --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -f "$REFLECT2/go_above_118.go" ] || die "Debian's reflect2 (>= 1.0.2) not found in $REFLECT2"
log "go: $(go version)"

# --- 3. source ---------------------------------------------------------------------------------
mkdir -p "$SRC"
cd "$SRC"
tree=$(find . -maxdepth 1 -type d -name 'kubernetes-*' -print -quit)
if [ -z "$tree" ] || [ ! -f "$tree/.shardq-unpacked" ]; then
    [ -z "$tree" ] || { log "removing a partly unpacked $SRC/$tree"; rm -rf "$tree"; }
    log "apt-get source kubernetes into $SRC (~100 MB download, unpacks to ~1 GB)"
    rm -f kubernetes_*
    timeout "$APT_TIMEOUT" apt-get source -qq kubernetes >&2
    tree=$(find . -maxdepth 1 -type d -name 'kubernetes-*' -print -quit)
    [ -n "$tree" ] || die "apt-get source kubernetes left no kubernetes-* directory in $SRC"
    rm -f kubernetes_*        # the .orig tarballs: the unpacked tree is all we need
    touch "$tree/.shardq-unpacked"
else
    log "reusing unpacked source $SRC/${tree#./}"
fi
cd "$tree"
[ -f cmd/kube-apiserver/apiserver.go ] || die "$PWD does not look like a Kubernetes tree"

# The vendored reflect2 v1.0.1 crashes the apiserver under Go >= 1.18 ("fatal error: fault" in
# mapiterinit on the first custom-resource write); Debian's 1.0.2 is API-compatible and fixed.
V=vendor/github.com/modern-go/reflect2
if [ ! -f "$V/go_above_118.go" ]; then
    log "replacing vendored reflect2 with Debian's ($REFLECT2)"
    rm -f "$V"/*.go "$V"/*.s
    cp "$REFLECT2"/*.go "$V"/
    if compgen -G "$REFLECT2/*.s" >/dev/null; then cp "$REFLECT2"/*.s "$V"/; fi
fi

# --- 4. build (make, not `go build`: the tree expects its hack/ GOPATH setup) ------------------
mkdir -p .go/src/k8s.io
[ -L .go/src/k8s.io/kubernetes ] || ln -s ../../.. .go/src/k8s.io/kubernetes
export GOPATH=$PWD/.go GOPROXY=off CGO_ENABLED=0
export KUBE_GIT_VERSION=$KUBE_VERSION KUBE_GIT_TREE_STATE=clean
what=""
for b in "${BINARIES[@]}"; do what="$what cmd/$b"; done
what=${what# }
log "make WHAT='$what' (cold: ~7 min on 2 cores; log: $SRC/make.log)"
start=$SECONDS
if ! timeout "$BUILD_TIMEOUT" make WHAT="$what" >"$SRC/make.log" 2>&1; then
    tail -n 40 "$SRC/make.log" >&2
    die "make failed (full log: $SRC/make.log)"
fi
log "make finished in $((SECONDS - start)) s"

# --- 5. install into the cache atomically ------------------------------------------------------
tmp=$(mktemp -d "$CACHE.new.XXXXXX")
chmod 755 "$tmp"
for b in "${BINARIES[@]}"; do
    [ -x "_output/bin/$b" ] || die "make did not produce _output/bin/$b"
    cp "_output/bin/$b" "$tmp/$b"
    if [ "$b" = kubectl ]; then
        ver=$("$tmp/$b" version --client --short 2>&1 | head -n1)
    else
        ver=$("$tmp/$b" --version 2>&1 | head -n1)
    fi
    log "$b: $ver"
    case "$ver" in *"$KUBE_VERSION"*) ;; *) die "$b reports '$ver', expected $KUBE_VERSION" ;; esac
done
{
    echo "$RECIPE"
    echo "source: $(basename "$PWD") from Debian $CODENAME"
    echo "go: $(go version)"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
} > "$tmp/BUILD_INFO"
rm -rf "$CACHE.old"
[ ! -e "$CACHE" ] || mv "$CACHE" "$CACHE.old"
mv "$tmp" "$CACHE"
rm -rf "$CACHE.old"

if [ "$KEEP_SRC" != 1 ]; then
    log "removing the build tree $SRC (set SHARDQ_K8S_KEEP_SRC=1 to keep it)"
    cd /
    rm -rf "$SRC"
fi
log "done: $CACHE"
echo "$CACHE"
