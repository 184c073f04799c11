#!/usr/bin/env bash
# Build build/pkg/shardq: a tree of symlinks laid out as the installed package
# (sdk/* as shardq/*, node/ as shardq/node, ...). mypy and import-linter read
# packages from directories, and cannot follow pyproject's package-dir mapping.
set -euo pipefail
cd "$(dirname "$0")/.."
root=build/pkg/shardq
rm -rf build/pkg
mkdir -p "$root"
for f in sdk/*.py; do ln -s "../../../$f" "$root/$(basename "$f")"; done
for d in node gateway operator; do ln -s "../../../$d" "$root/$d"; done
