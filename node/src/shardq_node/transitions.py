"""What each record does to the engine's state: the one code path of live commands and replay.

``Engine`` (engine.py) checks a command and makes its record; the function here
for that record's type changes memory (``Engine.apply`` looks it up by type, and
recovery and a follower call the same). Helpers that move a job between the
state indexes (``make_ready``, ``to_waiting``, ``finish``, ``leave_state``...) are
here too, for the other engine parts (timers.py, dependencies.py) to share.

Functions of the engine (``e``), not methods: the PUSH/START/ACK path costs the
same call as a method's.

Must not: do I/O, read the real time (``now`` comes in the record), refuse (the
checks were made before the record was), or append to the journal.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Any

from shardq.wire.slots import SLOT_BITS

from . import records as R
from . import retention
from .jobs import (
    ACTIVE,
    CANCELLED,
    COMPLETED,
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
    QueueState,
    TokenBucket,
    lane_for,
    ready_key,
)

if TYPE_CHECKING:
    from .engine import Engine

heappush = heapq.heappush


# -- jobs in ------------------------------------------------------------------------------------


def apply_push(e: Engine, rec: R.Record) -> list[int]:
    """PUSH: new jobs, waiting (inline here: the hot path), delayed or waiting for parents.
    A plain job due now that fits its queue's lane is kept compact (jobs.Lane): no ``Job``."""
    _, now, queue, rows = rec
    q = e.queues.get(queue) or e.queue(queue)
    seqs = e.seqs
    jobs = e.jobs
    ready = q.ready
    compact = e.compact
    lane = q.lanes[0] if q.lanes else None
    out = []
    for row in rows:
        jid, data, prio, run_at, max_att, backoff, ttl, timeout, key, deps, blob = row
        seq = jid >> SLOT_BITS
        if seq > seqs[q.slot]:
            seqs[q.slot] = seq
        out.append(jid)
        plain = not (max_att or backoff or ttl or timeout or key is not None or deps)
        if blob:
            data = BlobRef(blob)
        else:
            e.payload_bytes += len(data)
            if plain and run_at == now and compact:
                if lane is None or lane.priority != prio:
                    lane = lane_for(q, prio)
                if lane is not None and lane.fits(prio, now, jid):
                    lane.add(jid, now, data)
                    q.n_waiting += 1
                    continue
        opts = PLAIN if plain else JobOpts(max_att, backoff, ttl, timeout, key, tuple(deps or ()))
        job = Job(jid, q, data, prio, now, run_at, opts)
        jobs[jid] = job
        if opts is not PLAIN or run_at > now:
            _push_options(e, q, job, now)
        if job.state is WAITING:
            q.n_waiting += 1
            heappush(ready, ready_key(prio, run_at, jid))
    if q.n_waiting:
        e.wakeups.add(queue)
    q.pushed += len(rows)
    e.total_pushed += len(rows)
    return out


def _push_options(e: Engine, q: QueueState, job: Job, now: int) -> None:
    """A new job's unique key, ttl, parents and delay (the plain case skips all this)."""
    o = job.opts
    if o.unique_key is not None:
        q.unique[o.unique_key] = job.id
    if o.ttl:
        e.timers.expire_at(now + o.ttl, job.id)
    if o.depends_on and e.deps.wait_for_parents(job, o.depends_on, now):
        return
    if job.run_at > now:
        to_delayed(e, job)


def make_ready(e: Engine, job: Job, now: int) -> None:
    """A job that may run again: waiting if due by ``now``, else delayed until ``run_at``."""
    if job.run_at > now:
        to_delayed(e, job)
    else:
        to_waiting(e, job)


def to_delayed(e: Engine, job: Job) -> None:
    """Into the delayed index until ``job.run_at`` (timers.py promotes it)."""
    job.state = DELAYED
    job.queue.n_delayed += 1
    e.timers.delay(job.run_at, job.id)


