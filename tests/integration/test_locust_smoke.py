"""The locust suites run (a few seconds, a real local cluster) with zero failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[2]


def test_locust_smoke_run_has_no_failures() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "loadtest" / "run_locust.py"), "--suite", "smoke"],
        capture_output=True, timeout=180, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    result = orjson.loads(proc.stdout)
    assert result["failures"] == 0
    assert set(result["by_name"]) == {"PUSH", "PULLB", "ACK", "/publish"}
    assert all(r["requests"] > 0 for r in result["by_name"].values())
