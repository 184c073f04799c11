"""Dumping and loading an engine's whole state as snapshot records (records.py).

``dump`` yields the records that rebuild the engine (or one slot of it) when
fed to ``Engine.apply`` on an empty engine: the snapshot file and a slot move
export are both this stream. No I/O here.
"""

from __future__ import annotations

import heapq
from collections.abc import Container, Iterator
from typing import TYPE_CHECKING

from shardq.wire.job import State

from . import records as R
from . import retention
from .jobs import (
    ACTIVE,
    DEAD,
    DELAYED,
    NOBODY,
    PLAIN,
    WAITING,
    WAITING_CHILDREN,
    BlobRef,
    Finished,
    Job,
    JobOpts,
    Lease,
)

if TYPE_CHECKING:
    from .engine import Engine

_STATES = {s.value: s for s in State}


def _in(slots: Container[int] | None, slot: int) -> bool:
    return slots is None or slot in slots


def dump(engine: Engine, slots: Container[int] | None = None) -> Iterator[R.Record]:
    """Yield SLOT, QUEUE, JOB, FINISHED, CRON and WATCH records for ``slots`` (None: all),
    and for the whole engine its term history (TERMS)."""
    now = engine.clock()
    if slots is None and engine.terms:
        yield (R.TERMS, now, [list(t) for t in engine.terms])
    for slot, seq in enumerate(engine.seqs):
        if seq and _in(slots, slot):
            yield (R.SLOT, now, slot, seq)
    for q in engine.queues.values():
        if _in(slots, q.slot) and (q.paused or q.rate or q.concurrency):
            yield (R.QUEUE, now, q.name, q.settings())
    yield from _jobs(engine, slots, now)
    for jid, done in engine.finished.items():
        if _in(slots, jid % 1024):
            yield (R.FINISHED, done.at, jid, done.state.value, done.result)
    yield from _crons_and_watches(engine, slots, now)


def _jobs(engine: Engine, slots: Container[int] | None, now: int) -> Iterator[R.Record]:
    for job in engine.jobs.values():
        if job.state is not DEAD and _in(slots, job.queue.slot):
            yield (R.JOB, now, job.queue.name, job_state(engine, job))
    for q in engine.queues.values():
        if _in(slots, q.slot):
            for job in q.dlq.values():  # oldest death first, as the DLQ answers
                yield (R.JOB, now, q.name, job_state(engine, job))


def _crons_and_watches(
    engine: Engine, slots: Container[int] | None, now: int
) -> Iterator[R.Record]:
    from shardq.wire.slots import slot_of

    for name, entry in engine.crons.entries.items():
        if _in(slots, slot_of(entry["queue"])):
            yield (R.CRON, now, name, dict(entry))
    for parent, children in engine.deps.watchers.items():
        if _in(slots, parent % 1024):
            for child in sorted(children):
                yield (R.WATCH, now, parent, child)


def job_state(engine: Engine, job: Job) -> list[object]:
    o = job.opts
    pending = sorted(engine.deps.children.get(job.id, ()))
    blob = type(job.data) is BlobRef
    return [
        job.id, None if blob else job.data, job.priority, job.created_at, job.run_at,
        job.started_at, job.attempts, job.state.value, o.max_attempts, o.backoff, o.ttl, o.timeout,
        o.unique_key, list(o.depends_on), o.progress, o.progress_msg, o.error, pending,
        job.data.size if blob else 0,
    ]


def load_job(engine: Engine, rec: R.Record) -> None:
    _, _now, queue, row = rec
    (jid, data, prio, created, run_at, started, attempts, state, max_att, backoff, ttl,
     timeout, key, deps, progress, msg, error, pending, blob) = row
    q = engine.queue(queue)
    if blob:
        data = BlobRef(blob)
    else:
        engine.payload_bytes += len(data)
    if max_att or backoff or ttl or timeout or key is not None or deps or progress or msg \
            or error:
        opts = JobOpts(max_att, backoff, ttl, timeout, key, tuple(deps))
        opts.progress, opts.progress_msg, opts.error = progress, msg, error
    else:
        opts = PLAIN
    job = Job(jid, q, data, prio, created, run_at, opts)
    job.started_at = started
    job.attempts = attempts
    job.state = _STATES[state]
    engine.jobs[jid] = job
    seq, slot = divmod(jid, 1024)
    engine.seqs[slot] = max(engine.seqs[slot], seq)
    if key is not None:
        q.unique[key] = jid
    if ttl and started == 0:
        engine.timers.expire_at(created + ttl, jid)
    _index(engine, job, pending)


def _index(engine: Engine, job: Job, pending: list[int]) -> None:
    q = job.queue
    state = job.state
    if state is WAITING:
        q.n_waiting += 1
        heapq.heappush(q.ready, job.ready_key())
    elif state is DELAYED:
        q.n_delayed += 1
        engine.timers.delay(job.run_at, job.id)
    elif state is WAITING_CHILDREN:
        q.n_children += 1
        engine.deps.children[job.id] = set(pending)
        for parent in pending:
            if parent % 1024 == job.id % 1024:
                engine.deps.dependents.setdefault(parent, []).append(job.id)
    elif state is ACTIVE:
        q.n_active += 1
        deadline = job.started_at + (job.opts.timeout or engine.config.default_lease_ms)
        engine.active[job.id] = Lease(NOBODY, deadline)
        engine.timers.deadline(deadline, job.id)
    elif state is DEAD:
        q.dlq[job.id] = job


def load_finished(engine: Engine, rec: R.Record) -> None:
    _, at, jid, state, result = rec
    retention.remember(engine, jid, Finished(_STATES[state], at, result))
    seq, slot = divmod(jid, 1024)
    engine.seqs[slot] = max(engine.seqs[slot], seq)
