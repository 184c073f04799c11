"""The engine's records: jobs, their rarely used options, queues, token buckets.

Plain data with ``__slots__`` and no behaviour beyond small helpers. A plain
waiting job has no ``Job`` at all: it sits in its queue's ``Lane`` (its id,
run_at and payload in arrays, about 265 bytes with a 200-byte payload). A job's
payload is kept as the raw JSON bytes it arrived as (never re-parsed by the
node) and sent back with ``orjson.Fragment``. No I/O here.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from orjson import Fragment, dumps

from shardq.errors import InvalidRequest
from shardq.wire.job import State
from shardq.wire.protocol import (
    COUNT_BELOW,
    MAX_DEPTH,
    MAX_PRIORITY,
    encode_within,
    is_flat,
    too_deep,
)

WAITING = State.WAITING
DELAYED = State.DELAYED
WAITING_CHILDREN = State.WAITING_CHILDREN
ACTIVE = State.ACTIVE
COMPLETED = State.COMPLETED
DEAD = State.DEAD
CANCELLED = State.CANCELLED
EXPIRED = State.EXPIRED

#: Low 53 bits of every heap key hold the job id (ids stay below 2**53).
ID_BITS = 53
ID_MASK = (1 << ID_BITS) - 1
#: run_at (ms) sits above the id in ready keys; priority above both.
PRIORITY_SHIFT = 96


def ready_key(priority: int, run_at: int, job_id: int) -> int:
    """One int that orders like (-priority, run_at, id): higher priority first."""
    return ((MAX_PRIORITY - priority) << PRIORITY_SHIFT) | (run_at << ID_BITS) | job_id


def timer_key(at: int, job_id: int) -> int:
    return (at << ID_BITS) | job_id


def kept_json(value: Any) -> bytes:
    """The raw JSON the node keeps for a payload or result.

    orjson returns short output inside a 4 KiB allocation; a value the node keeps
    is copied into an exact-size bytes object (else a 200-byte job costs 4 KiB).
    """
    out = dumps(value)
    return bytes(memoryview(out)) if len(out) < 4000 else out


def client_json(value: Any, max_depth: int = MAX_DEPTH) -> bytes:
    """``kept_json`` of a value a client sent, refused (``Invalid: nesting deeper than N``)
    if it nests deeper than ``max_depth``: nothing is stored that an answer cannot carry."""
    return client_encoder(max_depth)(value)


def client_encoder(max_depth: int) -> Callable[[Any], bytes]:
    """``client_json`` for one ``max_depth``, its constants bound (the PUSH hot path).

    Depth ``d`` takes at least ``2d`` bytes, so short values (most) cost one comparison;
    longer ones, cheapest first (all loops in C): a text with no bracket after its first
    (memchr), one under 8 KiB with few brackets, a large flat value; a nested one is
    encoded again, inside the levels that make orjson count for us.
    """
    shallow = 2 * max_depth  # no value this short nests deeper (and it is under 4000)
    refusal = too_deep(max_depth)

    def encode(value: Any) -> bytes:
        try:
            out = dumps(value)
        except TypeError:  # deeper than orjson encodes (parsed JSON has no other cause)
            raise too_deep(max_depth) from None
        size = len(out)
        if size <= shallow:  # most payloads
            return bytes(memoryview(out))
        if (out.find(b"[", 1) < 0 and out.find(b"{", 1) < 0) or (
                size < COUNT_BELOW and out.count(b"[") + out.count(b"{") <= max_depth):
            return bytes(memoryview(out)) if size < 4000 else out
        if size >= COUNT_BELOW and is_flat(value):
            return out
        del out  # two large outputs alive at once make orjson's allocations slow
        checked = encode_within(value, max_depth)
        if checked is None:
            raise InvalidRequest(refusal.what)
        return checked

    return encode


class BlobRef:
    """A payload kept in the blob store on disk instead of memory (see shardq_node.blobs)."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def payload_size(job: Job) -> int:
    """Bytes of the job's payload, in memory or in the blob store."""
    data = job.data
    return len(data) if type(data) is bytes else data.size if type(data) is BlobRef else 0


class JobOpts:
    """The options most jobs never set. Plain jobs share ``PLAIN`` (never mutated)."""

    __slots__ = (
        "backoff", "depends_on", "error", "max_attempts", "progress", "progress_msg", "timeout",
        "ttl", "unique_key",
    )

    def __init__(
        self,
        max_attempts: int = 0,
        backoff: int = 0,
        ttl: int = 0,
        timeout: int = 0,
        unique_key: str | None = None,
        depends_on: tuple[int, ...] = (),
    ) -> None:
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.ttl = ttl
        self.timeout = timeout
        self.unique_key = unique_key
        self.depends_on = depends_on
        self.progress = 0
        self.progress_msg: str | None = None
        self.error: str | None = None

    def copy(self) -> JobOpts:
        new = JobOpts(
            self.max_attempts, self.backoff, self.ttl, self.timeout, self.unique_key,
            self.depends_on,
        )
        new.progress = self.progress
        new.progress_msg = self.progress_msg
        new.error = self.error
        return new


