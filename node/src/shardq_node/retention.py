"""What a node forgets, and when: empty queues once idle, finished jobs past the window.

Queues: a queue left with no job in any state, no unique key and no setting
costs memory and holds nothing durable. ``note_emptied`` marks it when it may
have become so (a job finished, a setting cleared, a push refused);
``reclaim_queues`` forgets those still empty ``queue_idle_ms`` later (no record:
there is nothing to replay), and rebuilds the engine's dicts once they hold a
quarter of their peak (a dict never shrinks by itself). Results: ``remember``
keeps finished jobs within ``results_max`` and ``results_max_bytes``, oldest
forgotten first (``results_ttl_ms`` is enforced by the timers). The numbers
are in docs/limits.md. No I/O here.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from shardq.errors import LimitReached

if TYPE_CHECKING:
    from .engine import Engine
    from .jobs import Finished, QueueState


def new_queue(engine: Engine, name: str) -> QueueState:
    """``engine.queue(name)`` for a client's command: refused past ``max_queues``."""
    q = engine.queues.get(name)
    if q is None:
        limit = engine.config.max_queues
        if len(engine.queues) >= limit:
            raise LimitReached(f"this node holds {limit} queues (max_queues, --max-queues)")
        q = engine.queue(name)
    return q


def note_emptied(engine: Engine, q: QueueState, now: int) -> None:
    """``q`` may now be empty: a candidate from ``now`` on (the newest last)."""
    emptied = engine.emptied
    emptied[q.name] = now
    emptied.move_to_end(q.name)


def reclaim_queues(engine: Engine) -> int:
    """Forget the queues empty, with no settings, for ``queue_idle_ms``; how many."""
    now, idle = engine.clock(), engine.config.queue_idle_ms
    emptied, queues = engine.emptied, engine.queues
    dropped = 0
    while emptied:
        name, since = next(iter(emptied.items()))
        if now - since < idle:
            break
        del emptied[name]
        q = queues.get(name)
        if q is not None and q.is_empty():
            del queues[name]
            names = engine.slot_queues[q.slot]
            names.discard(name)
            if not names:
                del engine.slot_queues[q.slot]
            dropped += 1
    if dropped and len(queues) * 4 < engine.queues_peak:
        engine.queues = dict(queues)
        engine.emptied = OrderedDict(emptied)
        engine.slot_queues = {slot: set(names) for slot, names in engine.slot_queues.items()}
        engine.queues_peak = len(queues)
    return dropped


def remember(engine: Engine, job_id: int, done: Finished) -> None:
    """Keep a finished job's outcome, forgetting the oldest past the window's limits."""
    finished, config = engine.finished, engine.config
    finished[job_id] = done
    if done.result is not None:
        engine.result_bytes += len(done.result)
    while finished and (len(finished) > config.results_max
                        or engine.result_bytes > config.results_max_bytes):
        forget_oldest(engine)


def forget_oldest(engine: Engine) -> None:
    """Drop the oldest remembered outcome."""
    _, done = engine.finished.popitem(last=False)
    if done.result is not None:
        engine.result_bytes -= len(done.result)