def to_waiting(e: Engine, job: Job) -> None:
    """Into its queue's ready heap; a blocked PULL on the queue may now be served. (A push
    does this inline, for a whole batch: ``apply_push``.)"""
    q = job.queue
    job.state = WAITING
    q.n_waiting += 1
    heappush(q.ready, job.ready_key())
    e.wakeups.add(q.name)


# -- jobs out -----------------------------------------------------------------------------------


def apply_start(e: Engine, rec: R.Record) -> None:
    _, now, ids = rec
    default_lease = e.config.default_lease_ms
    observe = e.observe_wait if e.emitting else None
    jobs = e.jobs
    for jid in ids:
        job = jobs.get(jid) or e.unpack(jid)  # pulled compact: made on a replay
        assert job is not None
        if observe is not None:
            observe(max(0, now - job.run_at) / 1000)
        q = job.queue
        q.n_waiting -= 1
        q.n_active += 1
        job.state = ACTIVE
        job.started_at = now if now > job.started_at else job.started_at + 1
        deadline = job.started_at + (job.opts.timeout or default_lease)
        e.active[jid] = Lease(NOBODY, deadline)  # pull() names the holder
        e.timers.deadline(deadline, jid)


def end_attempt(e: Engine, job: Job) -> None:
    lease = e.active.pop(job.id)
    if lease.owner > 0:
        held = e.owned.get(lease.owner)
        if held is not None:
            held.discard(job.id)
            if not held:
                del e.owned[lease.owner]
    q = job.queue
    q.n_active -= 1
    if q.concurrency:
        e.wakeups.add(q.name)


# -- an attempt ends ---------------------------------------------------------------------------


def apply_ack(e: Engine, rec: R.Record) -> None:
    _, now, ids, results = rec
    for i, jid in enumerate(ids):
        job = e.jobs[jid]
        end_attempt(e, job)
        q = job.queue
        q.completed += 1
        e.total_completed += 1
        _note_run(e, now, now - job.started_at)
        if e.observe_run is not None and e.emitting:
            e.observe_run(max(0, now - job.started_at) / 1000)
        finish(e, job, COMPLETED, now, results[i] if results else None)
        e.emit("completed", job)
        e.deps.parent_ended(jid, now, COMPLETED)


def _note_run(e: Engine, now: int, run_ms: int) -> None:
    sec = now // 1000
    recent = e.recent
    if recent and recent[-1][0] == sec:
        s, n, total = recent[-1]
        recent[-1] = (s, n + 1, total + run_ms)
    else:
        recent.append((sec, 1, run_ms))
        if len(recent) > 10:
            del recent[0]


def finish(e: Engine, job: Job, state: Any, now: int, result: bytes | None) -> None:
    """Remove a job from the live index, release its key, remember its outcome."""
    del e.jobs[job.id]
    if type(job.data) is BlobRef:
        e.dropped_blobs.append(job.id)
    else:
        e.payload_bytes -= len(job.data)
    job.state = state
    key = job.opts.unique_key
    if key is not None and job.queue.unique.get(key) == job.id:
        del job.queue.unique[key]
    q = job.queue
    if not (q.n_waiting or q.n_active or q.n_delayed or q.n_children):
        retention.note_emptied(e, q, now)
    if not e.finished:
        e.timers.dirty = True  # results now expire: a deadline to keep
    retention.remember(e, job.id, Finished(state, now, result))


def apply_fail(e: Engine, rec: R.Record) -> None:
    _, now, jid, error = rec
    job = e.jobs[jid]
    end_attempt(e, job)
    _failed_attempt(e, job, now, error, backoff=True)


def _failed_attempt(e: Engine, job: Job, now: int, error: str | None, backoff: bool) -> None:
    job.attempts += 1
    q = job.queue
    q.failed += 1
    e.total_failed += 1
    if error is not None or job.opts.error is not None:
        job.own_opts().error = error
    e.emit("failed", job)
    o = job.opts
    if o.max_attempts and job.attempts >= o.max_attempts:
        to_dlq(e, job, now)
        e.deps.parent_ended(job.id, now, DEAD)
        return
    q.retried += 1
    delay = e.backoff_delay(o.backoff, job.attempts) if backoff else 0
    if delay:
        job.run_at = now + delay
        to_delayed(e, job)
    else:
        to_waiting(e, job)
    e.emit("retrying", job)


