"""A running node: the engine, its log, timers, blocked pulls, subscribers, servers.

The runtime turns engine calls into durable, ordered answers. After each
batch of commands it drains the engine's journal into the log, tags every
answer with the log position it depends on, and lets an answer out only when
the log says that position is durable (group commit, DESIGN §4). It also
wakes blocked PULLs, delivers events, and runs the engine's timers.

Must not: change engine state except through engine methods, or block the loop.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from orjson import JSONDecodeError
from orjson import loads as _loads

from shardq.errors import InternalError, InvalidRequest, QueueFull, ShardqError, StorageFailed
from shardq.wire import commands as C
from shardq.wire import protocol as P
from shardq.wire.protocol import JobSpec
from shardq.wire.slots import SLOTS
from shardq_server.running import Causes

from .cluster import Cluster
from .commands import OK, PENDING, Answer, Caller, Commands, Encoded
from .engine import Engine
from .failure import StorageFailure
from .following import Follower
from .jobs import DELAYED, BlobRef, Job
from .membership import Membership
from .metrics import Measures
from .peers import Peers
from .replication import Replication
from .settings import NodeSettings
from .storage import Storage
from .wal import Files

if TYPE_CHECKING:
    from .server_tcp import Session

log = logging.getLogger("shardq_node")


_last_ms = [0]


def wall_clock_ms() -> int:
    """Milliseconds since the epoch; within one millisecond, the same int object (jobs
    created in it share their ``created_at``: 32 bytes less a job)."""
    now = time.time_ns() // 1_000_000
    if now == _last_ms[0]:
        return _last_ms[0]
    _last_ms[0] = now
    return now


class MemoryLog:
    """A log that keeps nothing: every append is durable at once (no data dir)."""

    def __init__(self) -> None:
        self.seq = 0
        self.durable = 0
        self.failed: str | None = None

    def append(self, records: list[Any]) -> None:
        self.seq += len(records)
        self.durable = self.seq

    def writable(self) -> None:
        """Raise if writes are refused (the WAL raises StorageFailed)."""


#: Commands a node still answers while its storage refuses writes.
READ_ONLY = C.READ_ONLY


class Waiter:
    """A PULL/PULLB waiting for jobs."""

    __slots__ = ("caller", "count", "done", "queue", "single", "timer")

    def __init__(self, caller: Session, queue: str, count: int, single: bool) -> None:
        self.caller = caller
        self.queue = queue
        self.count = count
        self.single = single
        self.timer: asyncio.TimerHandle | None = None
        self.done = False


class Node:
    """One storage node (DESIGN §4)."""

    def __init__(
        self,
        settings: NodeSettings,
        clock: Callable[[], int] = wall_clock_ms,
        engine: Engine | None = None,
        files: Files | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.engine = engine or Engine(clock, settings.engine)
        self.membership = Membership(settings.storage.data_dir)
        self.engine.memory_budget = settings.storage.memory_budget
        self.storage: Storage | None = None
        self.log: Any = MemoryLog()
        if settings.storage.data_dir:
            self.storage = Storage(settings.storage, files)
            self.log = self.storage.wal
        #: what answers wait for: the log's durable LSN, or a primary's commit LSN
        self.gate: Any = self.log
        self.recovery: Any = None
        self._http: Any = None
        self.http_port = 0
        self.measures = Measures()
        #: requests answered, by command; refusals by (command, error class)
        self.requests: dict[str, int] = {}
        self.refusals: dict[tuple[str, str], int] = {}
        #: connections closed or refused for a limit, by reason (docs/limits.md)
        self.drops: dict[str, int] = {}
        self.causes = Causes(log, f"node {settings.name}")
        self.count_requests = settings.metrics
        if settings.metrics:
            self.engine.observe_wait = self.measures.wait.observe
            self.engine.observe_run = self.measures.run.observe
            if self.storage is not None:
                self.storage.wal.observe_fsync = self.measures.fsync.observe
        self._blob_deletes: deque[tuple[int, list[int]]] = deque()
        self.failure: StorageFailure | None = None
        #: the follower's side of replication (a node with a data directory)
        self.follower = Follower(self, self.storage) if self.storage is not None else None
        self.cluster = Cluster(self)
        self.replication = Replication(self)
        self.peers = Peers(self)
        self.commands = Commands(self)
        self.handlers = self.commands.table
        self.sessions: set[Session] = set()
        self.inline_held: set[Any] = set()  # in-process callers with answers held (http_backend.py)
        self.waiters: dict[str, deque[Waiter]] = {}
        self.subscribers: dict[str, set[Session]] = {}
        self._next_owner = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: int | None = None
        self._reclaim: asyncio.TimerHandle | None = None
        self._rate_timers: dict[str, asyncio.TimerHandle] = {}
        self._outbox: list[tuple[Session, list[bytes]]] = []
        self.servers: list[asyncio.AbstractServer] = []
        self.started_at = clock()
        self.ready = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        from .server_tcp import start_tcp

        s = self.settings
        self.cluster.load()
        if self.storage is not None:
            self._recover()
        self.cluster.take_role()
        if s.tokens and not s.cluster_token:
            log.warning("client tokens but no cluster token: internal commands (slot moves, "
                        "cross-node dependencies, replication) are refused; set "
                        "--cluster-token to join a cluster")
        self.servers.append(await start_tcp(self, s.host, s.port))
        if s.http_port:
            from . import server_http

            self._http, self.http_port = await server_http.start(self)
        self.ready = True
        self.after_batch()
        self._reclaim_queues()

    def _recover(self) -> None:
        assert self.storage is not None
        wal = self.storage.wal
        report = self.recovery = self.storage.recover(self.engine)
        wal.on_durable = self.log_durable
        self.failure = StorageFailure(self, self.storage)
        wal.on_failure = self.failure.failed
        wal.on_flushed = self._maybe_snapshot
        if not self.cluster.replicated_member():
            # a single copy: its workers' connections died with it. A member of a replicated
            # shard keeps its leases: its workers may still hold them through a gateway.
            report.released = self.engine.release(sorted(self.engine.active), "node restarted")
        log.info(
            "recovered %d jobs in %.2fs (snapshot %s with %d records, %d WAL records replayed%s)",
            len(self.engine.jobs), report.seconds, report.snapshot, report.snapshot_records,
            report.replayed, f"; stopped early: {report.torn}" if report.torn else "",
        )

    @property
    def tcp_port(self) -> int:
        sock = self.servers[0].sockets[0]  # type: ignore[attr-defined]
        port: int = sock.getsockname()[1]
        return port

    async def stop(self) -> None:
        self.ready = False
        self.replication.close()
        await self.peers.close()
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        for server in self.servers:
            server.close()
        for session in list(self.sessions):
            session.close()
        for server in self.servers:
            await server.wait_closed()
        if self._timer:
            self._timer.cancel()
        if self._reclaim is not None:
            self._reclaim.cancel()
        for handle in self._rate_timers.values():
            handle.cancel()
        if self.failure is not None:
            self.failure.close()
        if self.storage is not None:
            self.storage.close()

    def new_owner(self) -> int:
        self._next_owner += 1
        return self._next_owner

    # -- executing lines ----------------------------------------------------------------------

    def execute(self, line: bytes, caller: Caller) -> bytes | None:
        """Run one request line; its encoded answer, or None if it waits (PENDING)."""
        try:
            try:
                req = _loads(line)
            except JSONDecodeError:
                req = P.parse_line(line)  # raises the precise Invalid: …
            if type(req) is not dict:
                req = P.parse_line(line)
        except ShardqError as exc:
            self.refused(None, exc)
            return P.error_answer(exc.text)
        return self.execute_request(req, caller)

    def execute_request(self, req: P.Request, caller: Caller) -> bytes | None:
        """Run one parsed request (TCP line or HTTP route); as ``execute``."""
        rid = None
        try:
            if "reqId" in req:
                rid = P.req_id_of(req)
            cmd = req.get("cmd")
            handler = self.handlers.get(cmd) if type(cmd) is str else None
            if handler is None or not caller.authed:
                handler = self.commands.handler(P.command_of(req), caller)
            if self.log.failed is not None and cmd not in READ_ONLY:
                raise StorageFailed(self.log.failed)
            if not self.cluster.standalone:
                self.cluster.check(str(cmd), req)
            answer = handler(req, caller)
            if self.count_requests:
                counts = self.requests
                counts[cmd] = counts.get(cmd, 0) + 1  # type: ignore[index,arg-type] # cmd: str
            if answer is PENDING:
                caller.pending_rid = rid
                return None
            return _encode(answer, rid)
        except ShardqError as exc:
            self.refused(req.get("cmd"), exc)
            return P.error_answer(exc.text, rid)
        except Exception as exc:  # a bug: this line gets an answer, the connection lives on
            error = self.internal(req.get("cmd"), exc)
            return P.error_answer(error.text, rid)

    def internal(self, cmd: object, exc: Exception) -> InternalError:
        """An unexpected exception while running one request: its ``Internal: …`` answer."""
        name = cmd if type(cmd) is str and cmd in self.handlers else "a request"
        error = self.causes.error(name, exc)
        self.refused(cmd, error)
        return error

    def dropped(self, reason: str) -> None:
        """Count a connection closed or refused for a limit (``shardq_connections_dropped``)."""
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def refused(self, cmd: object, exc: ShardqError) -> None:
        """Count a refusal by command and kind (``shardq_requests_refused_total``)."""
        name = cmd if type(cmd) is str and cmd in self.handlers else "other"
        key = (name, type(exc).__name__)
        self.refusals[key] = self.refusals.get(key, 0) + 1

    def push(self, queue: str, specs: list[JobSpec], payloads: list[bytes]) -> list[Job]:
        """Push through the memory budget: spill to the blob store, or refuse when full."""
        if self.log.failed is not None:
            raise StorageFailed(self.log.failed)
        budget = self.settings.storage
        if specs and (specs[0].depends_on or len(specs) > 1):
            self._check_parents(specs)
        if len(payloads) == 1:  # the common case: one payload well within the budgets
            size = len(payloads[0])
            if (size <= budget.blob_threshold
                    and self.engine.payload_bytes + size <= budget.memory_budget):
                return self.engine.push(queue, specs, payloads)  # type: ignore[arg-type]
        storage = self.storage
        in_memory = self.engine.payload_bytes
        spill: list[tuple[int, bytes]] = []
        stored: list[bytes | BlobRef] = list(payloads)
        on_disk = storage.blobs.used if storage is not None else 0
        for i, data in enumerate(payloads):
            size = len(data)
            if size <= budget.blob_threshold and in_memory + size <= budget.memory_budget:
                in_memory += size
                continue
            if storage is None:
                if in_memory + size <= budget.memory_budget:  # no disk: big ones stay here
                    in_memory += size
                    continue
                raise QueueFull()
            if on_disk + size > budget.disk_budget:
                raise QueueFull()
            on_disk += size
            spill.append((i, data))
            stored[i] = BlobRef(size)
        if not spill:
            return self.engine.push(queue, specs, stored)
        assert storage is not None
        return self._push_spilled(storage, queue, specs, stored, spill)

    def _push_spilled(self, storage: Storage, queue: str, specs: list[JobSpec],
                      stored: list[bytes | BlobRef], spill: list[tuple[int, bytes]]) -> list[Job]:
        """Blobs first, then the jobs: a blob that cannot be written (ENOSPC, EMFILE, EIO)
        fails the storage before any job exists or is counted."""
        ids = self.engine.next_ids(queue, len(specs))
        try:
            fds = storage.blobs.write_all([(ids[i], data) for i, data in spill])
        except OSError as exc:
            storage.wal.fail(f"write to blob store failed: {exc.strerror or exc}")
            raise StorageFailed(str(storage.wal.failed)) from None
        try:
            jobs = self.engine.push(queue, specs, stored)
        except BaseException:  # refused (a duplicate key, ...): no blob stays behind
            storage.blobs.discard([ids[i] for i, _ in spill], fds)
            raise
        assert [j.id for j in jobs] == ids
        for i, data in spill:  # a replicated primary sends them with their records
            self.replication.note_blob(ids[i], data)
        for fd in fds:
            if storage.wal.policy == "always":
                storage.wal.extra_fsync.append(fd)
            else:
                storage.files.close(fd)
        return jobs

    def _check_parents(self, specs: list[JobSpec]) -> None:
        """Parents in other slots that this node serves must exist (elsewhere: the WATCH
        answer decides, and an unknown parent sends the child to the DLQ)."""
        for spec in specs:
            for parent in spec.depends_on or ():
                if self.cluster.serves(parent % SLOTS) and \
                        self.engine.deps.state_of(parent) == "unknown":
                    raise InvalidRequest(f"depends_on: job {parent} not found")

    def job_wire(self, job: Job) -> dict[str, Any]:
        if type(job.data) is BlobRef:
            return job.wire(self.read_blob(job.id))
        return job.wire()

    def flush(self) -> int:
        """Drain the engine's journal into the log; the position answers now depend on."""
        engine = self.engine
        journal = engine.journal
        if journal:
            engine.journal = []
            if self.replication.follows:  # a bug: a follower changed its own state
                log.error("a follower made %d records of its own (%s); rebuilding from disk",
                          len(journal), journal[0][0])
                self.rebuild()
                return int(self.log.seq)
            self.log.append(journal)
        if engine.dropped_blobs:
            self._blob_deletes.append((int(self.log.seq), engine.dropped_blobs))
            engine.dropped_blobs = []
        return int(self.log.seq)

    def after_batch(self) -> None:
        """After commands ran: wake waiters, deliver events, flush, send, re-arm timers."""
        engine = self.engine
        if engine.wakeups:
            woken = engine.wakeups
            engine.wakeups = set()
            for queue in woken:
                if queue in self.waiters:
                    self._serve(queue)
        if (engine.deps.to_watch or engine.deps.outbox) and self.replication.writable:
            self.peers.pump()
        if engine.events:
            self._deliver_events()
        tag = self.flush()
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            for session, lines in outbox:
                session.send(lines, tag)
        self.schedule_timer()

    def log_durable(self) -> None:
        """The WAL made more records durable (its ``on_durable``)."""
        repl = self.replication
        if repl.replicated:
            repl.local_durable()
        if self.gate is self.log:
            self.released()

    def released(self) -> None:
        """More answers may go: the log made more records durable (a single copy), or a
        majority of the shard holds more (a replicated primary)."""
        durable = self.gate.durable
        for session in list(self.sessions):
            if session.held:
                session.release(durable)
        for caller in list(self.inline_held):
            caller.release(durable)
        deletes = self._blob_deletes
        while deletes and deletes[0][0] <= durable:
            assert self.storage is not None
            for job_id in deletes.popleft()[1]:
                self.storage.blobs.remove(job_id)

    def _maybe_snapshot(self) -> None:
        if self.storage is not None and self.storage.snapshot_due():
            self.storage.start_snapshot(self.engine)

    # -- storage failure (failure.py) -----------------------------------------------------------

    def answer_unpersisted(self, durable: int, text: str) -> None:
        """Storage failed: every answer that waited for a write past ``durable``, and every
        blocked pull, gets ``text``; pending blob deletions are forgotten (the reload scans)."""
        for session in [*self.sessions, *self.inline_held]:
            session.fail_held(durable, text)
        for waiters in list(self.waiters.values()):
            for waiter in list(waiters):
                self._finish_waiter(waiter, {"ok": False, "error": text})
        self.waiters.clear()
        self._outbox_flush()
        self._blob_deletes.clear()

    # -- replacing the engine (a follower's rebuild, a storage failure's reload) ------------------

    def fresh_engine(self) -> Engine:
        """An empty engine that observes and emits as this one does (to load from disk)."""
        fresh = Engine(self.clock, self.settings.engine)
        fresh.watch = self.engine.watch
        fresh.observe_wait, fresh.observe_run = self.engine.observe_wait, self.engine.observe_run
        fresh.emitting = self.engine.emitting
        fresh.memory_budget = self.engine.memory_budget
        return fresh

    def use_engine(self, engine: Engine) -> None:
        """From now on ``engine`` is this node's: every part that holds the engine gets it."""
        self.engine = self.commands.engine = engine

    def rebuild(self) -> None:
        """Load the engine anew from disk (a follower whose log was cut or replaced)."""
        storage = self.storage
        assert storage is not None
        self._blob_deletes.clear()
        fresh = self.fresh_engine()
        self.recovery = storage.recover(fresh)
        self.use_engine(fresh)

    def blobs_dropped(self, lsn: int, job_ids: list[int]) -> None:
        """The blobs of these finished jobs go once the log is durable past ``lsn``."""
        self._blob_deletes.append((lsn, job_ids))

    def fail_unconfirmed(self, durable: int, text: str) -> None:
        """This node stopped being primary, or lost its quorum: answers past ``durable`` (the
        last commit) were never confirmed by a majority; they get ``text`` instead."""
        for session in [*self.sessions, *self.inline_held]:
            session.fail_held(durable, text)
        self._outbox_flush()

    def _outbox_flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        for session, lines in outbox:
            if session.transport is not None and not session.closing:
                session.transport.write(b"".join(lines))

    # -- blocked pulls ------------------------------------------------------------------------

    def wait(
        self, caller: Caller, queue: str, count: int, timeout: int | None, single: bool
    ) -> Answer:
        session: Session = caller  # type: ignore[assignment]
        waiter = Waiter(session, queue, count, single)
        self.waiters.setdefault(queue, deque()).append(waiter)
        session.waiter = waiter
        if timeout is not None:
            loop = asyncio.get_running_loop()
            waiter.timer = loop.call_later(timeout / 1000, self._expire_waiter, waiter)
        self._arm_rate_timer(queue)
        return PENDING

    def _finish_waiter(self, waiter: Waiter, answer: Answer) -> None:
        waiter.done = True
        if waiter.timer is not None:
            waiter.timer.cancel()
        session = waiter.caller
        session.waiter = None
        self._outbox.append((session, [_encode(answer, session.pending_rid)]))
        asyncio.get_running_loop().call_soon(session.resume)

    def _expire_waiter(self, waiter: Waiter) -> None:
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
        self._finish_waiter(waiter, _empty(waiter))
        self.after_batch()

    def drop_waiter(self, session: Session) -> None:
        waiter = session.waiter
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

    def _serve(self, queue: str) -> None:
        waiters = self.waiters[queue]
        engine = self.engine
        max_bytes = self.settings.limits.max_output
        while waiters:
            waiter = waiters[0]
            jobs = engine.pull(queue, waiter.caller.owner, waiter.count, max_bytes)
            if not jobs:
                break
            waiters.popleft()
            try:
                wire = [self.job_wire(j) for j in jobs]
            except ShardqError as exc:  # a blob that cannot be read
                self._finish_waiter(waiter, {"ok": False, "error": exc.text})
                continue
            answer = {"ok": True, "job": wire[0]} if waiter.single else {"ok": True, "jobs": wire}
            self._finish_waiter(waiter, answer)
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

    # -- events -------------------------------------------------------------------------------

    def subscribe(self, caller: Caller, queue: str, events: frozenset[str]) -> None:
        session: Session = caller  # type: ignore[assignment]
        if queue not in session.subscriptions:
            self.engine.watch[queue] = self.engine.watch.get(queue, 0) + 1
            self.subscribers.setdefault(queue, set()).add(session)
        session.subscriptions[queue] = events

    def unsubscribe(self, caller: Caller, queue: str) -> None:
        session: Session = caller  # type: ignore[assignment]
        if session.subscriptions.pop(queue, None) is None:
            return
        watch = self.engine.watch
        watch[queue] -= 1
        if not watch[queue]:
            del watch[queue]
        subs = self.subscribers.get(queue)
        if subs is not None:
            subs.discard(session)
            if not subs:
                del self.subscribers[queue]

    def _deliver_events(self) -> None:
        events, self.engine.events = self.engine.events, []
        for event, queue, job in events:
            line = None
            for key in (queue, "*"):
                for session in self.subscribers.get(key, ()):
                    if event in session.subscriptions.get(key, ()):
                        if line is None:
                            line = orjson.dumps({"event": event, "queue": queue, "job": job})
                        if session.push_event(line):
                            self._outbox.append((session, [line + b"\n"]))

    # -- timers ---------------------------------------------------------------------------------

    def schedule_timer(self) -> None:
        if not self.engine.timers.dirty or not self.replication.writable:
            return
        at = self.engine.timers.next_deadline()
        if at is None or (self._timer_at is not None and self._timer_at <= at):
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = at
        self._timer = loop.call_later(max(0.0, (at - self.clock()) / 1000), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.engine.timers.dirty = True  # after this tick, look for the next deadline
        if self.log.failed is not None or not self.replication.writable:
            return  # nothing may change while storage refuses writes, nor on a follower
        try:
            self.engine.timers.tick()
        except ShardqError as exc:  # storage refused: try again shortly
            log.warning("timer work postponed: %s", exc)
        self.after_batch()

    def _reclaim_queues(self) -> None:
        """Forget queues left empty for ``queue_idle_ms`` (Engine.reclaim_queues), every
        quarter of that (at least every 50 ms, at most every 5 s)."""
        self.engine.reclaim_queues()
        every = min(5.0, max(0.05, self.settings.engine.queue_idle_ms / 4000))
        self._reclaim = asyncio.get_running_loop().call_later(every, self._reclaim_queues)

    # -- connections --------------------------------------------------------------------------

    def closed(self, session: Session) -> None:
        self.sessions.discard(session)
        self.drop_waiter(session)
        for queue in list(session.subscriptions):
            self.unsubscribe(session, queue)
        if self.log.failed is not None or self.replication.follows:
            return  # a follower writes only what its primary sends
        if self.engine.release_owner(session.owner, "worker disconnected"):
            self.after_batch()

    # -- introspection --------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        queued = processing = delayed = dlq = children = 0
        for q in self.engine.queues.values():
            queued += q.n_waiting
            processing += q.n_active
            delayed += q.n_delayed
            children += q.n_children
            dlq += len(q.dlq)
        engine = self.engine
        storage = self.storage
        retrying = sum(1 for key in engine.timers.delayed
                       if (j := engine.jobs.get(key & ((1 << 53) - 1))) is not None
                       and j.state is DELAYED and j.attempts)
        return {
            "queued": queued, "processing": processing, "delayed": delayed, "dlq": dlq,
            "waiting_children": children, "jobs": len(engine.jobs), "retrying": retrying,
            "memory_bytes": engine.payload_bytes,
            "blobs": storage.blobs.count if storage else 0,
            "blob_bytes": storage.blobs.used if storage else 0,
            "storage_failed": self.log.failed is not None,
            "queues": len(engine.queues), "crons": len(engine.crons.entries),
            "cron_ticks_skipped": engine.crons.skipped,
        }

    def list_queues(
        self, after: str | None = None, limit: int | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """The first ``limit`` queues by name (after ``after``; default ``max_list_queues``);
        and whether more remain."""
        limit = limit or self.settings.request_limits.max_list_queues
        queues = self.engine.queues
        names = (n for n in queues if after is None or n > after)
        page = heapq.nsmallest(limit + 1, names)
        out = []
        for name in page[:limit]:
            q = queues[name]
            out.append({
                "name": name, "pending": q.pending, "processing": q.n_active, "dlq": len(q.dlq),
                "paused": q.paused, "rate_limit": q.rate.limit if q.rate else None,
                "concurrency_limit": q.concurrency or None, "waiting": q.n_waiting,
                "delayed": q.n_delayed, "waiting_children": q.n_children,
            })
        return out, len(page) > limit

    def metrics(self) -> dict[str, Any]:
        e = self.engine
        now_s = self.clock() // 1000
        window = [r for r in e.recent if r[0] >= now_s - 10]
        completions = sum(r[1] for r in window)
        run_ms = sum(r[2] for r in window)
        seconds = max(1, min(10, now_s - window[0][0] + 1)) if window else 1
        return {
            "total_pushed": e.total_pushed,
            "total_completed": e.total_completed,
            "total_failed": e.total_failed,
            "jobs_per_second": float(completions) / seconds,
            "avg_latency_ms": float(run_ms) / completions if completions else 0.0,
            "queues": [
                {
                    "name": q["name"], "pending": q["pending"], "processing": q["processing"],
                    "dlq": q["dlq"], "rate_limit": q["rate_limit"],
                }
                for q in self.list_queues()[0]
            ],
        }

    def topology(self) -> dict[str, Any] | None:
        topo = self.cluster.topology
        return topo.wire() if topo is not None else None

    def topology_changed(self) -> None:
        """Blocked pulls on slots this node no longer serves are answered with the reason."""
        cluster = self.cluster
        for queue in list(self.waiters):
            slot = cluster.slot_of_queue(queue)
            if cluster.serves(slot):
                continue
            try:
                cluster.check("PULL", {"queue": queue})
            except ShardqError as exc:
                error = {"ok": False, "error": exc.text}
            for waiter in self.waiters.pop(queue):
                self._finish_waiter(waiter, error)
        self.after_batch()

    def read_blob(self, job_id: int) -> bytes:
        """A payload from the blob store; StorageFailed names why it cannot be read (EMFILE,
        EIO). A pulled job whose blob cannot be read stays leased to its puller (its lease
        ends as any other: disconnect, timeout)."""
        assert self.storage is not None
        try:
            return self.storage.blobs.read(job_id)
        except OSError as exc:
            raise StorageFailed(f"read from blob store failed: {exc.strerror or exc}") from None


def _encode(answer: Answer, rid: str | int | None) -> bytes:
    if rid is None:
        if answer is OK:
            return P.OK_LINE
        if type(answer) is Encoded:
            return answer.line
        return orjson.dumps(answer) + b"\n"
    if type(answer) is Encoded:
        answer = orjson.loads(answer.line)
    return orjson.dumps({**answer, "reqId": rid}) + b"\n"


def _empty(waiter: Waiter) -> Answer:
    return {"ok": True, "job": None} if waiter.single else {"ok": True, "jobs": []}
