"""A slot's whole state, out of one engine and into another (DESIGN §5 "moving a slot").

``export`` gives the records (snapshot format, records.py) that rebuild the
slots on an empty engine: id counter, queue settings, jobs in every state with
their leases, DLQ order, results, crons. ``apply_drop`` (record DROP) removes
every trace of a slot: the source after the move, and the target before an
import (so a repeated import starts clean). No I/O here.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from shardq.wire.slots import SLOTS, slot_of

from . import records as R
from .jobs import DEAD, ID_MASK, WAITING, BlobRef, Job
from .snapshot import compact_records, job_state

if TYPE_CHECKING:
    from .engine import Engine


def slot_jobs(engine: Engine, slots: Collection[int]) -> dict[int, Job]:
    """Every live job of ``slots`` kept as a ``Job``, by id (ready heaps, DLQs, and the
    engine-wide indexes; compact ones are in their queues' lanes)."""
    found: dict[int, Job] = {}
    jobs = engine.jobs
    for name in _queues(engine, slots):
        q = engine.queues[name]
        for key in q.ready:
            job = jobs.get(key & ID_MASK)
            if job is not None and job.state is WAITING and job.queue is q:
                found[job.id] = job
        for job in q.dlq.values():
            found[job.id] = job
    for jid in engine.active:
        if jid % SLOTS in slots:
            found[jid] = jobs[jid]
    for key in engine.timers.delayed:
        job = jobs.get(key & ID_MASK)
        if job is not None and job.queue.slot in slots:
            found[job.id] = job
    for jid in engine.deps.children:
        if jid % SLOTS in slots and jid in jobs:
            found[jid] = jobs[jid]
    return found


def _queues(engine: Engine, slots: Collection[int]) -> list[str]:
    return [name for s in slots for name in sorted(engine.slot_queues.get(s, ()))]


def export(engine: Engine, slots: Collection[int]) -> list[R.Record]:
    """The records that rebuild ``slots`` (blob payloads still as BlobRef: the caller inlines)."""
    now = engine.clock()
    out: list[R.Record] = [(R.SLOT, now, s, engine.seqs[s]) for s in sorted(slots)
                           if engine.seqs[s]]
    for name in _queues(engine, slots):
        q = engine.queues[name]
        if q.paused or q.rate or q.concurrency:
            out.append((R.QUEUE, now, name, q.settings()))
    out.extend(_compact(engine, slots, now))
    found = slot_jobs(engine, slots)
    for jid in sorted(found):
        job = found[jid]
        if job.state is not DEAD:
            out.append((R.JOB, now, job.queue.name, job_state(engine, job)))
    for name in _queues(engine, slots):
        for job in engine.queues[name].dlq.values():  # oldest death first
            out.append((R.JOB, now, name, job_state(engine, job)))
    for jid, done in engine.finished.items():
        if jid % SLOTS in slots:
            out.append((R.FINISHED, done.at, jid, done.state.value, done.result))
    for cron, entry in sorted(engine.crons.entries.items()):
        if slot_of(entry["queue"]) in slots:
            out.append((R.CRON, now, cron, dict(entry)))
    for parent, children in sorted(engine.deps.watchers.items()):
        if parent % SLOTS in slots:
            out.extend((R.WATCH, now, parent, child) for child in sorted(children))
    return out


def _compact(engine: Engine, slots: Collection[int], now: int) -> list[R.Record]:
    """The CJOBS records of the slots' compact jobs, in JSON form (an EXPORT answer's)."""
    out: list[R.Record] = []
    for name in _queues(engine, slots):
        for lane in engine.queues[name].lanes:
            if lane.live:
                out.extend(compact_records(name, lane, now, packed=False))
    return out


def apply_drop(engine: Engine, rec: R.Record) -> None:
    """DROP [16, t, [slot, ...]]: forget everything of these slots (ids stay issued)."""
    slots = set(rec[2])
    found = slot_jobs(engine, slots)
    for job in found.values():
        engine.jobs.pop(job.id, None)
        lease = engine.active.pop(job.id, None)
        if lease is not None and lease.owner > 0:
            held = engine.owned.get(lease.owner)
            if held is not None:
                held.discard(job.id)
                if not held:
                    del engine.owned[lease.owner]
        if type(job.data) is BlobRef:
            engine.dropped_blobs.append(job.id)
        else:
            engine.payload_bytes -= len(job.data)
        engine.deps.children.pop(job.id, None)
    deps = engine.deps.dependents
    for parent in [p for p in deps if p % SLOTS in slots]:
        del deps[parent]
    engine.deps.drop(slots)
    for jid in [j for j in engine.finished if j % SLOTS in slots]:
        result = engine.finished.pop(jid).result
        if result is not None:
            engine.result_bytes -= len(result)
    for name in _queues(engine, slots):
        for lane in engine.queues[name].lanes:
            engine.payload_bytes -= sum(len(d) for d in lane.data if d is not None)
        del engine.queues[name]
    for s in slots:
        engine.slot_queues.pop(s, None)
    for cron in [c for c, e in engine.crons.entries.items() if slot_of(e["queue"]) in slots]:
        del engine.crons.entries[cron]
