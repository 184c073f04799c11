"""AsyncQueue: one named queue, its producer and consumer calls, and ``process``.

A thin binding of ``AsyncClient`` to a queue name. ``process(job)`` is the
ack context manager: a clean exit acks (with ``ctx.result``), an exception
fails the attempt with the exception's text and propagates.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from shardq.client import AsyncClient, JobRef
from shardq.connection import DEFAULT_ADDRESS
from shardq.wire.job import Job


class Outcome:
    """Set ``result`` inside ``process()`` to store it with the ack."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.result: Any = None


class AsyncQueue:
    """``async with AsyncQueue("emails", "gateway:6789") as q: await q.push({...})``."""

    def __init__(
        self,
        name: str,
        address: str | AsyncClient = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        direct: bool = False,
    ) -> None:
        self.name = name
        if isinstance(address, AsyncClient):
            self.client = address
            self._owns_client = False
        else:
            self.client = AsyncClient(address, token=token, direct=direct)
            self._owns_client = True

    async def __aenter__(self) -> AsyncQueue:
        await self.client.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_client:
            await self.client.close()

    # producing
    async def push(
        self,
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
        return await self.client.push(
            self.name, data, priority=priority, delay=delay, ttl=ttl, timeout=timeout,
            max_attempts=max_attempts, backoff=backoff, unique_key=unique_key,
            depends_on=depends_on,
        )

    async def push_batch(self, jobs: Iterable[Mapping[str, Any]]) -> list[int]:
        return await self.client.push_batch(self.name, jobs)

    # consuming
    async def pull(self, timeout: int | None = None) -> Job | None:
        return await self.client.pull(self.name, timeout)

    async def pull_batch(self, count: int, timeout: int | None = None) -> list[Job]:
        return await self.client.pull_batch(self.name, count, timeout)

    async def ack(self, job: JobRef, result: Any = None) -> None:
        await self.client.ack(job, result)

    async def ack_batch(self, jobs: Sequence[JobRef], results: Sequence[Any] | None = None) -> int:
        return await self.client.ack_batch(jobs, results)

    async def fail(self, job: JobRef, error: str | None = None) -> None:
        await self.client.fail(job, error)

    async def touch(self, job: JobRef, extend: int | None = None) -> int:
        return await self.client.touch(job, extend)

    async def progress(self, job: JobRef, progress: int, message: str | None = None) -> None:
        await self.client.progress(job, progress, message)

    async def get_progress(self, job: JobRef) -> tuple[int, str | None]:
        return await self.client.get_progress(job)

    async def get_result(self, job: JobRef) -> Any:
        return await self.client.get_result(job)

    async def get_job(self, job: JobRef) -> dict[str, Any] | None:
        return await self.client.get_job(job)

    async def cancel(self, job: JobRef) -> None:
        await self.client.cancel(job)

    @asynccontextmanager
    async def process(self, job: Job) -> AsyncIterator[Outcome]:
        """Ack on a clean exit (with ``outcome.result``), fail on an exception."""
        outcome = Outcome(job)
        try:
            yield outcome
        except BaseException as exc:
            await self.client.fail(job, f"{type(exc).__name__}: {exc}")
            raise
        await self.client.ack(job, outcome.result)

    # dead letters
    async def dlq(self, count: int = 100) -> list[Job]:
        return await self.client.dlq(self.name, count)

    async def retry_dlq(self, job: JobRef | None = None) -> int:
        return await self.client.retry_dlq(self.name, job)

    # control
    async def pause(self) -> None:
        await self.client.pause(self.name)

    async def resume(self) -> None:
        await self.client.resume(self.name)

    async def set_rate_limit(self, limit: int) -> None:
        await self.client.set_rate_limit(self.name, limit)

    async def clear_rate_limit(self) -> None:
        await self.client.clear_rate_limit(self.name)

    async def set_concurrency(self, limit: int) -> None:
        await self.client.set_concurrency(self.name, limit)

    async def clear_concurrency(self) -> None:
        await self.client.clear_concurrency(self.name)

    async def add_cron(self, name: str, schedule: str, data: Any = None, priority: int = 0) -> None:
        await self.client.add_cron(name, self.name, schedule, data, priority)

    async def delete_cron(self, name: str) -> None:
        await self.client.delete_cron(name)

    async def list_crons(self) -> list[dict[str, Any]]:
        return [c for c in await self.client.list_crons() if c["queue"] == self.name]

    async def stats(self) -> dict[str, Any]:
        for q in await self.client.list_queues():
            if q["name"] == self.name:
                return dict(q)
        return {"name": self.name, "pending": 0, "processing": 0, "dlq": 0}

    async def events(self, events: Sequence[str] | None = None) -> AsyncIterator[dict[str, Any]]:
        async for event in self.client.events(self.name, events):
            yield event
