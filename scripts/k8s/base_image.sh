#!/usr/bin/env bash
# Make `FROM python:3.11-slim` buildable with podman when no container registry is reachable.
#
# Debootstraps a minimal Debian bookworm root filesystem with Python 3.11 from the machine's own
# Debian mirror, imports it into podman as localhost/shardq/python:3.11-bookworm and tags it
# docker.io/library/python:3.11-slim, so shardq's Dockerfiles build unmodified with
#   podman build --pull=never --network=none ...
# Does nothing (in about a second) when python:3.11-slim is already in podman's store.
#
# Usage:  scripts/k8s/base_image.sh        # prints the image name on stdout
# Then, for every podman/buildah call:   export CONTAINERS_CONF=$PWD/scripts/k8s/containers.conf
#
# Environment:
#   CONTAINERS_CONF        default: containers.conf beside this script
#   SHARDQ_BASE_IMAGE      the image built here (default localhost/shardq/python:3.11-bookworm)
#   SHARDQ_BASE_REBUILD    1 = debootstrap and import again even if the image exists
#
# Needs root (debootstrap, podman's root store in /var/lib/containers). Cold: about a minute.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HERE/containers.conf}
IMAGE=${SHARDQ_BASE_IMAGE:-localhost/shardq/python:3.11-bookworm}
TAG=docker.io/library/python:3.11-slim
REBUILD=${SHARDQ_BASE_REBUILD:-0}
SUITE=bookworm   # Debian 12: its python3 is 3.11
PACKAGES=(podman buildah runc debootstrap uidmap slirp4netns fuse-overlayfs debian-archive-keyring)

log() { printf '[base_image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap and podman's root image store)"

missing=()
for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get -o DPkg::Lock::Timeout=300 -qq update
    DEBIAN_FRONTEND=noninteractive timeout 1200 apt-get -o DPkg::Lock::Timeout=300 -y -qq \
        install --no-install-recommends "${missing[@]}" >/dev/null
fi
log "using CONTAINERS_CONF=$CONTAINERS_CONF"

# --- cached? -----------------------------------------------------------------------------------
if [ "$REBUILD" != 1 ]; then
    if timeout 60 podman image exists "$TAG"; then
        log "cached: $TAG is present ($(timeout 60 podman image inspect --format '{{.Id}}' "$TAG" | cut -c1-12))"
        echo "$TAG"
        exit 0
    fi
    if timeout 60 podman image exists "$IMAGE"; then
        log "cached: $IMAGE is present; tagging it $TAG"
        timeout 60 podman tag "$IMAGE" "$TAG"
        echo "$TAG"
        exit 0
    fi
fi

# --- debootstrap -------------------------------------------------------------------------------
MIRROR=""
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
fi
if [ -z "$MIRROR" ] && [ -f /etc/apt/sources.list ]; then
    MIRROR=$(awk '$1=="deb" && $0 !~ /security/ {for(i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' \
        /etc/apt/sources.list)
fi
[ -n "$MIRROR" ] || die "cannot find this machine's Debian mirror in /etc/apt"

ROOTFS=$(mktemp -d /var/tmp/shardq-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
log "debootstrap $SUITE from $MIRROR into $ROOTFS (~1 min)"
t0=$SECONDS
if ! timeout 1200 debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates,netbase \
        "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1; then
    tail -n 30 "$ROOTFS.log" >&2
    [ -f "$ROOTFS/debootstrap/debootstrap.log" ] && tail -n 30 "$ROOTFS/debootstrap/debootstrap.log" >&2
    die "debootstrap failed (log: $ROOTFS.log)"
fi
rm -f "$ROOTFS.log"
log "debootstrap took $((SECONDS - t0)) s"

# Make it behave like the official python:3.11-slim where Dockerfiles notice:
# `python` on PATH, plain `pip install` allowed (no PEP 668 marker), no apt caches.
ln -sf /usr/bin/python3 "$ROOTFS/usr/local/bin/python"
ln -sf /usr/bin/python3 "$ROOTFS/usr/local/bin/python3"
rm -f "$ROOTFS"/usr/lib/python3*/EXTERNALLY-MANAGED
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/lib/apt/lists/*
PYVER=$(chroot "$ROOTFS" python3 -c 'import platform; print(platform.python_version())')
case "$PYVER" in 3.11.*) ;; *) die "the rootfs has Python $PYVER, expected 3.11" ;; esac

log "importing as $IMAGE (Python $PYVER)"
tar --numeric-owner -C "$ROOTFS" -c . | timeout 600 podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "ENV PYTHON_VERSION=$PYVER" \
    --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
    --change 'LABEL io.shardq.base-image=debootstrap-bookworm-python3.11' \
    --change 'CMD ["python3"]' \
    --message "shardq base image: debootstrap $SUITE minbase + python3 $PYVER" \
    - "$IMAGE" >/dev/null
timeout 60 podman tag "$IMAGE" "$TAG"
log "done: $TAG -> $IMAGE"
echo "$TAG"
