"""What the engine does when time passes: promotions, expiries, lease timeouts.

The engine's timer heaps live here. Each holds ints ``at << 53 | id`` and is
cleaned lazily: an entry whose job moved on is skipped when it comes due.
Every change is a record applied through the engine (records.py), like any
other. No I/O, no real time: ``now`` comes from the engine's clock.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from . import records as R
from . import retention
from . import transitions as T
from .jobs import DELAYED, EXPIRED, ID_MASK, WAITING, WAITING_CHILDREN, timer_key

if TYPE_CHECKING:
    from .engine import Engine

heappush = heapq.heappush
heappop = heapq.heappop


#: A heap is cleaned of stale entries once it holds more than twice the live ones it held
#: after its last cleaning, plus this (each entry is then cleaned once: amortised O(1)).
SLACK = 4096


class Timers:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.delayed: list[int] = []  # run_at of delayed jobs
        self.expiries: list[int] = []  # created_at + ttl of jobs never pulled
        self.deadlines: list[int] = []  # lease deadlines of active jobs
        #: past these sizes a heap is cleaned (every acked job leaves a stale deadline, which
        #: would otherwise wait out its lease, 30 minutes by default, before it is popped)
        self._limits = {"delayed": SLACK, "expiries": SLACK, "deadlines": SLACK}
        #: something may now be due earlier than the runtime's timer is set for
        self.dirty = True

    def delay(self, at: int, job_id: int) -> None:
        heappush(self.delayed, timer_key(at, job_id))
        self.dirty = True
        if len(self.delayed) > self._limits["delayed"]:
            self._clean("delayed")

    def expire_at(self, at: int, job_id: int) -> None:
        heappush(self.expiries, timer_key(at, job_id))
        self.dirty = True
        if len(self.expiries) > self._limits["expiries"]:
            self._clean("expiries")

    def deadline(self, at: int, job_id: int) -> None:
        heappush(self.deadlines, timer_key(at, job_id))
        self.dirty = True
        if len(self.deadlines) > self._limits["deadlines"]:
            self._clean("deadlines")

    def _clean(self, name: str) -> None:
        """Drop the entries of ``name`` that no longer stand for a job's due time."""
        e = self.engine
        jobs, active = e.jobs, e.active

        def live(key: int) -> bool:
            jid = key & ID_MASK
            if name == "deadlines":
                lease = active.get(jid)
                return lease is not None and timer_key(lease.deadline, jid) == key
            job = jobs.get(jid)
            if job is None:
                return False
            if name == "delayed":
                return job.state is DELAYED and timer_key(job.run_at, jid) == key
            return bool(job.started_at == 0 and job.opts.ttl
                        and timer_key(job.created_at + job.opts.ttl, jid) == key)

        heap = [key for key in getattr(self, name) if live(key)]
        heapq.heapify(heap)
        setattr(self, name, heap)
        self._limits[name] = 2 * len(heap) + SLACK

    def next_deadline(self) -> int | None:
        """The earliest time ``tick`` has something to do (may be a stale entry)."""
        self.dirty = False
        e = self.engine
        candidates = [heap[0] >> 53 for heap in (self.delayed, self.expiries, self.deadlines)
                      if heap]
        cron_at = e.crons.next_due()
        if cron_at is not None:
            candidates.append(cron_at)
        if e.finished:
            first = next(iter(e.finished.values()))
            candidates.append(first.at + e.config.results_ttl_ms)
        return min(candidates) if candidates else None

    def tick(self) -> None:
        """Do everything that is due: promotions, expiries, timeouts, crons, result eviction."""
        e = self.engine
        now = e.clock()
        self._promote_due(now)
        self._expire_due(now)
        self._timeout_due(now)
        e.crons.fire_due(now)
        ttl = e.config.results_ttl_ms
        finished = e.finished
        while finished:
            first = next(iter(finished.values()))
            if first.at + ttl > now:
                break
            retention.forget_oldest(e)

    @staticmethod
    def _due(heap: list[int], now: int) -> list[int]:
        """Pop the entries due by ``now``; each id once, in time order."""
        limit = (now + 1) << 53
        ids: dict[int, None] = {}
        while heap and heap[0] < limit:
            ids[heappop(heap) & ID_MASK] = None
        return list(ids)

    def compact(self) -> None:
        """Rebuild every heap from the jobs' states (after recovery: drops stale entries)."""
        e = self.engine
        for q in e.queues.values():
            q.ready = []
        self.delayed, self.expiries, self.deadlines = [], [], []
        for job in e.jobs.values():
            state = job.state
            if state is WAITING:
                job.queue.ready.append(job.ready_key())
            elif state is DELAYED:
                self.delayed.append(timer_key(job.run_at, job.id))
            if job.opts.ttl and job.started_at == 0 and state in (WAITING, DELAYED,
                                                                  WAITING_CHILDREN):
                self.expiries.append(timer_key(job.created_at + job.opts.ttl, job.id))
        for jid, lease in e.active.items():
            self.deadlines.append(timer_key(lease.deadline, jid))
        for heap in (self.delayed, self.expiries, self.deadlines,
                     *(q.ready for q in e.queues.values())):
            heapq.heapify(heap)
        for name in self._limits:
            self._limits[name] = 2 * len(getattr(self, name)) + SLACK

    # -- delayed -> waiting ---------------------------------------------------------------------

    def _promote_due(self, now: int) -> None:
        jobs = self.engine.jobs
        ids = [
            jid for jid in self._due(self.delayed, now)
            if (job := jobs.get(jid)) is not None and job.state is DELAYED and job.run_at <= now
        ]
        if ids:
            self.engine.log_apply((R.PROMOTE, now, ids))

    def apply_promote(self, rec: R.Record) -> None:
        _, _now, ids = rec
        e = self.engine
        for jid in ids:
            job = e.jobs[jid]
            job.queue.n_delayed -= 1
            T.to_waiting(e, job)

    # -- ttl ------------------------------------------------------------------------------------

    def _expire_due(self, now: int) -> None:
        jobs = self.engine.jobs
        ids = []
        for jid in self._due(self.expiries, now):
            job = jobs.get(jid)
            if (
                job is not None and job.started_at == 0
                and job.state in (WAITING, DELAYED, WAITING_CHILDREN)
                and job.created_at + job.opts.ttl <= now
            ):
                ids.append(jid)
        if ids:
            self.engine.log_apply((R.EXPIRE, now, ids))

    def apply_expire(self, rec: R.Record) -> None:
        _, now, ids = rec
        e = self.engine
        for jid in ids:
            job = e.jobs[jid]
            T.leave_state(e, job)
            job.queue.expired += 1
            T.finish(e, job, EXPIRED, now, None)
            e.emit("expired", job)
            e.deps.parent_ended(jid, now, EXPIRED)

    # -- leases ---------------------------------------------------------------------------------

    def _timeout_due(self, now: int) -> None:
        e = self.engine
        for jid in self._due(self.deadlines, now):
            lease = e.active.get(jid)
            if lease is not None and lease.deadline <= now:
                e.log_apply((R.TIMEOUT, now, jid))