def to_dlq(e: Engine, job: Job, now: int) -> None:
    job.state = DEAD
    q = job.queue
    q.dlq[job.id] = job
    q.dead_total += 1
    e.emit("dead", job)


def apply_release(e: Engine, rec: R.Record) -> None:
    _, now, ids, reason = rec
    for jid in ids:
        job = e.jobs[jid]
        end_attempt(e, job)
        _failed_attempt(e, job, now, f"lease lost: {reason}", backoff=False)


def apply_timeout(e: Engine, rec: R.Record) -> None:
    _, now, jid = rec
    job = e.jobs[jid]
    ran = now - job.started_at
    end_attempt(e, job)
    e.emit("timeout", job)
    _failed_attempt(e, job, now, f"Job timed out after {ran} ms", backoff=True)


# -- cancel, progress, the DLQ, queue settings -------------------------------------------------


def apply_cancel(e: Engine, rec: R.Record) -> None:
    _, now, jid = rec
    job = e.jobs.get(jid) or e.unpack(jid)
    assert job is not None
    leave_state(e, job)
    finish(e, job, CANCELLED, now, None)
    e.deps.parent_ended(jid, now, CANCELLED)


def leave_state(e: Engine, job: Job) -> None:
    """Take a live job out of its state's index (heaps are cleaned lazily)."""
    q = job.queue
    state = job.state
    if state is WAITING:
        q.n_waiting -= 1
    elif state is DELAYED:
        q.n_delayed -= 1
    elif state is WAITING_CHILDREN:
        q.n_children -= 1
        e.deps.forget(job.id)
    elif state is ACTIVE:
        end_attempt(e, job)
    elif state is DEAD:
        del q.dlq[job.id]


def apply_progress(e: Engine, rec: R.Record) -> None:
    _, _now, jid, progress, message = rec
    job = e.jobs[jid]
    opts = job.own_opts()
    opts.progress = progress
    opts.progress_msg = message
    e.emit("progress", job)


def apply_retry_dlq(e: Engine, rec: R.Record) -> None:
    _, now, queue, ids = rec
    q = e.queues[queue]
    for jid in ids:
        job = q.dlq.pop(jid)
        job.attempts = 0
        job.run_at = now
        job.own_opts().error = None
        deps = job.opts.depends_on
        if not (deps and e.deps.wait_for_parents(job, deps, now)):
            make_ready(e, job, now)


def apply_queue_settings(e: Engine, rec: R.Record) -> None:
    _, now, queue, settings = rec
    q = e.queue(queue)
    q.paused = bool(settings.get("paused"))
    rate = settings.get("rate_limit")
    if not rate:
        q.rate = None
    elif q.rate is None or q.rate.limit != rate:
        q.rate = TokenBucket(rate, now)
    q.concurrency = settings.get("concurrency_limit") or 0
    e.wakeups.add(queue)
    if q.is_empty():
        retention.note_emptied(e, q, now)


# -- slots and terms ---------------------------------------------------------------------------


def apply_slot_seq(e: Engine, rec: R.Record) -> None:
    _, _now, slot, seq = rec
    if seq > e.seqs[slot]:
        e.seqs[slot] = seq


def apply_term(e: Engine, rec: R.Record) -> None:
    _, _now, term, _primary, lsn = rec
    terms = e.terms
    while terms and terms[-1][1] >= lsn:  # a log cut back and written again
        terms.pop()
    terms.append((term, lsn))


def apply_terms(e: Engine, rec: R.Record) -> None:
    e.terms = [(int(t), int(lsn)) for t, lsn in rec[2]]
