#!/usr/bin/env bash
# Build shardq's container image (the Dockerfile at the repository root) with podman, offline.
#
#   scripts/k8s/build_image.sh [TAG]        # default TAG: localhost/shardq:dev; prints it on stdout
#
# 1. scripts/k8s/base_image.sh: makes `FROM python:3.11-slim` resolvable without a registry
#    (cached in podman's store after the first run).
# 2. Wheels on the host, into build/wheels/ (the build context; nothing is fetched inside the
#    build, which runs with --network=none):
#    - deps/: every third-party dependency of shardq's five distributions, pinned to the
#      versions the project's .venv has (scripts/k8s/image_requirements.py). Built again only when the pinned set changes
#      (stamp: deps/.stamp); SHARDQ_WHEELS_REBUILD=1 forces it. Only this step needs PyPI.
#    - build/: setuptools and wheel, so the shardq wheel builds in an isolated env offline.
#    - shardq/: the wheels of shardq, shardq-server, shardq-node, shardq-gateway and
#      shardq-operator, built again when their sources changed (stamp: shardq/.stamp),
#      with SOURCE_DATE_EPOCH fixed, and replaced only when its bytes changed, so podman's layer
#      cache holds when the code did not change.
#    - native/: the hot path compiled with mypyc (scripts/build_native.py --into: the
#      checkout's build, made again when a compiled module changed), laid out like
#      site-packages; the image's build stage puts it beside the installed sources and checks
#      that they are the sources compiled (shardq.native.stamp()). The host's
#      compiler does it: the build runs offline, and the image's Python (3.11, glibc) has the
#      same ABI. Without a C compiler native/ stays empty and the image runs interpreted.
# 3. podman build --pull=never --network=none --format docker (the docker format keeps the
#    HEALTHCHECK; OCI images drop it).
#
# Environment: PYTHON (default .venv/bin/python, must be Python 3.11 like the image),
# CONTAINERS_CONF (default scripts/k8s/containers.conf), SHARDQ_WHEELS_REBUILD=1,
# SHARDQ_IMAGE_NO_CACHE=1 (podman build --no-cache). Needs root (podman's root store).
# Log lines go to stderr; the only stdout line is the image tag. Runs of this script in one
# checkout take turns (flock on build/.image.lock).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
cd "$ROOT"
TAG=${1:-localhost/shardq:dev}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HERE/containers.conf}
PY=${PYTHON:-.venv/bin/python}
WHEELS=build/wheels
export SOURCE_DATE_EPOCH=315532800   # 1980-01-01: reproducible wheel bytes
PIP=(-m pip --disable-pip-version-check -q)

