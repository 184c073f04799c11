"""AsyncWorker: pull, run a handler with bounded concurrency, ack or fail.

Handlers are ``async def handler(job)`` or ``handler(job, ctx)``; plain
functions run in a thread pool of ``concurrency`` threads and get a context
whose methods block. The result is stored with the ack; an exception fails
the attempt (the node retries with backoff or dead-letters it). Jobs without
a ``timeout`` have their lease touched while they run. ``stop()`` (and
SIGTERM/SIGINT in the main thread) stops pulling, lets running jobs finish
within ``grace`` seconds, then closes the connections, which hands any
unfinished job back to the queue.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import orjson

from shardq.client import AsyncClient
from shardq.connection import DEFAULT_ADDRESS
from shardq.errors import ShardqConnectionError, ShardqError
from shardq.wire.job import Job

log = logging.getLogger("shardq.worker")

#: results that always encode (anything else is encoded when the handler returns it)
_JSON_SCALARS = (type(None), str, float, bool)

F = TypeVar("F", bound=Callable[..., Any])


class JobContext:
    """Given to two-argument async handlers: progress and lease extension."""

    def __init__(self, client: AsyncClient, job: Job) -> None:
        self.client = client
        self.job = job

    async def update_progress(self, progress: int, message: str | None = None) -> None:
        await self.client.progress(self.job, progress, message)

    async def touch(self, extend: int | None = None) -> int:
        return await self.client.touch(self.job, extend)


class BlockingJobContext:
    """Given to two-argument plain-function handlers (they run in a thread)."""

    def __init__(self, ctx: JobContext, loop: asyncio.AbstractEventLoop) -> None:
        self._ctx = ctx
        self._loop = loop
        self.job = ctx.job

    def update_progress(self, progress: int, message: str | None = None) -> None:
        asyncio.run_coroutine_threadsafe(
            self._ctx.update_progress(progress, message), self._loop
        ).result()

    def touch(self, extend: int | None = None) -> int:
        return asyncio.run_coroutine_threadsafe(self._ctx.touch(extend), self._loop).result()


class AsyncWorker:
    """Runs ``handler`` on the jobs of ``queue``, ``concurrency`` at a time."""

    def __init__(
        self,
        queue: str,
        handler: Callable[..., Any] | None = None,
        address: str | AsyncClient = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        concurrency: int = 1,
        batch_size: int | None = None,
        prefetch: int = 0,
        poll_ms: int = 1000,
        grace: float = 30.0,
        touch_every: float = 60.0,
    ) -> None:
        self.queue = queue
        self._handler = handler
        if isinstance(address, AsyncClient):
            self.client = address
            self._owns_client = False
        else:
            self.client = AsyncClient(address, token=token)
            self._owns_client = True
        self.concurrency = max(1, concurrency)
        self.batch_size = batch_size or self.concurrency
        #: jobs leased ahead of the running ones, so the next batch is here when a slot frees
        #: (their lease and ``timeout`` run while they wait here)
        self.prefetch = max(0, prefetch)
        self.poll_ms = poll_ms
        self.grace = grace
        self.touch_every = touch_every
        self.processed = 0
        self.failed = 0
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._stop_requested = False
        self._acks: list[tuple[Job, Any, asyncio.Future[None]]] = []
        self._busy = 0
        self._running: dict[int, tuple[Job, float]] = {}  # jobs without timeout, since when
        self._slot_free = asyncio.Event()
        self._ack_tasks: set[asyncio.Task[None]] = set()
        #: (handler, takes a context, is a coroutine function), worked out on first use
        self._shape: tuple[Callable[..., Any], bool, bool] | None = None

    def handler(self, fn: F) -> F:
        """Decorator style: ``@worker.handler`` sets the function jobs are run with."""
        self._handler = fn
        return fn

    def stop(self) -> None:
        """Ask the worker to stop gracefully (safe from any thread or signal handler)."""
        self._stop_requested = True
        loop = self._loop
        if loop is not None and self._stopping is not None:
            loop.call_soon_threadsafe(self._wake_for_stop)

    def _wake_for_stop(self) -> None:
        assert self._stopping is not None
        self._stopping.set()
        self._slot_free.set()  # a pull loop waiting for a free slot sees the stop at once

    async def run(self, *, max_jobs: int | None = None, handle_signals: bool = True) -> None:
        """Work until ``stop()``, a signal, or ``max_jobs`` jobs are done."""
        if self._handler is None:
            raise ShardqError("AsyncWorker has no handler: pass one or use @worker.handler")
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if self._stop_requested:
            self._stopping.set()
        signals = handle_signals and threading.current_thread() is threading.main_thread()
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self.stop)
        jobs: asyncio.Queue[tuple[Job, float] | None] = asyncio.Queue()
        consumers = [asyncio.create_task(self._consume(jobs)) for _ in range(self.concurrency)]
        toucher = asyncio.create_task(self._keep_alive()) if self.touch_every > 0 else None
        try:
            await self._pull_loop(jobs, max_jobs)
        finally:
            if signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self._loop.remove_signal_handler(sig)
            for _ in consumers:  # after the jobs already leased: they are ours to finish
                jobs.put_nowait(None)
            # stopped: running jobs get ``grace``; done with ``max_jobs``: every job finishes
            await self._drain(consumers, toucher,
                              self.grace if self._stopping.is_set() else None)

    async def _pull_loop(
        self, jobs: asyncio.Queue[tuple[Job, float] | None], max_jobs: int | None
    ) -> None:
        """Keep the consumers fed: lease a batch whenever fewer than ``concurrency`` +
        ``prefetch`` jobs are running or waiting to run here."""
        assert self._stopping is not None
        started = 0
        while not self._stopping.is_set():
            if max_jobs is not None and started >= max_jobs:
                break
            free = self.concurrency + self.prefetch - self._busy - jobs.qsize()
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            want = min(free, self.batch_size)
            if max_jobs is not None:
                want = min(want, max_jobs - started)
            try:
                pulled = await self.client.pull_batch(self.queue, want, timeout=self.poll_ms)
            except ShardqConnectionError as exc:
                log.warning("pull failed, retrying in 1 s: %s", exc)
                await asyncio.sleep(1.0)
                continue
            now = time.monotonic()
            for job in pulled:
                started += 1
                if not job.timeout:  # its lease is kept alive from now, waiting here or running
                    self._running[job.id] = (job, now)
                jobs.put_nowait((job, now))

    async def _consume(self, jobs: asyncio.Queue[tuple[Job, float] | None]) -> None:
        """One of ``concurrency`` long-lived consumers (no task per job)."""
        while (item := await jobs.get()) is not None:
            self._busy += 1
            try:
                await self._run_one(*item)
            finally:
                self._busy -= 1
                self._slot_free.set()

    async def _drain(
        self, consumers: list[asyncio.Task[None]], toucher: asyncio.Task[None] | None,
        grace: float | None,
    ) -> None:
        """Let running jobs finish (within ``grace``), keeping their leases alive meanwhile;
        then send the last acks before the connection closes."""
        _, late = await asyncio.wait(consumers, timeout=grace)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
        if toucher is not None:
            toucher.cancel()
        if self._acks:
            self._send_acks()
        if self._ack_tasks:
            await asyncio.wait(self._ack_tasks, timeout=max(grace or 0.0, 10.0))
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._owns_client:
            await self.client.close()

    async def _run_one(self, job: Job, leased_at: float) -> None:
        try:
            if job.timeout and (time.monotonic() - leased_at) * 1000 >= job.timeout:
                # prefetched and waited here past its timeout: the node has timed this attempt
                # out (a counted failure, retried elsewhere); running it now would run it twice
                log.warning("job %s waited %d ms here, past its timeout: not run", job.id,
                            (time.monotonic() - leased_at) * 1000)
                return
            try:
                result = await self._call(job)
                if type(result) not in _JSON_SCALARS:
                    # encoded once, here: a result that cannot be fails only its own job, and
                    # the ACKB embeds the bytes as they are
                    result = orjson.Fragment(orjson.dumps(result))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the handler's failure is the job's failure
                self.failed += 1
                await self._settle(self.client.fail(job, f"{type(exc).__name__}: {exc}"), job)
                return
            self.processed += 1
            try:  # no shield needed: the ack is already in the next ACKB, cancelled or not
                await self._ack(job, result)
            except ShardqError as exc:
                log.warning("could not settle job %s: %s", job.id, exc)
            except Exception:  # never let one batch's trouble end a consumer
                log.exception("could not ack job %s", job.id)
        finally:
            self._running.pop(job.id, None)

    def _ack(self, job: Job, result: Any) -> asyncio.Future[None]:
        """Acks of one event-loop turn go out together, as one ACKB (a future, not a
        coroutine: shielding a future costs no task per job)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._acks.append((job, result, fut))
        if len(self._acks) == 1:
            loop.call_soon(self._send_acks)
        return fut

    def _send_acks(self) -> None:
        acks, self._acks = self._acks, []
        task = asyncio.get_running_loop().create_task(self._ack_batch(acks))
        self._ack_tasks.add(task)
        task.add_done_callback(self._ack_tasks.discard)

    async def _ack_batch(self, acks: list[tuple[Job, Any, asyncio.Future[None]]]) -> None:
        try:
            done = await self.client.ack_batch([j for j, _, _ in acks], [r for _, r, _ in acks])
            if done != len(acks):
                log.warning("%d of %d acks found their attempt gone (lease expired)",
                            len(acks) - done, len(acks))
        except BaseException as exc:
            for _, _, fut in acks:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for _, _, fut in acks:
            if not fut.done():
                fut.set_result(None)

    async def _settle(self, call: Awaitable[None], job: Job) -> None:
        try:
            await asyncio.shield(call)
        except ShardqError as exc:
            log.warning("could not settle job %s: %s", job.id, exc)

    async def _call(self, job: Job) -> Any:
        handler = self._handler
        assert handler is not None
        shape = self._shape
        if shape is None or shape[0] is not handler:  # inspect once per handler, not per job
            shape = self._shape = (handler, _arity(handler) >= 2,
                                   inspect.iscoroutinefunction(handler))
        _, wants_ctx, is_async = shape
        if is_async:
            return await (handler(job, JobContext(self.client, job)) if wants_ctx
                          else handler(job))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="shardq-job")
        loop = asyncio.get_running_loop()
        if wants_ctx:
            blocking = BlockingJobContext(JobContext(self.client, job), loop)
            return await loop.run_in_executor(self._pool, handler, job, blocking)
        return await loop.run_in_executor(self._pool, handler, job)

    async def _keep_alive(self) -> None:
        """Every ``touch_every`` s, extend the leases of jobs without a ``timeout`` that have
        run that long (one task for all of them, not one per job)."""
        while True:
            await asyncio.sleep(self.touch_every)
            due = time.monotonic() - self.touch_every
            for job, since in list(self._running.values()):
                if since > due:
                    continue
                try:
                    await self.client.touch(job)
                except ShardqError as exc:
                    log.warning("lease of job %s not extended: %s", job.id, exc)
                    self._running.pop(job.id, None)


def _arity(fn: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    return sum(
        1 for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    )


Handler = Callable[[Job], Awaitable[Any]] | Callable[[Job], Any]
