"""The SDK alone (DESIGN §1): ``pip install ./sdk`` into an empty virtualenv, through
scripts/sdk_only.sh, gives the ``shardq`` command and library with orjson as their only
dependency, and no server package.

Needs a package index for orjson and the build tools: without one, a skip on a laptop and a
failure in CI.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ..helpers import missing

ROOT = Path(__file__).resolve().parents[2]
#: what pip says when it cannot reach an index (as opposed to a packaging mistake)
NO_INDEX = ("Could not find a version", "NewConnectionError", "Network is unreachable",
            "Temporary failure in name resolution", "No matching distribution")


def installed(stdout: str) -> set[str]:
    """The package names of the script's ``pip list`` table."""
    table = stdout.split("== pip list\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return {line.split()[0].lower() for line in table[2:] if line.strip()}


@pytest.mark.packaging
@pytest.mark.timeout(600)
def test_pip_install_sdk_gives_the_shardq_command_with_orjson_alone_and_no_server_code() -> None:
    proc = subprocess.run([str(ROOT / "scripts" / "sdk_only.sh")], capture_output=True,
                          text=True, timeout=540, check=False)
    if proc.returncode != 0 and "FAILED:" not in proc.stderr and any(
            text in proc.stderr for text in NO_INDEX):
        missing(f"no package index for pip install ./sdk: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert installed(proc.stdout) - {"pip", "setuptools", "wheel"} == {"shardq", "orjson"}
    assert "push one job" in proc.stdout  # shardq --help ran
    assert "node: pip install shardq-node" in proc.stdout
    assert "this sub-command comes with the shardq-node distribution" in proc.stdout
    assert "No module named 'shardq_node'" in proc.stdout
