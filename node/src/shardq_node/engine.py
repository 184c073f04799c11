"""The queue engine of one node: pure, synchronous, no I/O, driven by a clock.

Servers parse a request, call one method here, and reply. A method checks the
command and makes its record (see ``records.py``); every state change goes
through ``apply`` with that record (what each record type does is in
``transitions.py``), and the record is appended to ``journal``; the runtime
drains the journal into the WAL before the reply leaves, and recovery feeds the
same records back through ``apply``. So the live path and the replay path are
one code path.

Indexes, one per state: waiting = each queue's ready heap and its lane of compact
jobs (``jobs.Lane``: plain waiting jobs without a ``Job`` object), delayed = the
``delayed`` timer heap, waiting-children = ``children``, active = ``active``,
dead = each queue's ``dlq``, completed/cancelled/expired = ``finished``.
Heaps hold single ints (see ``jobs.ready_key``) and are cleaned lazily: an
entry whose job is gone or changed is skipped when popped.

Must not: do I/O, read the real time (use ``clock``), or block.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterator
from types import MethodType
from typing import Any

from shardq.errors import (
    DuplicateJob,
    JobNotActive,
    JobNotFound,
    LeaseExpired,
    ShardqError,
)
from shardq.wire.protocol import JobSpec
from shardq.wire.slots import SLOTS, slot_of

from . import records as R
from . import retention, slotmove, snapshot
from . import transitions as T
from .cron import Crons
from .dependencies import Dependencies
from .engine_config import EngineConfig
from .jobs import (
    ACTIVE,
    ID_MASK,
    PLAIN,
    WAITING,
    BlobRef,
    Finished,
    Job,
    Lane,
    Lease,
    QueueState,
    first_lane,
    payload_size,
)
from .timers import Timers

Clock = Callable[[], int]
Event = tuple[str, str, dict[str, Any]]  # (event, queue, JOB)
heappop = heapq.heappop


class Engine:
    """All queues of one node. Every public mutator returns its answer or raises."""

    def __init__(self, clock: Clock, config: EngineConfig | None = None) -> None:
        self.clock = clock
        self.config = config or EngineConfig()
        self.jobs: dict[int, Job] = {}  # every live job: waiting/delayed/children/active/dead
        self.queues: dict[str, QueueState] = {}
        self.queues_peak = 0  # most queues held since ``queues`` was last rebuilt
        self.slot_queues: dict[int, set[str]] = {}  # slot -> names of its queues
        self.seqs = [0] * SLOTS  # last seq handed out per slot
        self.active: dict[int, Lease] = {}
        self.owned: dict[int, set[int]] = {}  # lease owner -> ids it holds
        self.finished: OrderedDict[int, Finished] = OrderedDict()
        self.result_bytes = 0  # bytes of the results in ``finished``
        #: queues that were left empty: name -> when, oldest first (``reclaim_queues``)
        self.emptied: OrderedDict[str, int] = OrderedDict()
        #: payload bytes in memory past which a cron tick pushes nothing (the runtime sets it)
        self.memory_budget: int | None = None
        self.timers = Timers(self)  # the delayed, ttl and lease-deadline heaps
        self.deps = Dependencies(self)  # the waiting-children index
        self.crons = Crons(self)
        self.journal: list[R.Record] = []
        self.events: list[Event] = []
        self.wakeups: set[str] = set()  # queues that may now serve a blocked PULL
        self.watch: dict[str, int] = {}  # queue name ("*" = all) -> subscriber count
        self.emitting = True  # False while replaying
        #: called with seconds from ready to started / started to acked (metrics.py)
        self.observe_wait: Callable[[float], None] | None = None
        self.observe_run: Callable[[float], None] | None = None
        self.payload_bytes = 0  # bytes of payloads held in memory
        self.compact = self.config.compact  # plain waiting jobs kept in lanes (jobs.Lane)
        self.dropped_blobs: list[int] = []  # ids of finished jobs whose blob can go
        self.total_pushed = 0
        self.total_completed = 0
        self.total_failed = 0
        self.recent: list[tuple[int, int, int]] = []  # (second, completions, sum run ms)
        #: The term history of this log (DESIGN §9): (term, LSN of its TERM record), in order.
        self.terms: list[tuple[int, int]] = []
        own = self._own
        #: what each record type does (transitions.py and the engine's parts), bound to this engine
        self._apply: dict[int, Callable[[Any], Any]] = {
            R.PUSH: own(T.apply_push), R.START: own(T.apply_start), R.ACK: own(T.apply_ack),
            R.FAIL: own(T.apply_fail), R.RELEASE: own(T.apply_release),
            R.TIMEOUT: own(T.apply_timeout),
            R.PROMOTE: self.timers.apply_promote, R.EXPIRE: self.timers.apply_expire,
            R.CANCEL: own(T.apply_cancel),
            R.PROGRESS: own(T.apply_progress), R.RETRYDLQ: own(T.apply_retry_dlq),
            R.QUEUE: own(T.apply_queue_settings), R.CRON: self.crons.apply_set,
            R.CRONDEL: self.crons.apply_delete, R.CRONFIRE: self.crons.apply_fire,
            R.SLOT: own(T.apply_slot_seq), R.JOB: own(snapshot.load_job),
            R.CJOBS: own(snapshot.load_compact),
            R.DROP: own(slotmove.apply_drop),
            R.PARENTEND: self.deps.apply_parent_end, R.WATCH: self.deps.apply_watch,
            R.NOTIFIED: self.deps.apply_notified,
            R.FINISHED: own(snapshot.load_finished),
            R.TERM: own(T.apply_term), R.TERMS: own(T.apply_terms),
        }

    def _own(self, fn: Callable[[Engine, R.Record], Any]) -> Callable[[R.Record], Any]:
        """``fn`` bound to this engine as a method is (the same call costs)."""
        bound: Callable[[R.Record], Any] = MethodType(fn, self)
        return bound

    # -- plumbing ---------------------------------------------------------------------------

    def apply(self, rec: R.Record) -> Any:
        """Apply one record (live or replayed)."""
        return self._apply[rec[0]](rec)

    def log_apply(self, rec: R.Record) -> Any:
        result = self._apply[rec[0]](rec)
        self.journal.append(rec)
        return result

    def emit(self, event: str, job: Job) -> None:
        watch = self.watch
        if watch and self.emitting and (job.queue.name in watch or "*" in watch):
            self.events.append((event, job.queue.name, job.wire()))

    def queue(self, name: str) -> QueueState:
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = QueueState(name, slot_of(name))
            self.slot_queues.setdefault(q.slot, set()).add(name)
            if len(self.queues) > self.queues_peak:
                self.queues_peak = len(self.queues)
        return q

    def reclaim_queues(self) -> int:
        """Forget queues left empty for ``queue_idle_ms`` (retention.py); how many."""
        return retention.reclaim_queues(self)

    def _job(self, job_id: int) -> Job:
        """A live job to read (a compact one as a detached ``Job``: see ``peek``)."""
        job = self.jobs.get(job_id) or self.peek(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    # -- compact waiting jobs (jobs.Lane) ---------------------------------------------------

    def _compact(self, job_id: int) -> tuple[QueueState, Lane, int] | None:
        """Where the compact job ``job_id`` is: its queue, lane and index there."""
        names = self.slot_queues.get(job_id % SLOTS)
        if names:
            queues = self.queues
            for name in names:
                q = queues[name]
                for lane in q.lanes:
                    if lane.live:
                        i = lane.find(job_id)
                        if i >= 0:
                            return q, lane, i
        return None

    def unpack(self, job_id: int) -> Job | None:
        """The compact job ``job_id`` taken from its lane and made a full ``Job`` in ``jobs``,
        for a record that takes it out of waiting now (START, CANCEL); None if no compact
        job has that id."""
        where = self._compact(job_id)
        if where is None:
            return None
        q, lane, i = where
        run_at = lane.times[i]
        job = Job(job_id, q, lane.take(i), lane.priority, run_at, run_at, PLAIN)
        self.jobs[job_id] = job
        return job

    def peek(self, job_id: int) -> Job | None:
        """A compact job as a detached ``Job`` (to read: the lane keeps it); else None."""
        where = self._compact(job_id)
        if where is None:
            return None
        q, lane, i = where
        run_at = lane.times[i]
        data = lane.data[i]
        assert data is not None
        return Job(job_id, q, data, lane.priority, run_at, run_at, PLAIN)

    def has_job(self, job_id: int) -> bool:
        """Is ``job_id`` a live job here (in any state, compact or not)?"""
        return job_id in self.jobs or self._compact(job_id) is not None

    def live_jobs(self) -> Iterator[Job]:
        """Every live job, compact ones as detached copies (to read)."""
        yield from list(self.jobs.values())
        for q in list(self.queues.values()):
            for lane in q.lanes:
                for jid, run_at, data in lane.entries():
                    yield Job(jid, q, data, lane.priority, run_at, run_at, PLAIN)

    def compact_count(self) -> int:
        """How many waiting jobs are compact (kept in lanes, not in ``jobs``)."""
        return sum(lane.live for q in self.queues.values() for lane in q.lanes)

    def job_count(self) -> int:
        """Every live job: ``jobs`` and the compact ones."""
        return len(self.jobs) + self.compact_count()

    def _active(
        self, job_id: int, lease: int | None, not_found: type[JobNotFound], owner: int | None
    ) -> Job:
        """The active job an ACK/FAIL/PROGRESS/TOUCH settles: the attempt its ``lease`` token
        names, or without one, the attempt ``owner`` holds (None: anyone's, for engine callers
        that are not a client). Token 0 names no attempt (a gateway's client that holds no
        lease of the job): refused as from a connection that does not hold it."""
        job = self.jobs.get(job_id)
        if lease and job is not None:
            if job.state is not ACTIVE or job.started_at != lease:
                raise LeaseExpired(job_id)
            return job
        if job is None or job.state is not ACTIVE:
            raise not_found(job_id)
        if lease == 0 or (owner is not None and self.active[job_id].owner != owner):
            raise LeaseExpired(job_id)  # another connection holds the current attempt
        return job

    # -- push -------------------------------------------------------------------------------

    def push(
        self, queue: str, specs: list[JobSpec], payloads: list[bytes | BlobRef]
    ) -> list[int]:
        """Create jobs (all or none); their ids. ``payloads[i]`` is the raw JSON of
        ``specs[i].data``, or a BlobRef when the runtime keeps that payload in the blob
        store."""
        if not specs:
            return []
        now = self.clock()
        q = self.queues.get(queue) or retention.new_queue(self, queue)
        if len(specs) > 1 or specs[0].unique_key is not None or specs[0].depends_on:
            try:
                self._check_push(q, specs)
            except ShardqError:
                if q.is_empty():
                    retention.note_emptied(self, q, now)
                raise
        rec = (R.PUSH, now, queue, self.job_rows(q, specs, payloads, now))
        ids = T.apply_push(self, rec)
        self.journal.append(rec)
        return ids

    def next_ids(self, queue: str, count: int) -> list[int]:
        """The ids the next push of ``count`` jobs to ``queue`` gets (nothing changes)."""
        slot = q.slot if (q := self.queues.get(queue)) is not None else slot_of(queue)
        seq = self.seqs[slot]
        return [(seq + n) * SLOTS + slot for n in range(1, count + 1)]

    def _check_push(self, q: QueueState, specs: list[JobSpec]) -> None:
        """Refuse the whole push on a duplicate key (also within it) or an unknown parent."""
        seen: set[str] = set()
        for spec in specs:
            key = spec.unique_key
            if key is not None:
                if key in q.unique or key in seen:
                    raise DuplicateJob(key)
                seen.add(key)
            if spec.depends_on:
                for parent in spec.depends_on:
                    self.deps.check_parent(parent, q.slot)

    def job_rows(
        self, q: QueueState, specs: list[JobSpec], payloads: list[bytes | BlobRef], now: int
    ) -> list[tuple[Any, ...]]:
        """The JOBSPEC rows of a PUSH record (records.py), with fresh ids of the queue's slot."""
        slot = q.slot
        seq = self.seqs[slot]
        rows = []
        for spec, data in zip(specs, payloads, strict=True):
            seq += 1
            blob = data.size if type(data) is BlobRef else 0
            rows.append((
                seq * SLOTS + slot, None if blob else data, spec.priority,
                now + spec.delay if spec.delay else now,  # the same int: 32 bytes less a job
                spec.max_attempts, spec.backoff, spec.ttl, spec.timeout, spec.unique_key,
                spec.depends_on, blob,
            ))
        return rows

    # -- pull -------------------------------------------------------------------------------

    def pull(self, queue: str, owner: int, count: int = 1, max_bytes: int = 0) -> list[Job]:
        """Lease up to ``count`` ready jobs to ``owner``; [] if none may start now. With
        ``max_bytes``, no more jobs once their payloads pass it (at least one job)."""
        q = self.queues.get(queue)
        if q is None or not q.n_waiting or q.paused:
            return []
        n = count
        if q.concurrency:
            n = min(n, q.concurrency - q.n_active)
            if n <= 0:
                return []
        now = self.clock()
        if q.rate is not None:
            n = min(n, q.rate.available(now))
            if n <= 0:
                return []
        picked = self._pick(q, n, max_bytes if n > 1 else 0)
        if not picked:
            return []
        if q.rate is not None:
            q.rate.take(len(picked))
        self.log_apply((R.START, now, [j.id for j in picked]))
        self._hold(owner, picked)
        return picked

    def _pick(self, q: QueueState, n: int, budget: int) -> list[Job]:
        """Take up to ``n`` jobs in ready order (with ``budget``, until their payloads pass
        it): the smaller key of the lane's first job and the heap's top, each time."""
        heap = q.ready
        jobs = self.jobs
        picked: list[Job] = []
        while len(picked) < n:
            lane = first_lane(q) if q.lanes else None
            if lane is not None and (not heap or lane.head_key() < heap[0]):
                jid, run_at, data = lane.pop()  # the next job is compact: made a Job now
                job = Job(jid, q, data, lane.priority, run_at, run_at, PLAIN)
                job.state = ACTIVE
                jobs[jid] = job
                picked.append(job)
                if budget:
                    budget -= len(data)
                    if budget <= 0:
                        break
                continue
            if not heap:
                break
            key = heappop(heap)
            full = jobs.get(key & ID_MASK)
            if full is not None and full.state is WAITING and full.ready_key() == key:
                full.state = ACTIVE  # taken: a duplicate entry of the same key must not match
                picked.append(full)
                if budget:
                    budget -= payload_size(full)
                    if budget <= 0:
                        break
        return picked

    def _hold(self, owner: int, picked: list[Job]) -> None:
        """Note who holds the attempts just started (not logged: leases of connections)."""
        active = self.active
        if owner > 0:  # a connection: what it holds goes back when it closes
            held = self.owned.get(owner)
            if held is None:
                held = self.owned[owner] = set()
            for job in picked:
                active[job.id].owner = owner
                held.add(job.id)
        else:
            for job in picked:
                active[job.id].owner = owner

    def blocked_until(self, queue: str) -> int | None:
        """When a rate-limited queue with ready jobs gets its next token (else None)."""
        q = self.queues.get(queue)
        if q is None or q.rate is None or not q.n_waiting or q.paused:
            return None
        now = self.clock()
        at = q.rate.next_token_at(now)
        return at if at > now else None

    # -- finishing an attempt ---------------------------------------------------------------

    def ack(self, job_id: int, result: bytes | None = None, lease: int | None = None,
            owner: int | None = None) -> None:
        self._active(job_id, lease, JobNotFound, owner)
        self.log_apply((R.ACK, self.clock(), [job_id], None if result is None else [result]))

    def ack_batch(
        self,
        ids: list[int],
        results: list[bytes | None] | None = None,
        leases: list[int] | None = None,
        owner: int | None = None,
    ) -> int:
        """Ack every id that is active in the attempt ``leases[i]`` names or, without
        ``leases``, that ``owner`` holds (None: anyone); returns how many were."""
        picked: list[int] = []
        seen: set[int] = set()
        picked_results = []
        active = self.active
        for i, jid in enumerate(ids):
            job = self.jobs.get(jid)
            if job is not None and job.state is ACTIVE and jid not in seen and (
                    job.started_at == leases[i] if leases is not None
                    else owner is None or active[jid].owner == owner):
                seen.add(jid)
                picked.append(jid)
                picked_results.append(results[i] if results else None)
        if picked:
            self.log_apply((R.ACK, self.clock(), picked, picked_results if results else None))
        return len(picked)

    def fail(self, job_id: int, error: str | None = None, lease: int | None = None,
             owner: int | None = None) -> None:
        self._active(job_id, lease, JobNotFound, owner)
        self.log_apply((R.FAIL, self.clock(), job_id, error))

    def backoff_delay(self, backoff: int, attempt: int) -> int:
        """Wait after the ``attempt``-th failure: ``backoff * 2**(attempt-1)``, capped."""
        if not backoff:
            return 0
        cap = max(self.config.max_backoff_ms, backoff)
        return min(backoff << min(attempt - 1, 62), cap)

    def touch(self, job_id: int, lease: int | None = None, extend: int | None = None,
              owner: int | None = None) -> int:
        """Extend an active job's lease; returns the new deadline (not logged)."""
        job = self._active(job_id, lease, JobNotActive, owner)
        return self._extend(job, extend)

    def _extend(self, job: Job, extend: int | None) -> int:
        now = self.clock()
        deadline = now + (extend or job.opts.timeout or self.config.default_lease_ms)
        held = self.active[job.id]
        if deadline > held.deadline:
            held.deadline = deadline
            self.timers.deadline(deadline, job.id)
        return held.deadline

    def release_owner(self, owner: int, reason: str = "worker disconnected") -> int:
        """Return every job ``owner`` holds to its queue (a counted attempt)."""
        held = self.owned.get(owner)
        if not held:
            return 0
        return self.release(sorted(held), reason)

    def release_held(self, ids: list[int], tokens: list[int] | None, owner: int | None) -> int:
        """RELEASE from a client: hand back the attempts it holds, the one ``tokens[i]`` names
        or, without tokens, those ``owner`` holds (None: any, for the cluster token)."""
        jobs, active = self.jobs, self.active
        if tokens is not None:
            held = [i for i, t in zip(ids, tokens, strict=True)
                    if (job := jobs.get(i)) is not None and job.started_at == t]
        elif owner is not None:
            held = [i for i in ids if (lease := active.get(i)) is not None and lease.owner == owner]
        else:
            held = ids
        return self.release(held, "worker disconnected")

    def release(self, ids: list[int], reason: str) -> int:
        ids = [j for j in ids if j in self.active]
        if ids:
            self.log_apply((R.RELEASE, self.clock(), ids, reason))
        return len(ids)

    # -- cancel, progress, results ------------------------------------------------------------

    def cancel(self, job_id: int) -> None:
        if not self.has_job(job_id):
            raise JobNotFound(job_id)
        self.log_apply((R.CANCEL, self.clock(), job_id))

    def progress(
        self, job_id: int, progress: int, message: str | None, lease: int | None = None,
        owner: int | None = None,
    ) -> None:
        job = self._active(job_id, lease, JobNotActive, owner)
        self.log_apply((R.PROGRESS, self.clock(), job_id, progress, message))
        self._extend(job, None)

    def get_progress(self, job_id: int) -> tuple[int, str | None]:
        job = self._job(job_id)
        return job.opts.progress, job.opts.progress_msg

    def get_result(self, job_id: int) -> bytes | None:
        done = self.finished.get(job_id)
        return done.result if done is not None else None

    def get_job(self, job_id: int) -> Job | Finished | None:
        """A live job (a compact one as a detached copy: to read) or a finished one."""
        return self.jobs.get(job_id) or self.peek(job_id) or self.finished.get(job_id)

    # -- DLQ ----------------------------------------------------------------------------------

    def dlq(self, queue: str, count: int = 100, max_bytes: int = 0) -> list[Job]:
        """The oldest ``count`` dead jobs; with ``max_bytes``, no more once their payloads
        pass it (at least one job)."""
        q = self.queues.get(queue)
        if q is None:
            return []
        out: list[Job] = []
        budget = max_bytes
        for job in q.dlq.values():
            if len(out) >= count:
                break
            out.append(job)
            if budget:
                budget -= payload_size(job)
                if budget <= 0:
                    break
        return out

    def retry_dlq(self, queue: str, job_id: int | None = None) -> int:
        q = self.queues.get(queue)
        if q is None or not q.dlq:
            return 0
        if job_id is None:
            ids = list(q.dlq)
        elif job_id in q.dlq:
            ids = [job_id]
        else:
            return 0
        self.log_apply((R.RETRYDLQ, self.clock(), queue, ids))
        return len(ids)

    # -- queue settings -----------------------------------------------------------------------

    def set_queue(self, queue: str, **changes: Any) -> None:
        """Pause/resume and limits: ``paused``, ``rate_limit``, ``concurrency_limit``. On a
        queue the node does not hold, clearing them changes nothing and creates nothing."""
        q = self.queues.get(queue)
        if q is None and not any(changes.values()):
            return
        settings = (q or retention.new_queue(self, queue)).settings()
        settings.update(changes)
        self.log_apply((R.QUEUE, self.clock(), queue, settings))

    # -- dependencies across slots (dependencies.py) -------------------------------------------

    def watch_parent(self, parent: int, child: int) -> str:
        """A WATCH for a parent here: its state; a watch is kept while it is pending."""
        state = self.deps.state_of(parent)
        if state == "pending" and child not in self.deps.watchers.get(parent, ()):
            self.log_apply((R.WATCH, self.clock(), parent, child))
        return state

    def parent_end(self, parent: int, child: int, state: str) -> None:
        """The parent of a child here ended elsewhere (PARENTEND)."""
        pending = self.deps.children.get(child)
        if pending is not None and parent in pending:
            self.log_apply((R.PARENTEND, self.clock(), parent, child, state))
        else:
            self.deps.to_watch.discard((parent, child))

    def notified(self, parent: int, child: int) -> None:
        if (parent, child) in self.deps.outbox or child in self.deps.watchers.get(parent, ()):
            self.log_apply((R.NOTIFIED, self.clock(), parent, child))

    # -- time ---------------------------------------------------------------------------------

    def tick(self) -> None:
        """Do what is due by now (see timers.py)."""
        self.timers.tick()

    # -- snapshot records ---------------------------------------------------------------------

    def drop_slots(self, slots: list[int]) -> None:
        """Forget everything of ``slots`` (the source after a move; see slotmove.py)."""
        self.log_apply((R.DROP, self.clock(), sorted(slots)))

    # -- terms (replicated shards) --------------------------------------------------------------

    @property
    def last_term(self) -> int:
        return self.terms[-1][0] if self.terms else 0

    def begin_term(self, term: int, primary: str, lsn: int) -> None:
        """A primary's first record in ``term``, at log position ``lsn``."""
        self.log_apply((R.TERM, self.clock(), term, primary, lsn))
