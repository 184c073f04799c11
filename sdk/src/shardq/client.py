"""AsyncClient: every protocol command as a coroutine, over pipelined connections.

Non-blocking commands share one pipelined connection. A blocking pull would
hold back every answer behind it on its connection (PROTOCOL.md), so each
pull in flight takes a connection of its own from a small pool; the jobs it
leases belong to that connection and are returned by the node if it closes.

A request that was certainly not run is sent again on a new connection to the same
address (through a Service: another gateway), for up to ``RESEND_BUDGET`` seconds:
one a draining gateway refused (``GatewayDraining``), or one whose connection could not
be opened (``NotSent``). A request whose answer was lost is never sent again: it may
have run (``ShardqConnectionError``, as before).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from shardq.connection import DEFAULT_ADDRESS, Connection
from shardq.errors import GatewayDraining, Moved, NotSent, ShardqConnectionError, TryAgain
from shardq.wire.commands import TABLE, Route
from shardq.wire.job import Job
from shardq.wire.retry import MOVED, Retry, kind_of
from shardq.wire.slots import SlotCache
from shardq.wire.topology import Topology

JobRef = int | Job  # an id, or a Job received from the server
#: Direct mode: how long a request refused for a slot move is retried (seconds).
DIRECT_RETRY_BUDGET = 5.0
#: How long a request that was not run (a draining gateway, a connection that could not be
#: opened) is sent again on a new connection before its error is raised (seconds).
RESEND_BUDGET = 10.0


def _id(job: JobRef) -> int:
    return job.id if isinstance(job, Job) else job


def _lease(job: JobRef, lease: int | None) -> int | None:
    if lease is not None:
        return lease
    return job.started_at if isinstance(job, Job) and job.started_at else None


def job_options(
    priority: int = 0,
    delay: int | None = None,
    ttl: int | None = None,
    timeout: int | None = None,
    max_attempts: int | None = None,
    backoff: int | None = None,
    unique_key: str | None = None,
    depends_on: Sequence[JobRef] | None = None,
) -> dict[str, Any]:
    """The optional job fields, leaving out the ones not set."""
    opts: dict[str, Any] = {}
    if priority:
        opts["priority"] = priority
    for name, value in (
        ("delay", delay), ("ttl", ttl), ("timeout", timeout), ("max_attempts", max_attempts),
        ("backoff", backoff), ("unique_key", unique_key),
    ):
        if value is not None:
            opts[name] = value
    if depends_on:
        opts["depends_on"] = [_id(j) for j in depends_on]
    return opts


async def resend(attempt: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """``attempt()``, again while it fails with a request that was not run: at once the
    first time (a new connection goes to another gateway), then after growing pauses
    (shardq.wire.retry), for ``RESEND_BUDGET`` seconds."""
    retry: Retry | None = None
    while True:
        try:
            return await attempt()
        except (GatewayDraining, NotSent):
            if retry is None:
                retry = Retry(RESEND_BUDGET)
                continue
            pause = retry.pause()
            if pause is None:
                raise
            await asyncio.sleep(pause)


class AsyncClient:
    """A client of one shardq address (a gateway Service, or a node)."""

    def __init__(
        self, address: str = DEFAULT_ADDRESS, *, token: str | None = None, direct: bool = False
    ) -> None:
        """``address``: a gateway (or a node). ``direct=True``: read the topology from there
        and send queue and job commands straight to the node that owns them (following
        MOVED and TRYAGAIN like a gateway); cluster-wide reads still go to ``address``."""
        self.address = address
        self.token = token
        self.direct = direct
        self.routing: Topology | None = None  # direct mode: the topology it routes by
        self._slots = SlotCache()
        self._main: dict[str, Connection] = {}
        self._idle: dict[str, list[Connection]] = {}
        self._all: set[Connection] = set()
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        await self._conn(self.address)
        if self.direct:
            await self.refresh_topology()

    async def close(self) -> None:
        conns = list(self._all)
        self._all.clear()
        self._idle.clear()
        self._main.clear()
        for conn in conns:
            await conn.close()

    async def _open(self, address: str) -> Connection:
        conn = await Connection(address, self.token).open()
        self._all.add(conn)
        return conn

    async def _conn(self, address: str) -> Connection:
        conn = self._main.get(address)
        if conn is None or conn.closed:
            async with self._lock:
                conn = self._main.get(address)
                if conn is None or conn.closed:
                    conn = self._main[address] = await self._open(address)
        return conn

    async def refresh_topology(self) -> None:
        answer = await (await self._conn(self.address)).call({"cmd": "TOPOLOGY"})
        raw = answer.get("topology")
        self.routing = Topology.from_wire(raw) if raw else None

    def _target(self, req: dict[str, Any]) -> str:
        """Where ``req`` goes: its owner in direct mode, else the client's address."""
        topo = self.routing
        if not self.direct or topo is None:
            return self.address
        command = TABLE.get(req["cmd"])
        route = command.route if command is not None else None
        if route is Route.QUEUE:
            owner = topo.owners[self._slots.slot_of(req["queue"])]
        elif route is Route.ID:
            owner = topo.owner_of_id(req["id"])
        else:
            return self.address
        node = topo.primary_node(owner)
        return node.tcp if node is not None else self.address

    async def call(self, req: dict[str, Any]) -> dict[str, Any]:
        if not self.direct:
            return await resend(lambda: self._call_main(req))
        return await self._routed(req, blocking=False)

    async def _call_main(self, req: dict[str, Any]) -> dict[str, Any]:
        return await (await self._conn(self.address)).call(req)

    async def _routed(self, req: dict[str, Any], blocking: bool) -> dict[str, Any]:
        """Direct mode: to the owner, refused for a slot move retried as a gateway does
        (shardq.wire.retry): MOVED reads the topology again, TRYAGAIN waits a little."""
        retry: Retry | None = None
        while True:
            address = self._target(req)
            try:
                if blocking:
                    return await self._on_own_connection(address, req)
                return await (await self._conn(address)).call(req)
            except (Moved, TryAgain) as exc:
                if retry is None:
                    retry = Retry(DIRECT_RETRY_BUDGET)
                if isinstance(exc, Moved):
                    await self.refresh_topology()
                pause = retry.moved_pause() if kind_of(exc) == MOVED else retry.pause()
                if pause is None:
                    raise
                if pause:
                    await asyncio.sleep(pause)

    async def _blocking(self, req: dict[str, Any]) -> dict[str, Any]:
        """Run a request that may wait on a connection of its own."""
        if self.direct:
            return await self._routed(req, blocking=True)
        return await resend(lambda: self._on_own_connection(self.address, req))

    async def _on_own_connection(self, address: str, req: dict[str, Any]) -> dict[str, Any]:
        idle = self._idle.setdefault(address, [])
        while idle:
            conn = idle.pop()
            if not conn.closed:
                break
        else:
            conn = await self._open(address)
        try:
            answer = await conn.call(req)
        except BaseException:
            self._all.discard(conn)
            await conn.close()
            raise
        idle.append(conn)
        return answer

    # -- producing ------------------------------------------------------------------------------

    async def push(
        self,
        queue: str,
        data: Any,
        *,
        priority: int = 0,
        delay: int | None = None,
        ttl: int | None = None,
        timeout: int | None = None,
        max_attempts: int | None = None,
        backoff: int | None = None,
        unique_key: str | None = None,
        depends_on: Sequence[JobRef] | None = None,
    ) -> int:
        """Push one job. Times in ms; ``depends_on`` takes ids or Jobs."""
        opts = job_options(priority, delay, ttl, timeout, max_attempts, backoff, unique_key,
                           depends_on)
        req = {"cmd": "PUSH", "queue": queue, "data": data, **opts}
        answer = await self.call(req)
        return int(answer["id"])

    async def push_batch(self, queue: str, jobs: Iterable[Mapping[str, Any]]) -> list[int]:
        """Push many jobs at once; each item is ``{"data": ..., **options}``."""
        items = []
        for item in jobs:
            opts = {k: v for k, v in item.items() if k != "data"}
            items.append({"data": item["data"], **job_options(**opts)})
        answer = await self.call({"cmd": "PUSHB", "queue": queue, "jobs": items})
        return list(answer["ids"])

    # -- consuming ------------------------------------------------------------------------------

    async def pull(self, queue: str, timeout: int | None = None) -> Job | None:
        """Lease one job; wait up to ``timeout`` ms (None = until one comes)."""
        req: dict[str, Any] = {"cmd": "PULL", "queue": queue}
        if timeout is not None:
            req["timeout"] = timeout
        answer = await (self.call(req) if timeout == 0 else self._blocking(req))
        job = answer.get("job")
        return None if job is None else Job.from_wire(job)

    async def pull_batch(self, queue: str, count: int, timeout: int | None = None) -> list[Job]:
        req: dict[str, Any] = {"cmd": "PULLB", "queue": queue, "count": count}
        if timeout is not None:
            req["timeout"] = timeout
        answer = await (self.call(req) if timeout == 0 else self._blocking(req))
        return [Job.from_wire(j) for j in answer["jobs"]]

    async def ack(self, job: JobRef, result: Any = None, *, lease: int | None = None) -> None:
        req: dict[str, Any] = {"cmd": "ACK", "id": _id(job)}
        if result is not None:
            req["result"] = result
        token = _lease(job, lease)
        if token is not None:
            req["lease"] = token
        await self.call(req)

    async def ack_batch(self, jobs: Sequence[JobRef], results: Sequence[Any] | None = None) -> int:
        """Ack many jobs in one request; returns how many were acked. Jobs received from
        the server carry their lease tokens: a stale attempt is not acked (not counted)."""
        req: dict[str, Any] = {"cmd": "ACKB", "ids": [_id(j) for j in jobs]}
        if results is not None:
            req["results"] = list(results)
        if jobs and all(isinstance(j, Job) and j.started_at for j in jobs):
            req["leases"] = [j.started_at for j in jobs]  # type: ignore[union-attr]
        answer = await self.call(req)
        return int(answer["ids"][0])

    async def fail(
        self, job: JobRef, error: str | None = None, *, lease: int | None = None
    ) -> None:
        req: dict[str, Any] = {"cmd": "FAIL", "id": _id(job)}
        if error is not None:
            req["error"] = error
        token = _lease(job, lease)
        if token is not None:
            req["lease"] = token
        await self.call(req)

    async def touch(
        self, job: JobRef, extend: int | None = None, *, lease: int | None = None
    ) -> int:
        """Extend a job's lease; returns the new deadline (ms)."""
        req: dict[str, Any] = {"cmd": "TOUCH", "id": _id(job)}
        token = _lease(job, lease)
        if token is not None:
            req["lease"] = token
        if extend is not None:
            req["extend"] = extend
        answer = await self.call(req)
        return int(answer["deadline"])

    async def progress(
        self, job: JobRef, progress: int, message: str | None = None, *, lease: int | None = None
    ) -> None:
        req: dict[str, Any] = {"cmd": "PROGRESS", "id": _id(job), "progress": progress}
        if message is not None:
            req["message"] = message
        token = _lease(job, lease)
        if token is not None:
            req["lease"] = token
        await self.call(req)

    async def get_progress(self, job: JobRef) -> tuple[int, str | None]:
        answer = await self.call({"cmd": "GETPROGRESS", "id": _id(job)})
        p = answer["progress"]
        return int(p["progress"]), p["message"]

    async def get_result(self, job: JobRef) -> Any:
        answer = await self.call({"cmd": "GETRESULT", "id": _id(job)})
        return answer["result"]

    async def get_job(self, job: JobRef) -> dict[str, Any] | None:
        answer = await self.call({"cmd": "GETJOB", "id": _id(job)})
        found: dict[str, Any] | None = answer["job"]
        return found

    async def cancel(self, job: JobRef) -> None:
        await self.call({"cmd": "CANCEL", "id": _id(job)})

    # -- dead letters ---------------------------------------------------------------------------

    async def dlq(self, queue: str, count: int = 100) -> list[Job]:
        answer = await self.call({"cmd": "DLQ", "queue": queue, "count": count})
        return [Job.from_wire(j) for j in answer["jobs"]]

    async def retry_dlq(self, queue: str, job: JobRef | None = None) -> int:
        req: dict[str, Any] = {"cmd": "RETRYDLQ", "queue": queue}
        if job is not None:
            req["id"] = _id(job)
        answer = await self.call(req)
        return int(answer["ids"][0])

    # -- queue control --------------------------------------------------------------------------

    async def pause(self, queue: str) -> None:
        await self.call({"cmd": "PAUSE", "queue": queue})

    async def resume(self, queue: str) -> None:
        await self.call({"cmd": "RESUME", "queue": queue})

    async def set_rate_limit(self, queue: str, limit: int) -> None:
        await self.call({"cmd": "RATELIMIT", "queue": queue, "limit": limit})

    async def clear_rate_limit(self, queue: str) -> None:
        await self.call({"cmd": "RATELIMITCLEAR", "queue": queue})

    async def set_concurrency(self, queue: str, limit: int) -> None:
        await self.call({"cmd": "SETCONCURRENCY", "queue": queue, "limit": limit})

    async def clear_concurrency(self, queue: str) -> None:
        await self.call({"cmd": "CLEARCONCURRENCY", "queue": queue})

    # -- cron -----------------------------------------------------------------------------------

    async def add_cron(
        self, name: str, queue: str, schedule: str, data: Any = None, priority: int = 0
    ) -> None:
        await self.call({
            "cmd": "CRON", "name": name, "queue": queue, "data": data, "schedule": schedule,
            "priority": priority,
        })

    async def delete_cron(self, name: str) -> None:
        await self.call({"cmd": "CRONDELETE", "name": name})

    async def list_crons(self) -> list[dict[str, Any]]:
        answer = await self.call({"cmd": "CRONLIST"})
        return list(answer["crons"])

    # -- introspection --------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        answer = await self.call({"cmd": "STATS"})
        answer.pop("ok", None)
        return answer

    async def metrics(self) -> dict[str, Any]:
        answer = await self.call({"cmd": "METRICS"})
        metrics: dict[str, Any] = answer["metrics"]
        return metrics

    async def list_queues(self) -> list[dict[str, Any]]:
        answer = await self.call({"cmd": "LISTQUEUES"})
        return list(answer["queues"])

    async def topology(self) -> dict[str, Any] | None:
        answer = await self.call({"cmd": "TOPOLOGY"})
        topo: dict[str, Any] | None = answer.get("topology")
        return topo

    # -- events ---------------------------------------------------------------------------------

    async def events(
        self, queue: str, events: Sequence[str] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Subscribe on a connection of its own and yield ``{"event","queue","job"}`` dicts."""
        conn = await self._open(self.address)
        try:
            req: dict[str, Any] = {"cmd": "SUBSCRIBE", "queue": queue}
            if events is not None:
                req["events"] = list(events)
            await conn.call(req)
            while True:
                event = await conn.events.get()
                if event is None:
                    raise conn.error or ShardqConnectionError("subscription closed")
                yield event
        finally:
            self._all.discard(conn)
            await conn.close()