PLAIN = JobOpts()


class Job:
    """One job on a node. ``state`` tells which index holds it."""

    __slots__ = (
        "attempts", "created_at", "data", "id", "opts", "priority", "queue", "run_at",
        "started_at", "state",
    )

    def __init__(
        self,
        job_id: int,
        queue: QueueState,
        data: Any,
        priority: int,
        created_at: int,
        run_at: int,
        opts: JobOpts,
    ) -> None:
        self.id = job_id
        self.queue = queue
        self.data = data  # raw JSON bytes, or a blob reference (see shardq_node.blobs)
        self.priority = priority
        self.created_at = created_at
        self.run_at = run_at
        self.started_at = 0
        self.attempts = 0
        self.state = WAITING
        self.opts = opts

    def own_opts(self) -> JobOpts:
        """The job's options, copied first if they are the shared PLAIN instance."""
        if self.opts is PLAIN:
            self.opts = JobOpts()
        return self.opts

    def ready_key(self) -> int:
        return ready_key(self.priority, self.run_at, self.id)

    def wire(self, data: Any = None) -> dict[str, Any]:
        """The JOB object of the protocol (DESIGN §2), plus ``state`` (and ``error``)."""
        o = self.opts
        raw = self.data if data is None else data
        out = {
            "id": self.id,
            "queue": self.queue.name,
            "data": Fragment(raw) if type(raw) is bytes else raw,
            "priority": self.priority,
            "created_at": self.created_at,
            "run_at": self.run_at,
            "started_at": self.started_at,
            "attempts": self.attempts,
            "max_attempts": o.max_attempts,
            "backoff": o.backoff,
            "ttl": o.ttl,
            "timeout": o.timeout,
            "unique_key": o.unique_key,
            "depends_on": list(o.depends_on),
            "progress": o.progress,
            "progress_msg": o.progress_msg,
            "state": self.state.value,
        }
        if o.error is not None:
            out["error"] = o.error
        return out


class TokenBucket:
    """Rate limit: capacity ``limit`` tokens, refilled at ``limit`` per second."""

    __slots__ = ("last", "limit", "tokens")

    def __init__(self, limit: int, now: int) -> None:
        self.limit = limit
        self.tokens = float(limit)
        self.last = now

    def available(self, now: int) -> int:
        if now > self.last:
            refill = (now - self.last) * self.limit / 1000
            self.tokens = min(float(self.limit), self.tokens + refill)
            self.last = now
        return int(self.tokens)

    def take(self, n: int) -> None:
        self.tokens -= n

    def next_token_at(self, now: int) -> int:
        """When the next whole token will be there (ms)."""
        if self.tokens >= 1:
            return now
        missing = 1.0 - self.tokens
        return now + max(1, math.ceil(missing * 1000 / self.limit))


class QueueState:
    """One named queue: its ready heap, counters, DLQ, unique keys and settings."""

    __slots__ = (
        "completed", "concurrency", "dead_total", "dlq", "expired", "failed", "lanes",
        "n_active", "n_children", "n_delayed", "n_waiting", "name", "paused", "pushed", "rate",
        "ready", "retried", "slot", "unique",
    )

    def __init__(self, name: str, slot: int) -> None:
        self.name = name
        self.slot = slot
        self.ready: list[int] = []  # heap of ready_key ints; stale entries are skipped
        #: its compact waiting jobs, a lane per priority, highest first (``lane_for``)
        self.lanes: list[Lane] = []
        self.n_waiting = 0
        self.n_delayed = 0
        self.n_children = 0
        self.n_active = 0
        self.dlq: dict[int, Job] = {}  # insertion order = oldest death first
        self.unique: dict[str, int] = {}  # unique_key -> id of the live job holding it
        self.paused = False
        self.rate: TokenBucket | None = None
        self.concurrency = 0  # 0 = no limit
        # lifetime counters (Prometheus and METRICS)
        self.pushed = 0
        self.completed = 0
        self.failed = 0
        self.retried = 0
        self.dead_total = 0
        self.expired = 0

    @property
    def pending(self) -> int:
        return self.n_waiting + self.n_delayed + self.n_children

    def is_empty(self) -> bool:
        """No jobs, no settings: the queue object can be dropped."""
        return not (
            self.pending or self.n_active or self.dlq or self.unique or self.paused
            or self.rate or self.concurrency
        )

    def settings(self) -> dict[str, Any]:
        return {
            "paused": self.paused,
            "rate_limit": self.rate.limit if self.rate else None,
            "concurrency_limit": self.concurrency or None,
        }


#: lanes (priorities kept compact) a queue has at most; jobs of other priorities are full
MAX_LANES = 8


