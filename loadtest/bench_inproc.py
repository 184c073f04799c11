"""In-process measurements: the engine and the command path without sockets.

``engine_memory`` pushes jobs into a bare ``Engine`` the way ``commands.py``
does (per push one ``JobSpec`` and the payload bytes ``Commands.payload``
makes; the journal drained after each push as the runtime does) and counts
the bytes with ``tracemalloc``.
``engine_rate`` and ``execute_rate`` time the same work without tracemalloc:
the ceiling the node's Python code allows before any socket is involved.

Must not: open sockets or start processes.
"""

from __future__ import annotations

import gc
import linecache
import sys
import time
import tracemalloc
from typing import Any

from shardq.wire.protocol import JobSpec
from shardq_node.engine import Engine
from shardq_node.jobs import Job
from shardq_node.runtime import Node, wall_clock_ms
from shardq_node.settings import NodeSettings


def _push_many(engine: Engine, queue: str, data: Any, n: int) -> int:
    """Push ``n`` single jobs as ``Commands.push`` does (its own payload encoder); the last
    job's id."""
    push = engine.push
    encode = Node(NodeSettings(), clock=wall_clock_ms).commands.payload
    last = 0
    for _ in range(n):
        payload = encode(data)  # the bytes the job keeps, made as the node makes them
        last = push(queue, [JobSpec(data)], [payload])[0]
        engine.journal = []  # as Node.flush() drains it after each batch
    return last


def engine_memory(data: Any, n: int) -> dict[str, Any]:
    """Bytes per waiting job in a bare Engine, by tracemalloc, and the top allocation sites."""
    engine = Engine(wall_clock_ms)
    _push_many(engine, "warm", data, 100)
    gc.collect()
    tracemalloc.start()
    try:
        first = tracemalloc.take_snapshot()
        before = tracemalloc.get_traced_memory()[0]
        last_id = _push_many(engine, "bench.mem", data, n)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        last = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    sites = []
    for stat in last.compare_to(first, "lineno")[:6]:
        frame = stat.traceback[0]
        code = linecache.getline(frame.filename, frame.lineno).strip()
        sites.append({
            "where": f"{_short(frame.filename)}:{frame.lineno}", "code": code,
            "bytes_per_job": stat.size_diff / n,
        })
    job = engine.get_job(last_id)
    assert isinstance(job, Job)
    return {
        "jobs": n, "bytes": after - before, "bytes_per_job": (after - before) / n,
        "payload_len": len(job.data), "payload_getsizeof": sys.getsizeof(job.data),
        "sites": sites,
    }


def _short(path: str) -> str:
    for marker in ("/loadtest/", "/node/", "/sdk/"):
        i = path.rfind(marker)
        if i >= 0:
            return path[i + 1 :]
    return path


def engine_rate(data: Any, n: int) -> float:
    """Engine.push of single jobs, jobs/s (no parsing, no sockets)."""
    engine = Engine(wall_clock_ms)
    _push_many(engine, "warm", data, min(n, 1000))
    gc.collect()
    t0 = time.perf_counter()
    _push_many(engine, "bench.rate", data, n)
    return n / (time.perf_counter() - t0)


class Caller:
    """The caller ``Node.execute`` gets from a TCP session: authenticated, no subscriptions."""

    owner = 1
    authed = True
    pending_rid: str | int | None = None

    def __init__(self) -> None:
        self.subscriptions: dict[str, frozenset[str]] = {}


def execute_rate(line: bytes, lines: int, chunk: int, jobs_per_line: int = 1) -> float:
    """Node.execute over request lines as a TCP session runs them, jobs/s (no sockets).

    Lines are run ``chunk`` at a time, then the journal is flushed and the
    answers joined, as ``Session._run`` does after each read.
    """
    node = Node(NodeSettings(), clock=wall_clock_ms)
    caller = Caller()
    execute = node.execute
    batch = [line] * chunk
    rounds = max(1, lines // chunk)
    for _ in range(max(1, rounds // 10)):  # warm-up
        b"".join([execute(x, caller) or b"" for x in batch])
        node.flush()
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(rounds):
        out = [execute(x, caller) for x in batch]
        node.flush()
        b"".join([o or b"" for o in out])
    return rounds * chunk * jobs_per_line / (time.perf_counter() - t0)