log() { printf '[build_image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [ ! -x "$PY" ] && [ "$PY" = .venv/bin/python ]; then
    log "no .venv: scripts/bootstrap.sh server"
    scripts/bootstrap.sh server >&2
fi
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
    || die "$PY is not Python 3.11 (the image's Python): set PYTHON=..."

# one build at a time per checkout (the image and end-to-end tiers may build concurrently)
mkdir -p build
exec 9>build/.image.lock
flock -w 1800 9 || die "another build_image.sh holds build/.image.lock"

base=$(timeout 1500 "$HERE/base_image.sh") || die "scripts/k8s/base_image.sh failed"
log "base image: $base"

# --- dependency wheels (cached) ----------------------------------------------------------------
mkdir -p "$WHEELS"
"$PY" "$HERE/image_requirements.py" "$WHEELS/spec"
stamp=$(cat "$WHEELS/spec/requirements.txt" "$WHEELS/spec/constraints.txt" | sha256sum | cut -c1-16)
if [ "${SHARDQ_WHEELS_REBUILD:-0}" != 1 ] && [ "$(cat "$WHEELS/deps/.stamp" 2>/dev/null)" = "$stamp" ]; then
    log "dependency wheels cached ($stamp)"
else
    log "building dependency wheels ($stamp)"
    rm -rf "$WHEELS/deps.new" "$WHEELS/build.new"
    if ! { timeout 900 "$PY" "${PIP[@]}" wheel --wheel-dir "$WHEELS/deps.new" \
               -r "$WHEELS/spec/requirements.txt" -c "$WHEELS/spec/constraints.txt" \
           && timeout 600 "$PY" "${PIP[@]}" wheel --wheel-dir "$WHEELS/build.new" \
               "setuptools>=68" wheel; } >"$WHEELS/wheels.log" 2>&1; then
        grep -v "^WARNING: Location" "$WHEELS/wheels.log" | tail -n 40 >&2
        die "pip wheel failed (log: $WHEELS/wheels.log)"
    fi
    echo "$stamp" >"$WHEELS/deps.new/.stamp"
    rm -rf "$WHEELS/deps" "$WHEELS/build"
    mv "$WHEELS/deps.new" "$WHEELS/deps"
    mv "$WHEELS/build.new" "$WHEELS/build"
fi

# --- shardq's wheels (offline; again only when their sources changed) -----------------------
DISTRIBUTIONS=(sdk server node gateway operator)
srchash=$(tar -c --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
              --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
              --exclude='*.so' --exclude=_hotpath.json \
              "${DISTRIBUTIONS[@]}" | sha256sum | cut -c1-16)
if [ "$(cat "$WHEELS/shardq/.stamp" 2>/dev/null)" = "$srchash" ] && ls "$WHEELS"/shardq/*.whl >/dev/null 2>&1; then
    log "shardq wheels cached ($srchash)"
else
    # from a copy of the sources: setuptools builds in-tree and its build/lib keeps deleted modules
    tmp=$(mktemp -d "$ROOT/build/wheel.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    mkdir "$tmp/src" "$tmp/out"
    tar -c --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' --exclude='*.so' \
        --exclude=_hotpath.json "${DISTRIBUTIONS[@]}" | tar -x -C "$tmp/src"
    for dist in "${DISTRIBUTIONS[@]}"; do
        if ! timeout 300 "$PY" "${PIP[@]}" wheel --no-deps --no-index \
                --find-links "$ROOT/$WHEELS/build" --wheel-dir "$tmp/out" "$tmp/src/$dist" \
                >"$tmp/wheel.log" 2>&1; then
            tail -n 40 "$tmp/wheel.log" >&2
            die "building the wheel of $dist/ failed"
        fi
    done
    mkdir -p "$WHEELS/shardq"
    for have in "$WHEELS"/shardq/*.whl; do   # a wheel no distribution builds any more
        [ -e "$have" ] && [ ! -f "$tmp/out/$(basename "$have")" ] && rm -f "$have"
    done
    for new in "$tmp"/out/*.whl; do
        old="$WHEELS/shardq/$(basename "$new")"
        if [ -f "$old" ] && cmp -s "$new" "$old"; then
            log "wheel unchanged: $(basename "$new")"   # keeps its mtime: the layer cache holds
        else
            mv "$new" "$WHEELS/shardq/"
            log "wheel: $(basename "$new") ($srchash)"
        fi
    done
    echo "$srchash" >"$WHEELS/shardq/.stamp"
fi

# --- the compiled hot path (mypyc; empty without a C compiler) ---------------------------------
log "compiled hot path: scripts/build_native.py --into $WHEELS/native"
timeout 1200 "$PY" scripts/build_native.py --into "$WHEELS/native" >&2 \
    || die "scripts/build_native.py failed"
touch "$WHEELS/native/.keep"   # COPY needs a file even when nothing was compiled

# --- the image ---------------------------------------------------------------------------------
args=(build --pull=never --network=none --format docker -t "$TAG")
[ "${SHARDQ_IMAGE_NO_CACHE:-0}" = 1 ] && args+=(--no-cache)
before=$(timeout 60 podman image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)
log "podman ${args[*]} ."
if ! timeout 900 podman "${args[@]}" . >"$ROOT/build/image-build.log" 2>&1; then
    tail -n 40 "$ROOT/build/image-build.log" >&2
    die "podman build failed (log: build/image-build.log)"
fi
after=$(timeout 60 podman image inspect --format '{{.Id}}' "$TAG")
if [ -n "$before" ] && [ "$before" != "$after" ] \
        && [ -z "$(timeout 60 podman image inspect --format '{{join .RepoTags ","}}' "$before" 2>/dev/null)" ]; then
    # the image this tag named before, now untagged: ours to drop (fails if a container uses it)
    timeout 60 podman rmi "$before" >/dev/null 2>&1 || true
fi
log "built $TAG ($(timeout 60 podman image inspect --format '{{.Size}}' "$TAG") bytes)"
echo "$TAG"
