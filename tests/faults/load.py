"""The steady load of a fault round: producers and workers on the raw protocol through the
gateway, every operation written to the round's ``History``.

Producers push jobs whose payload ``{"p": P}`` carries an id no other push carries,
round-robin over the queues, up to ``max_pushes`` in all. Workers sweep the queues
with ``PULLB`` (``timeout: 0``) and ack every job with its lease token. Each job has a
``timeout`` (its lease), so a job whose ack was lost comes back after it. Every request
has a deadline (``op_timeout``): one that passes it is ``info`` (unknown outcome) and its
connection is dropped (the gateway hands back what that connection leased).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass
from typing import Any

from shardq.connection import Connection
from shardq.errors import ShardqError

from .history import History

#: After an error: the next request of that client waits this long (a rate limit, so a
#: refused node does not turn a client into a busy loop).
ERROR_PAUSE = 0.05
#: A worker whose whole sweep found nothing looks again after this long (a poll rate).
IDLE_PAUSE = 0.02


@dataclass
class LoadConfig:
    producers: int = 3
    workers: int = 3
    max_pushes: int = 4000
    push_pause: float = 0.003  # between one producer's pushes
    pull_count: int = 8
    #: Odd-numbered workers pull with this timeout (a blocking pull, on a connection of its
    #: own at the gateway); even ones with 0 (over the shared connections).
    blocking_pull_ms: int = 50
    #: Each pulled batch is "worked on" for up to this long before its acks, so faults
    #: also land between a pull and its ack (lost leases, redeliveries, refused acks).
    work_time: float = 0.03
    lease_ms: int = 3000  # each job's timeout: an attempt whose ack was lost comes back
    op_timeout: float = 5.0  # longer than any pause fault, so paused requests complete


class Session:
    """One client connection to the gateway, opened again after it failed."""

    def __init__(self, address: str, timeout: float, token: str | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self.token = token
        self.conn: Connection | None = None

    async def ready(self) -> bool:
        """Connected (opening a connection if needed); False if that failed."""
        if self.conn is not None and not self.conn.closed:
            return True
        try:
            conn = Connection(self.address, self.token)
            self.conn = await asyncio.wait_for(conn.open(self.timeout), self.timeout + 1)
            return True
        except (ShardqError, TimeoutError, OSError):
            return False

    async def call(self, req: dict[str, Any]) -> dict[str, Any]:
        """The answer, or ShardqError (a refusal, or the connection lost) or TimeoutError;
        after a lost connection or a timeout the connection is dropped."""
        assert self.conn is not None
        try:
            return await asyncio.wait_for(self.conn.call(req), self.timeout)
        except TimeoutError:
            await self.close()
            raise
        finally:
            if self.conn is not None and self.conn.closed:
                self.conn = None

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()


class Load:
    def __init__(self, address: str, queues: list[str], history: History,
                 config: LoadConfig | None = None, seed: int = 0) -> None:
        self.address = address
        self.token: str | None = None  # the client token the gateway wants, if any
        self.seed = seed
        self.queues = queues
        self.history = history
        self.config = config or LoadConfig()
        self.pushes = 0
        self.stop_producing = asyncio.Event()
        self.stop_working = asyncio.Event()
        self.producers: list[asyncio.Task[None]] = []
        self.workers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        c = self.config
        self.producers = [asyncio.create_task(self._produce(i)) for i in range(c.producers)]
        self.workers = [asyncio.create_task(self._work(i)) for i in range(c.workers)]

    async def _request(self, session: Session, index: int, req: dict[str, Any]
                       ) -> dict[str, Any] | None:
        """Send ``req`` for operation ``index``; on an error complete it and return None."""
        try:
            return await session.call(req)
        except ShardqError as exc:
            self.history.failed(index, str(exc))
        except TimeoutError:
            self.history.info(index, f"no answer within {session.timeout:g} s")
            return None
        await asyncio.sleep(ERROR_PAUSE)  # a rate limit after a refusal (see ERROR_PAUSE)
        return None

    async def _produce(self, i: int) -> None:
        c = self.config
        name = f"producer-{i}"
        session = Session(self.address, c.op_timeout, self.token)
        n = 0
        try:
            while not self.stop_producing.is_set() and self.pushes < c.max_pushes:
                if not await session.ready():
                    await asyncio.sleep(ERROR_PAUSE)  # a rate limit on reconnecting
                    continue
                queue = self.queues[(i + n) % len(self.queues)]
                payload = f"{i}-{n}"
                n += 1
                self.pushes += 1
                index = self.history.invoke(name, "push", queue, {"payload": payload})
                answer = await self._request(session, index, {
                    "cmd": "PUSH", "queue": queue, "data": {"p": payload},
                    "timeout": c.lease_ms})
                if answer is not None:
                    self.history.ok(index, {"payload": payload, "id": answer["id"]})
                    await asyncio.sleep(c.push_pause)  # the load's pace
        finally:
            await session.close()

    async def _work(self, i: int) -> None:
        c = self.config
        name = f"worker-{i}"
        session = Session(self.address, c.op_timeout, self.token)
        shift = i * len(self.queues) // max(1, c.workers)
        queues = self.queues[shift:] + self.queues[:shift]
        rnd = random.Random(self.seed * 1000 + i)
        wait = c.blocking_pull_ms if i % 2 else 0
        try:
            while not self.stop_working.is_set():
                got = 0
                for queue in queues:
                    if self.stop_working.is_set():
                        break
                    if not await session.ready():
                        await asyncio.sleep(ERROR_PAUSE)  # a rate limit on reconnecting
                        continue
                    got += await self._pull_and_ack(name, session, queue, wait, rnd)
                if not got:
                    await asyncio.sleep(IDLE_PAUSE)  # nothing anywhere: the poll rate
        finally:
            await session.close()

    async def _pull_and_ack(self, name: str, session: Session, queue: str, wait: int,
                            rnd: random.Random) -> int:
        index = self.history.invoke(name, "pull", queue, {})
        answer = await self._request(session, index, {
            "cmd": "PULLB", "queue": queue, "count": self.config.pull_count, "timeout": wait})
        if answer is None:
            return 0
        jobs = [{"id": j["id"], "payload": j["data"]["p"], "lease": j["started_at"]}
                for j in answer["jobs"]]
        self.history.ok(index, {"jobs": jobs})
        if jobs:
            await asyncio.sleep(rnd.uniform(0, self.config.work_time))  # the jobs' work
        for job in jobs:
            if not await session.ready():
                break  # the lease runs out and the job comes back: a redelivery
            ack = self.history.invoke(name, "ack", queue, job)
            done = await self._request(session, ack, {"cmd": "ACK", "id": job["id"],
                                                      "lease": job["lease"]})
            if done is not None:
                self.history.ok(ack)
        return len(jobs)

    # -- stopping -----------------------------------------------------------------------------

    async def stop_producers(self) -> None:
        self.stop_producing.set()
        await _finish(self.producers, self.config.op_timeout * 2)

    async def stop_workers(self) -> None:
        self.stop_working.set()
        await _finish(self.workers, self.config.op_timeout * 2)

    async def stop(self) -> None:
        """Stop everything (teardown); operations left in flight become ``info``."""
        self.stop_producing.set()
        self.stop_working.set()
        await _finish(self.producers + self.workers, self.config.op_timeout * 2)
        self.history.close_open()


async def _finish(tasks: list[asyncio.Task[None]], timeout: float) -> None:
    """Wait for ``tasks`` up to ``timeout`` (they stop at their next check), then cancel
    what is left; their errors are raised here, not lost."""
    if not tasks:
        return
    _, late = await asyncio.wait(tasks, timeout=timeout)
    for task in late:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
