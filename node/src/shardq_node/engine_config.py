"""The job-model settings of a node's engine (``EngineConfig``): leases, backoff, retention,
and the bounds on queues and crons. A node's flags fill it (``settings.py``).

Must not: import the engine (the engine imports this).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    """Job-model settings of a node (all times in ms)."""

    #: Lease of an active job that has no ``timeout`` of its own; TOUCH/PROGRESS extend it.
    default_lease_ms: int = 30 * 60 * 1000
    #: Retry delays are ``backoff * 2**(n-1)``, capped here (or at ``backoff`` if larger).
    max_backoff_ms: int = 60 * 60 * 1000
    #: Results (and the final state) of finished jobs are kept this many / this long, and
    #: while their results hold at most ``results_max_bytes`` (the oldest go first).
    results_max: int = 100_000
    results_ttl_ms: int = 24 * 60 * 60 * 1000
    results_max_bytes: int = 256 * 1024 * 1024
    #: Queues a node holds at once: a push or setting that would make one more is refused.
    max_queues: int = 100_000
    #: A queue empty, with no settings, for this long is forgotten (counters with it).
    queue_idle_ms: int = 60_000
    #: Crons a node holds (each fires at most once a second).
    max_crons: int = 1_000
    #: Keep plain waiting jobs compact (jobs.Lane); False: a ``Job`` each (to compare).
    compact: bool = True
