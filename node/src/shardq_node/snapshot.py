"""Dumping and loading an engine's whole state as snapshot records (records.py).

``dump`` yields the records that rebuild the engine (or one slot of it) when
fed to ``Engine.apply`` on an empty engine: the snapshot file and a slot move
export are both this stream. No I/O here.
"""

from __future__ import annotations

import heapq
from array import array
from base64 import b64decode, b64encode
from collections.abc import Container, Iterator, Sequence
from itertools import accumulate, islice
from operator import le, lt
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
    Lane,
    Lease,
    QueueState,
    lane_for,
)

if TYPE_CHECKING:
    from .engine import Engine

_STATES = {s.value: s for s in State}
#: compact jobs per CJOBS record (about 2.7 MB of record for 200-byte payloads)
CHUNK = 8192


def _in(slots: Container[int] | None, slot: int) -> bool:
    return slots is None or slot in slots


def dump(engine: Engine, slots: Container[int] | None = None, expand: bool = False
         ) -> Iterator[R.Record]:
    """Yield SLOT, QUEUE, CJOBS (packed: see ``compact_records``), JOB, FINISHED, CRON and
    WATCH records for ``slots`` (None: all), and for the whole engine its term history
    (TERMS). ``expand``: compact jobs as JOB records too (one record per job whatever its
    form, to compare states)."""
    now = engine.clock()
    if slots is None and engine.terms:
        yield (R.TERMS, now, [list(t) for t in engine.terms])
    for slot, seq in enumerate(engine.seqs):
        if seq and _in(slots, slot):
            yield (R.SLOT, now, slot, seq)
    for q in engine.queues.values():
        if _in(slots, q.slot) and (q.paused or q.rate or q.concurrency):
            yield (R.QUEUE, now, q.name, q.settings())
    yield from _jobs(engine, slots, now, expand)
    for jid, done in engine.finished.items():
        if _in(slots, jid % 1024):
            yield (R.FINISHED, done.at, jid, done.state.value, done.result)
    yield from _crons_and_watches(engine, slots, now)


def _jobs(engine: Engine, slots: Container[int] | None, now: int, expand: bool
          ) -> Iterator[R.Record]:
    for q in engine.queues.values():
        if not _in(slots, q.slot):
            continue
        for lane in q.lanes:
            if lane.live and not expand:
                yield from compact_records(q.name, lane, now)
                continue
            for jid, run_at, data in lane.entries():
                job = Job(jid, q, data, lane.priority, run_at, run_at, PLAIN)
                yield (R.JOB, now, q.name, job_state(engine, job))
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


def compact_records(queue: str, lane: Lane, now: int, packed: bool = True
                    ) -> Iterator[R.Record]:
    """The CJOBS records of a lane's live jobs, in its order (records.py); ``packed``: the
    snapshot file's form (ids, run_ats, sizes and payloads as one binary body, written by
    ``wal.frame_packed``), else the JSON form (a slot move's)."""
    h = lane.head
    ids, times, data = lane.ids, lane.times, lane.data
    for start in range(h, len(data), CHUNK):
        end = min(start + CHUNK, len(data))
        chunk = data[start:end]
        if chunk.count(None):  # jobs left from the middle (rare)
            keep = [i for i in range(start, end) if data[i] is not None]
            if not keep:
                continue
            c_ids = array("q", [ids[i] for i in keep])
            c_times = array("q", [times[i] for i in keep])
        else:
            c_ids, c_times = ids[start:end], times[start:end]
        payloads = [d for d in chunk if d is not None]
        sizes = array("q", [len(d) for d in payloads])
        joined = b"".join(payloads)
        if packed:
            body = b"".join((c_ids.tobytes(), c_times.tobytes(), sizes.tobytes(), joined))
            yield (R.CJOBS, now, queue, lane.priority, len(payloads), body)
        else:
            yield (R.CJOBS, now, queue, lane.priority, c_ids.tolist(), c_times.tolist(),
                   sizes.tolist(), b'"%b"' % b64encode(joined))


def _columns(rec: R.Record) -> tuple[Sequence[int], Sequence[int], Sequence[int], bytes, bool]:
    """A CJOBS record's ids, run_ats, sizes and joined payloads, from either form, and
    whether it came packed (from a snapshot file this node's lanes wrote, in order)."""
    if len(rec) == 6:  # packed: [106, t, queue, priority, count, body]
        count, body = rec[4], rec[5]
        if not isinstance(body, bytes) or type(count) is not int or len(body) < 24 * count:
            raise ValueError("CJOBS: body shorter than its count")
        view = memoryview(body)
        cols = []
        for i in range(3):
            col: array[int] = array("q")
            col.frombytes(view[8 * count * i : 8 * count * (i + 1)])
            cols.append(col)
        return cols[0], cols[1], cols[2], body[24 * count :], True
    _, _now, _queue, _priority, ids, times, sizes, text = rec
    return ids, times, sizes, b64decode(text), False


def load_compact(engine: Engine, rec: R.Record) -> None:
    """CJOBS: compact waiting jobs, appended to their queue's lane in bulk (each one that
    does not fit behind what the lane holds is made a full job instead)."""
    queue, priority = rec[2], rec[3]
    ids, times, sizes, raw, packed = _columns(rec)
    ends = list(accumulate(sizes))
    if len(ids) != len(times) or len(ids) != len(sizes) or (ends[-1] if ends else 0) != len(raw):
        raise ValueError("CJOBS: ids, run_ats, sizes and payloads do not match")
    if not ids:
        return
    data = list(map(raw.__getitem__, map(slice, [0, *ends[:-1]], ends)))
    q = engine.queue(queue)
    lane = lane_for(q, priority) if engine.compact else None
    if lane is not None and lane.fits(priority, times[0], ids[0]) and (packed or (
            all(map(lt, ids, islice(ids, 1, None)))
            and all(map(le, times, islice(times, 1, None))))):
        if not lane.live:
            lane.clear()
            lane.priority = priority
        lane.extend(ids, times, data)
        q.n_waiting += len(ids)
    else:
        for jid, run_at, payload in zip(ids, times, data, strict=True):
            _waiting(engine, q, jid, priority, run_at, payload)
    engine.payload_bytes += len(raw)
    seq, slot = divmod(ids[-1] if packed else max(ids), 1024)
    engine.seqs[slot] = max(engine.seqs[slot], seq)


def _waiting(engine: Engine, q: QueueState, jid: int, priority: int, run_at: int,
             data: bytes) -> None:
    """A plain job never pulled, waiting: compact if it fits the lane, else a full job."""
    lane = lane_for(q, priority) if engine.compact else None
    q.n_waiting += 1
    if lane is not None and lane.fits(priority, run_at, jid):
        lane.add(jid, run_at, data)
        return
    job = Job(jid, q, data, priority, run_at, run_at, PLAIN)
    engine.jobs[jid] = job
    heapq.heappush(q.ready, job.ready_key())


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
    seq, slot = divmod(jid, 1024)
    engine.seqs[slot] = max(engine.seqs[slot], seq)
    if state == WAITING.value and not (blob or started or attempts or pending) \
            and created == run_at and not (max_att or backoff or ttl or timeout or deps) \
            and key is None and not (progress or msg or error):
        engine.payload_bytes += len(data)
        _waiting(engine, q, jid, prio, run_at, data)  # a plain waiting job: compact
        return
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
