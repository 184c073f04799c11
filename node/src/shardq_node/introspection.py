"""What a node reports about itself: STATS, LISTQUEUES, METRICS (the JSON one) and TOPOLOGY.

Plain functions of the engine (and the storage, for blob counts): read when asked,
nothing kept. The Prometheus exposition is metrics.py's.

Must not: change anything.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Any

from .jobs import DELAYED

if TYPE_CHECKING:
    from .cluster import Cluster
    from .engine import Engine
    from .storage import Storage


def stats(engine: Engine, storage: Storage | None, failed: bool) -> dict[str, Any]:
    """STATS: jobs by state over every queue, memory and blob store use; ``failed``: the
    storage refuses writes."""
    queued = processing = delayed = dlq = children = 0
    for q in engine.queues.values():
        queued += q.n_waiting
        processing += q.n_active
        delayed += q.n_delayed
        children += q.n_children
        dlq += len(q.dlq)
    retrying = sum(1 for key in engine.timers.delayed
                   if (j := engine.jobs.get(key & ((1 << 53) - 1))) is not None
                   and j.state is DELAYED and j.attempts)
    return {
        "queued": queued, "processing": processing, "delayed": delayed, "dlq": dlq,
        "waiting_children": children, "jobs": engine.job_count(), "retrying": retrying,
        "memory_bytes": engine.payload_bytes,
        "blobs": storage.blobs.count if storage else 0,
        "blob_bytes": storage.blobs.used if storage else 0,
        "storage_failed": failed,
        "queues": len(engine.queues), "crons": len(engine.crons.entries),
        "cron_ticks_skipped": engine.crons.skipped,
    }


def list_queues(
    engine: Engine, limit: int, after: str | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """The first ``limit`` queues by name (after ``after``); and whether more remain."""
    queues = engine.queues
    names = (n for n in queues if after is None or n > after)
    page = heapq.nsmallest(limit + 1, names)
    out = []
    for name in page[:limit]:
        q = queues[name]
        out.append({
            "name": name, "pending": q.pending, "processing": q.n_active, "dlq": len(q.dlq),
            "paused": q.paused, "rate_limit": q.rate.limit if q.rate else None,
            "concurrency_limit": q.concurrency or None, "waiting": q.n_waiting,
            "delayed": q.n_delayed, "waiting_children": q.n_children,
        })
    return out, len(page) > limit


def metrics(engine: Engine, now_ms: int, max_queues: int) -> dict[str, Any]:
    """METRICS: totals, the rate and mean run time of the 10 s before ``now_ms``, the first
    ``max_queues`` queues."""
    e = engine
    now_s = now_ms // 1000
    window = [r for r in e.recent if r[0] >= now_s - 10]
    completions = sum(r[1] for r in window)
    run_ms = sum(r[2] for r in window)
    seconds = max(1, min(10, now_s - window[0][0] + 1)) if window else 1
    return {
        "total_pushed": e.total_pushed,
        "total_completed": e.total_completed,
        "total_failed": e.total_failed,
        "jobs_per_second": float(completions) / seconds,
        "avg_latency_ms": float(run_ms) / completions if completions else 0.0,
        "queues": [
            {
                "name": q["name"], "pending": q["pending"], "processing": q["processing"],
                "dlq": q["dlq"], "rate_limit": q["rate_limit"],
            }
            for q in list_queues(engine, max_queues)[0]
        ],
    }


def topology(cluster: Cluster) -> dict[str, Any] | None:
    """TOPOLOGY: the topology this node holds, as the wire carries it (None: standalone)."""
    topo = cluster.topology
    return topo.wire() if topo is not None else None
