"""Blocked pulls: a PULL/PULLB that found nothing waits here until jobs come, or its timeout.

``wait`` parks the caller's request as a ``Waiter`` on its queue. After each batch the
runtime hands over the queues the engine woke (``wake``): the oldest waiters of each
get jobs first. A rate-limited queue with ready jobs but no token is looked at again
when the next token is in (a rate timer). An answered waiter's line goes to the
runtime's outbox, to leave with the batch's group commit, and its session runs what
queued up behind it.

Must not: change engine state except through ``Engine.pull``, or answer before the
runtime's group commit lets the answer out.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shardq.errors import ShardqError

from .commands import PENDING, Answer, encode_answer

if TYPE_CHECKING:
    from .callers import Puller, Recipient
    from .cluster import Cluster
    from .engine import Engine
    from .jobs import Job

    Outbox = list[tuple[Recipient, list[bytes]]]


class Waiter:
    """A PULL/PULLB waiting for jobs."""

    __slots__ = ("caller", "count", "done", "queue", "single", "timer")

    def __init__(self, caller: Puller, queue: str, count: int, single: bool) -> None:
        self.caller = caller
        self.queue = queue
        self.count = count
        self.single = single
        self.timer: asyncio.TimerHandle | None = None
        self.done = False


class Pulls:
    """The blocked pulls of one node, by queue, and the rate timers that wake them."""

    def __init__(self, engine: Engine, clock: Callable[[], int], outbox: Outbox,
                 job_wire: Callable[[Job], dict[str, Any]], max_bytes: int,
                 after_batch: Callable[[], None]) -> None:
        self.engine = engine  # the runtime's ``use_engine`` replaces it
        self.clock = clock
        self.outbox = outbox
        self.job_wire = job_wire
        self.max_bytes = max_bytes  # PULLB answers stop adding jobs past this many bytes
        self.after_batch = after_batch
        self.waiters: dict[str, deque[Waiter]] = {}
        self._rate_timers: dict[str, asyncio.TimerHandle] = {}

    def wait(self, caller: Puller, queue: str, count: int, timeout: int | None,
             single: bool) -> Answer:
        """Park a PULL (``single``) or PULLB of ``count`` for ``timeout`` ms (None: no end)."""
        waiter = Waiter(caller, queue, count, single)
        self.waiters.setdefault(queue, deque()).append(waiter)
        caller.waiter = waiter
        if timeout is not None:
            loop = asyncio.get_running_loop()
            waiter.timer = loop.call_later(timeout / 1000, self._expire, waiter)
        self._arm_rate_timer(queue)
        return PENDING

    def finish(self, waiter: Waiter, answer: Answer) -> None:
        """Answer a waiter (into the outbox) and let its session go on."""
        waiter.done = True
        if waiter.timer is not None:
            waiter.timer.cancel()
        caller = waiter.caller
        caller.waiter = None
        self.outbox.append((caller, [encode_answer(answer, caller.pending_rid)]))
        asyncio.get_running_loop().call_soon(caller.resume)

    def _expire(self, waiter: Waiter) -> None:
        if waiter.done:
            return
        queue = self.waiters.get(waiter.queue)
        if queue is not None:
            try:
                queue.remove(waiter)
            except ValueError:
                pass
            if not queue:
                del self.waiters[waiter.queue]
        self.finish(waiter, _empty(waiter))
        self.after_batch()

    def drop(self, caller: Puller) -> None:
        """The caller left (or gave up): forget its waiter, unanswered."""
        waiter = caller.waiter
        if waiter is None:
            return
        waiter.done = True
        if waiter.timer is not None:
            waiter.timer.cancel()
        queue = self.waiters.get(waiter.queue)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self.waiters[waiter.queue]

    def wake(self, queues: set[str]) -> None:
        """The engine woke ``queues``: serve their waiters, oldest first."""
        waiters = self.waiters
        for queue in queues:
            if queue in waiters:
                self._serve(queue)

    def _serve(self, queue: str) -> None:
        waiters = self.waiters[queue]
        engine = self.engine
        max_bytes = self.max_bytes
        while waiters:
            waiter = waiters[0]
            jobs = engine.pull(queue, waiter.caller.owner, waiter.count, max_bytes)
            if not jobs:
                break
            waiters.popleft()
            try:
                wire = [self.job_wire(j) for j in jobs]
            except ShardqError as exc:  # a blob that cannot be read
                self.finish(waiter, {"ok": False, "error": exc.text})
                continue
            answer = {"ok": True, "job": wire[0]} if waiter.single else {"ok": True, "jobs": wire}
            self.finish(waiter, answer)
        if not waiters:
            del self.waiters[queue]
        else:
            self._arm_rate_timer(queue)

    def _arm_rate_timer(self, queue: str) -> None:
        """A rate-limited queue with ready jobs: look again when the next token is in."""
        at = self.engine.blocked_until(queue)
        if at is None or queue in self._rate_timers:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, (at - self.clock()) / 1000)
        self._rate_timers[queue] = loop.call_later(delay, self._rate_wake, queue)

    def _rate_wake(self, queue: str) -> None:
        self._rate_timers.pop(queue, None)
        self.engine.wakeups.add(queue)
        self.after_batch()

    def refuse_unserved(self, cluster: Cluster) -> None:
        """The topology changed: pulls on slots this node no longer serves get the reason."""
        for queue in list(self.waiters):
            slot = cluster.slot_of_queue(queue)
            if cluster.serves(slot):
                continue
            try:
                cluster.check("PULL", {"queue": queue})
            except ShardqError as exc:
                error = {"ok": False, "error": exc.text}
            for waiter in self.waiters.pop(queue):
                self.finish(waiter, error)

    def fail_all(self, text: str) -> None:
        """Storage failed: every blocked pull gets ``text``."""
        for waiters in list(self.waiters.values()):
            for waiter in list(waiters):
                self.finish(waiter, {"ok": False, "error": text})
        self.waiters.clear()

    def close(self) -> None:
        for handle in self._rate_timers.values():
            handle.cancel()


def _empty(waiter: Waiter) -> Answer:
    return {"ok": True, "job": None} if waiter.single else {"ok": True, "jobs": []}
