"""Schemathesis against the OpenAPI document of a live node: no request it generates may get a
5xx answer or crash a handler.

The node runs in this test's event loop with its real HTTP server on loopback; the
``schemathesis run`` CLI runs as a subprocess against ``/openapi.json`` (every phase: examples,
coverage, fuzzing, stateful), with a fixed seed and a bounded number of examples per operation,
and writes a JSON report that the test reads.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.http_exceptions import HttpProcessingError

from shardq_node.runtime import Node
from shardq_node.settings import NodeSettings
from shardq_server.openapi import document

from ..helpers import free_port, require

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
#: Per operation; ~20 s for the whole run here (all phases, 28 operations).
MAX_EXAMPLES = 25
#: /events (Server-Sent Events) never ends by design: a fuzzer's request to it would hang
#: until its timeout, so it is left out (tests/integration/test_http.py covers it).
EXCLUDED = ("/events",)


async def test_no_operation_of_the_http_api_answers_a_server_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require(SCHEMATHESIS.exists(),
            f"schemathesis is not installed at {SCHEMATHESIS} (pip install -e '.[test]')")
    caplog.set_level(logging.ERROR, logger="aiohttp.server")
    node = Node(NodeSettings(port=0, http_port=free_port(), http_max_pull_wait_ms=200))
    await node.start()
    report_path = tmp_path / "schemathesis.json"
    cmd = [
        str(SCHEMATHESIS), "run", f"http://127.0.0.1:{node.http_port}/openapi.json",
        "--checks", "not_a_server_error",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", "6790",
        "--request-timeout", "5",
        "--suppress-health-check", "all",
        *[arg for path in EXCLUDED for arg in ("--exclude-path", path)],
        "--report", "json", "--report-json-path", str(report_path),
    ]
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 100)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    finally:
        await node.stop()
    seconds = time.monotonic() - started
    output = out.decode(errors="replace")[-6000:]
    assert proc.returncode == 0, output
    report: dict[str, Any] = orjson.loads(report_path.read_bytes())
    # every documented operation but the excluded ones and /openapi.json (schemathesis does not
    # test the operation that serves the schema it loaded)
    documented = sum(len(ops) for path, ops in document()["paths"].items()
                     if path not in (*EXCLUDED, "/openapi.json"))
    operations, cases = report["operations"], report["test_cases"]
    print(f"schemathesis: {operations['tested']} operations, {cases['generated']} cases, "
          f"{len(report['failures'])} failures, {len(report['errors'])} errors in {seconds:.1f}s")
    assert operations["tested"] == documented and operations["errored"] == 0, output
    assert cases["generated"] >= documented * 5, output
    assert (cases["with_failures"], report["failures"], report["errors"]) == (0, [], []), output
    crashes = [r for r in caplog.records if r.exc_info
               and not isinstance(r.exc_info[1], HttpProcessingError)]
    assert not crashes, [r.getMessage() for r in crashes]  # a handler raised: a 500
