"""A running node: its lifecycle, request execution and group commit; it wires the rooms.

The runtime turns engine calls into durable, ordered answers. After each
batch of commands it drains the engine's journal into the log, tags every
answer with the log position it depends on, and lets an answer out only when
the log says that position is durable (group commit, DESIGN §4). After a batch
it also hands woken queues to the blocked pulls (pulls.py), events to their
subscribers (events.py), dependency messages to peers (peers.py), and re-arms the
engine's timer. Payload budgets and blobs are payloads.py's, STATS and friends
introspection.py's, the follower's side of replication following.py's.

Must not: change engine state except through engine methods, or block the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from orjson import JSONDecodeError
from orjson import loads as _loads

from shardq.errors import InternalError, ShardqError, StorageFailed
from shardq.wire import commands as C
from shardq.wire import protocol as P
from shardq_server.running import Causes

from .cluster import Cluster
from .commands import PENDING, Commands, encode_answer
from .engine import Engine
from .events import Events
from .failure import StorageFailure
from .following import Follower
from .membership import Membership
from .metrics import Measures
from .payloads import Payloads
from .peers import Peers
from .pulls import Pulls
from .pulls import Waiter as Waiter  # server_tcp.py types a session's waiter with it
from .replication import Replication
from .settings import NodeSettings
from .storage import Storage
from .wal import Files

if TYPE_CHECKING:
    from .callers import Caller, Recipient
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
        #: answers of blocked pulls and event lines of this batch: sent after its group commit
        self.outbox: list[tuple[Recipient, list[bytes]]] = []
        self.payloads = Payloads(self.engine, settings.storage, self.storage, self.log,
                                 self.cluster.serves, self.replication.note_blob)
        self.pulls = Pulls(self.engine, clock, self.outbox, self.payloads.job_wire,
                           settings.limits.max_output, self.after_batch)
        self.events = Events(self.engine, self.outbox)
        self.commands = Commands(
            settings=settings, engine=self.engine, cluster=self.cluster, payloads=self.payloads,
            pulls=self.pulls, events=self.events, storage=self.storage, log=self.log, clock=clock)
        self.handlers = self.commands.table
        self.sessions: set[Session] = set()
        self.inline_held: set[Any] = set()  # in-process callers with answers held (http_backend.py)
        self._next_owner = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: int | None = None
        self._reclaim: asyncio.TimerHandle | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.started_at = clock()
        self.ready = False
        #: set by ``stop``: a connection that closes from then on keeps its leases (below)
        self.stopping = False

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
            self.engine.job_count(), report.seconds, report.snapshot, report.snapshot_records,
            report.replayed, f"; stopped early: {report.torn}" if report.torn else "",
        )

    @property
    def tcp_port(self) -> int:
        sock = self.servers[0].sockets[0]  # type: ignore[attr-defined]
        port: int = sock.getsockname()[1]
        return port

    async def stop(self) -> None:
        self.ready = False
        self.stopping = True
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
        self.pulls.close()
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
            return encode_answer(answer, rid)
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
            if self.pulls.waiters:
                self.pulls.wake(woken)
        if (engine.deps.to_watch or engine.deps.outbox) and self.replication.writable:
            self.peers.pump()
        if engine.events:
            self.events.deliver()
        tag = self.flush()
        outbox = self.outbox
        if outbox:
            batch = outbox.copy()
            outbox.clear()
            for recipient, lines in batch:
                recipient.send(lines, tag)
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
        self.pulls.fail_all(text)
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
        self.engine = engine
        self.commands.engine = self.payloads.engine = engine
        self.pulls.engine = self.events.engine = engine

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
        """Storage failed or the primary stepped down: the outbox goes out now, unheld (its
        lines are errors and events)."""
        batch = self.outbox.copy()
        self.outbox.clear()
        for recipient, lines in batch:
            if recipient.transport is not None and not recipient.closing:
                recipient.transport.write(b"".join(lines))

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
        self.pulls.drop(session)
        for queue in list(session.subscriptions):
            self.events.unsubscribe(session, queue)
        if self.log.failed is not None or self.replication.follows:
            return  # a follower writes only what its primary sends
        if self.stopping:
            # A node going down writes nothing more (its log may be closed already): a
            # replicated member's leases stay valid on the member promoted next, so a
            # worker's ACK still lands there; a single copy releases them when it starts
            # again (_recover).
            return
        if self.engine.release_owner(session.owner, "worker disconnected"):
            self.after_batch()

    # -- topology -----------------------------------------------------------------------------

    def topology_changed(self) -> None:
        """Blocked pulls on slots this node no longer serves are answered with the reason."""
        self.pulls.refuse_unserved(self.cluster)
        self.after_batch()
