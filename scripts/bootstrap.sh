#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install the workspace into it (DESIGN §1): the five
# distributions (sdk, server, node, gateway, operator) editable, plus the workspace's extras.
# Usage: scripts/bootstrap.sh server        # the servers: what `make run` needs
#        scripts/bootstrap.sh server,test   # and the test tools
# Re-installs only when a pyproject.toml changed since the last install. Then compiles the hot
# path with mypyc (scripts/build_native.py: only when a compiled module changed since the last
# build; without a C compiler it says so and the sources run interpreted).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-server}"
py="${PYTHON:-python3}"

if ! "$py" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    echo "shardq needs Python 3.11 or newer as '$py' (set PYTHON=...)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    if ! "$py" -m venv .venv 2>/dev/null; then
        # Debian ships venv/ensurepip separately.
        rm -rf .venv
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-dev >/dev/null
        else
            echo "python3 -m venv failed: install python3-venv (apt-get install python3-venv)" >&2
            exit 1
        fi
        "$py" -m venv .venv
    fi
fi
stamp=".venv/.installed-$extras"
packages=(sdk server node gateway operator)
stale=0
[ -f "$stamp" ] || stale=1
for p in pyproject.toml "${packages[@]/%//pyproject.toml}"; do
    [ "$p" -nt "$stamp" ] && stale=1
done
if [ "$stale" = 1 ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>/dev/null || true
    args=()
    for p in "${packages[@]}"; do args+=(-e "./$p"); done
    extra=${extras//server/}; extra=${extra//,/ }; extra=$(echo native $extra | tr ' ' ',')
    args+=(-e ".[$extra]")
    .venv/bin/python -m pip install -q --disable-pip-version-check "${args[@]}"
    touch "$stamp"
fi
.venv/bin/python scripts/build_native.py