class Lane:
    """The compact waiting jobs of one queue and one priority: plain jobs (no options, no
    delay, no blob, never pulled), kept as three arrays in push order instead of a ``Job``
    each: the id and the run_at (= created_at) as 8-byte machine ints, the payload bytes.

    A job joins only behind the last one (a greater id, a run_at not earlier, the lane's
    priority), so the lane is in ready-heap order and its first live entry is its next job.
    A queue's lanes are sorted by priority, highest first, so the first lane holding jobs
    has the queue's next compact job; the engine compares its ready key with the top of
    the queue's heap (which holds the other waiting jobs). A job leaves from the front
    (pulled) or, rarely, from the middle (cancelled: its payload becomes None); its ``Job``
    object is made then (``Engine.unpack``); reading one makes a detached copy
    (``Engine.peek``). Ids are found by bisection (they ascend).
    """

    __slots__ = ("data", "head", "ids", "live", "priority", "times")

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.ids: array[int] = array("q")
        self.times: array[int] = array("q")
        self.data: list[bytes | None] = []  # None: left from the middle
        self.head = 0  # index of the first live entry (or the end)
        self.live = 0

    def fits(self, priority: int, run_at: int, job_id: int) -> bool:
        """May a waiting plain job with these keys join at the end (in ready order)?"""
        if priority != self.priority:
            return False
        return not self.live or (run_at >= self.times[-1] and job_id > self.ids[-1])

    def add(self, job_id: int, run_at: int, data: bytes) -> None:
        """Append a job that ``fits``."""
        if not self.live:
            self.clear()
        self.ids.append(job_id)
        self.times.append(run_at)
        self.data.append(data)
        self.live += 1

    def extend(self, ids: Iterable[int], times: Iterable[int], data: list[bytes]) -> None:
        """Append many jobs that fit, in order (a snapshot's or an import's CJOBS)."""
        self.ids.extend(ids)
        self.times.extend(times)
        self.data.extend(data)
        self.live += len(data)

    def clear(self) -> None:
        del self.ids[:], self.times[:], self.data[:]
        self.head = self.live = 0

    def head_key(self) -> int:
        """The ready key of the first live job (the lane is not empty)."""
        h = self.head
        return ready_key(self.priority, self.times[h], self.ids[h])

    def pop(self) -> tuple[int, int, bytes]:
        """Take the first live job: (id, run_at, payload)."""
        h = self.head
        data = self.data[h]
        assert data is not None
        self.data[h] = None
        out = (self.ids[h], self.times[h], data)
        self._left()
        return out

    def find(self, job_id: int) -> int:
        """Index of the live job ``job_id``, or -1."""
        ids = self.ids
        h = self.head
        if h < len(ids) and ids[h] == job_id:
            return h
        i = bisect_left(ids, job_id, h)
        if i < len(ids) and ids[i] == job_id and self.data[i] is not None:
            return i
        return -1

    def take(self, i: int) -> bytes:
        """Take the live job at index ``i`` (from ``find``) out; its payload."""
        data = self.data[i]
        assert data is not None
        self.data[i] = None
        self._left()
        return data

    def _left(self) -> None:
        self.live -= 1
        if not self.live:
            self.clear()
            return
        data = self.data
        h = self.head
        while data[h] is None:
            h += 1
        self.head = h
        if h >= 4096 and 2 * h >= len(data):  # drop the taken front, amortized O(1) a job
            del self.ids[:h], self.times[:h], data[:h]
            self.head = 0

    def entries(self) -> list[tuple[int, int, bytes]]:
        """The live jobs, in order: (id, run_at, payload)."""
        ids, times, data = self.ids, self.times, self.data
        out = []
        for i in range(self.head, len(data)):
            d = data[i]
            if d is not None:
                out.append((ids[i], times[i], d))
        return out


def lane_for(q: QueueState, priority: int) -> Lane | None:
    """The lane of ``priority`` in ``q``: made, or an empty one taken over, when there is
    none yet (None: ``MAX_LANES`` lanes all hold jobs of other priorities)."""
    spare = None
    for lane in q.lanes:
        if lane.priority == priority:
            return lane
        if spare is None and not lane.live:
            spare = lane
    if spare is None:
        if len(q.lanes) >= MAX_LANES:
            return None
        spare = Lane(priority)
        q.lanes.append(spare)
    else:
        spare.clear()
        spare.priority = priority
    q.lanes.sort(key=_by_priority)
    return spare


def _by_priority(lane: Lane) -> int:
    return -lane.priority


def first_lane(q: QueueState) -> Lane | None:
    """The lane with the queue's next compact job (the highest priority that has one)."""
    for lane in q.lanes:
        if lane.live:
            return lane
    return None


#: Lease owners: a TCP connection is 1, 2, ...; ``HTTP`` holds what was pulled over HTTP
#: (no connection); ``NOBODY`` holds a lease that came from a snapshot or a slot move (only
#: its token can settle it).
HTTP = 0
NOBODY = -1


class Lease:
    """The lease of an active job: who holds it and until when."""

    __slots__ = ("deadline", "owner")

    def __init__(self, owner: int, deadline: int) -> None:
        self.owner = owner
        self.deadline = deadline


class Finished:
    """What is remembered of a finished job: its final state, when, and its result."""

    __slots__ = ("at", "result", "state")

    def __init__(self, state: Any, at: int, result: bytes | None) -> None:
        self.state = state
        self.at = at
        self.result = result
