#!/usr/bin/env bash
# The SDK alone (DESIGN §1): `pip install ./sdk` into an empty virtualenv gives the `shardq`
# command and the client library with orjson as their only dependency, and no server code.
#
#   scripts/sdk_only.sh        # prints what was installed and what works; exit 0 = it holds
#
# Works on a copy of sdk/ in a temporary directory (the checkout stays clean) and needs an
# index for orjson and the build tools (PyPI or pip's configured mirror). Checks:
#   1. pip list: shardq and orjson, besides pip's own tools;
#   2. `shardq --help` works and names the server sub-commands it lacks;
#   3. `shardq node` fails with status 2 and says which distribution brings it;
#   4. `import shardq` works; `import shardq_node` (and every server package) fails.
# Environment: PYTHON (default python3, 3.11 or newer).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fail() { echo "FAILED: $*" >&2; exit 1; }
step() { printf '\n== %s\n' "$*"; }

# the sdk/ folder as committed (the working tree's version of each file git tracks): no
# build products (egg-info, the compiled hot path's .so files)
mkdir "$tmp/src"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z sdk | xargs -0 tar -c) | tar -x -C "$tmp/src"
else
    cp -r "$ROOT/sdk" "$tmp/src/sdk"
    rm -rf "$tmp/src/sdk/build" "$tmp/src/sdk"/src/*.egg-info
    find "$tmp/src/sdk" -name '*.so' -delete
fi
"$PY" -m venv "$tmp/venv"
venv_py="$tmp/venv/bin/python"

step "pip install ./sdk"
(cd "$tmp/src" && "$venv_py" -m pip install -q --disable-pip-version-check ./sdk)

step "pip list"
"$venv_py" -m pip list --disable-pip-version-check
extra=$("$venv_py" -m pip list --disable-pip-version-check --format=freeze \
        | cut -d= -f1 | tr 'A-Z_' 'a-z-' | grep -vxE 'shardq|orjson|pip|setuptools|wheel' || true)
[ -z "$extra" ] || fail "installed besides shardq and orjson: $(echo $extra)"
requires=$("$venv_py" -m pip show --disable-pip-version-check shardq | grep '^Requires:')
[ "$requires" = "Requires: orjson" ] || fail "shardq: $requires (only orjson expected)"

step "shardq --help"
"$tmp/venv/bin/shardq" --help | tee "$tmp/help.txt"
grep -q "push" "$tmp/help.txt" || fail "shardq --help lists no push"
grep -q "pip install shardq-node" "$tmp/help.txt" || fail "shardq --help does not say what node needs"

step "shardq node (needs shardq-node)"
status=0
"$tmp/venv/bin/shardq" node --port 0 2>"$tmp/node.txt" || status=$?
cat "$tmp/node.txt"
[ "$status" = 2 ] || fail "shardq node exited with $status, not 2"
grep -q "shardq-node" "$tmp/node.txt" || fail "shardq node does not name shardq-node"

step "python -c 'import shardq'"
"$venv_py" -c 'import shardq, shardq.wire.commands; print("imported", shardq.__file__)'

step "python -c 'import shardq_node' (must fail)"
for package in shardq_node shardq_server shardq_gateway shardq_operator; do
    if "$venv_py" -c "import $package" 2>"$tmp/import.txt"; then
        fail "import $package worked in an SDK-only install"
    fi
    tail -n 1 "$tmp/import.txt"
done

printf '\nOK: the SDK alone is shardq and orjson; the server packages are absent\n'
