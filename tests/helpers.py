"""Test helpers: waiting for a state, skip-or-fail, a fake clock, a raw line client, real
nodes on loopback."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, overload

import orjson
import pytest

from shardq import AsyncClient
from shardq.errors import ShardqError, Unavailable
from shardq_operator.local import free_port as free_port  # one free_port: the local cluster's

if TYPE_CHECKING:
    from shardq_node.runtime import Node

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

T = TypeVar("T")


# -- waiting for a state ----------------------------------------------------------------------


def _described(predicate: Callable[..., Any], what: str | None) -> str:
    """``what``, or the predicate's own source line (a lambda), or its name."""
    if what:
        return what
    name = getattr(predicate, "__qualname__", repr(predicate))
    if name.endswith("<lambda>"):
        try:
            return inspect.getsource(predicate).strip()
        except (OSError, TypeError):
            pass
    return name


def _timed_out(what: str, timeout: float, last: Any, hint: Callable[[], str] | None) -> str:
    text = f"timed out after {timeout:g}s waiting for {what}; last value seen: {last!r}"
    if hint is not None:
        text += f"\n{hint()}"
    return text


@overload
async def eventually(
    predicate: Callable[[], Awaitable[T]], timeout: float = ..., interval: float = ..., *,
    what: str | None = ..., ignore: tuple[type[BaseException], ...] = ...,
    hint: Callable[[], str] | None = ...,
) -> T: ...


@overload
async def eventually(
    predicate: Callable[[], T], timeout: float = ..., interval: float = ..., *,
    what: str | None = ..., ignore: tuple[type[BaseException], ...] = ...,
    hint: Callable[[], str] | None = ...,
) -> T: ...


async def eventually(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    *,
    what: str | None = None,
    ignore: tuple[type[BaseException], ...] = (),
    hint: Callable[[], str] | None = None,
) -> Any:
    """Call ``predicate`` (plain or async) until it returns something truthy, and return that.

    Bounded by ``timeout`` seconds: then the test fails with what was awaited (``what``, or the
    predicate's source) and the last value seen (an exception of ``ignore`` counts as a value:
    the thing is not ready yet), plus ``hint()`` if given. Checks once more after the deadline,
    so a slow machine that stalls past it still sees a state that has arrived.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        past = time.monotonic() >= deadline
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
        except ignore as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if past:
            raise AssertionError(_timed_out(_described(predicate, what), timeout, last, hint))
        await asyncio.sleep(interval)  # pacing between two looks, not a wait for a state


def eventually_sync(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    *,
    what: str | None = None,
    ignore: tuple[type[BaseException], ...] = (),
    hint: Callable[[], str] | None = None,
) -> T:
    """``eventually`` for blocking tests (and for worker threads: ``asyncio.to_thread``)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        past = time.monotonic() >= deadline
        try:
            value = predicate()
        except ignore as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if past:
            raise AssertionError(_timed_out(_described(predicate, what), timeout, last, hint))
        time.sleep(interval)  # pacing between two looks, not a wait for a state


# -- what a test needs from the machine -------------------------------------------------------


def missing(what: str) -> NoReturn:
    """Something the test needs is not here: a skip on a laptop, a failure in CI (``CI=true``),
    with the same message."""
    if CI:
        pytest.fail(f"CI must run this test: {what}")
    pytest.skip(what)


def require(condition: object, what: str) -> None:
    """``missing(what)`` unless ``condition`` holds."""
    if not condition:
        missing(what)


def needs_binary(*names: str, install: str = "scripts/ci_packages.sh test installs it") -> str:
    """The path of the first of ``names`` on PATH; ``missing`` when none is there."""
    import shutil

    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    missing(f"{' or '.join(names)} is not installed ({install})")


class FakeClock:
    """Milliseconds that move only when a test says so."""

    def __init__(self, start: int = 1_700_000_000_000) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> int:
        self.now += ms
        return self.now


def run_timers(node: Node) -> None:
    """Do what a node's timer does when it comes due (promotions, expiries, lease timeouts,
    crons): on a ``FakeClock`` the test says when, rather than waiting for real time."""
    node.engine.tick()
    node.after_batch()


class RawClient:
    """Speaks the line protocol byte for byte, as a MagicQueue client would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        reader, writer = await asyncio.open_connection(host, port, limit=64 * 1024 * 1024)
        return cls(reader, writer)

    async def send(self, *items: Any) -> None:
        for item in items:
            line = item if isinstance(item, bytes) else orjson.dumps(item) + b"\n"
            self.writer.write(line)
        await self.writer.drain()

    async def recv(self, timeout: float = 5.0) -> Any:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise ConnectionError("server closed the connection")
        return orjson.loads(line)

    async def call(self, item: Any, timeout: float = 5.0) -> Any:
        await self.send(item)
        return await self.recv(timeout)

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(), timeout)
        except ConnectionError:
            return True
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


def listens(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP connection to ``host:port`` is accepted now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def listening_inodes(port: int) -> set[int] | None:
    """The socket inodes listening on TCP ``port`` (Linux's /proc/net), or None without it."""
    found: set[int] = set()
    seen = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        seen = True
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                found.add(int(fields[9]))
    return found if seen else None


def port_free(port: int) -> bool:
    """Whether no socket listens on ``port`` (asked of /proc/net without connecting to it)."""
    inodes = listening_inodes(port)
    return not (listens(port) if inodes is None else inodes)


def listens_in(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself listens on ``port`` (another process on that port, such
    as a dead node's forked child, does not count); ``listens`` where /proc cannot tell."""
    inodes = listening_inodes(port)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        fds = None
    if inodes is None or fds is None:
        return listens(port)
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and int(link[8:-1]) in inodes:
            return True
    return False


def wait_port(
    port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until ``port`` listens; with ``proc``, until that process listens on it."""
    def up() -> bool:
        if proc is None:
            return listens(port)
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        return listens_in(proc.pid, port)

    eventually_sync(up, timeout, what=f"{'a' if proc is None else 'its'} listener on port {port}")


def start_node_process(port: int, *args: str, env: dict[str, str] | None = None,
                       log: Any = None) -> subprocess.Popen[bytes]:
    """``shardq node`` as a subprocess (for crash tests), waiting until it listens."""
    cmd = [sys.executable, "-m", "shardq.cli", "node", "--port", str(port), "--http-port", "0",
           *args]
    proc = subprocess.Popen(cmd, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    wait_port(port, proc=proc)
    return proc


class SteadyLoad:
    """Producers push numbered jobs and workers pull and ack them, until ``stop`` is set and
    every pushed job was completed; counts what a test checks: pushed, completed (how often),
    errors, and the longest single request. An ACK whose answer was lost (a node died with
    it) may have completed its job: such jobs are ``unsure``. Once ``stop`` is set the
    workers ask the cluster for their state: a completed one counts as completed, any other
    is outstanding again (its lease runs out and it is handed out again: the drain waits for
    it), one the cluster does not know is lost. ``settle_unsure`` does the same for what a
    drain cut short left unsure."""

    def __init__(self, queues: list[str], producer_address: str,
                 worker_address: str | None = None, *, token: str | None = None,
                 pause: float = 0.002, work_pause: float = 0.005,
                 error_pause: float = 0.0, job_timeout: int | None = None) -> None:
        self.queues = queues
        self.producer_address = producer_address
        self.worker_address = worker_address or producer_address
        self.token = token
        self.pause = pause
        self.work_pause = work_pause
        self.error_pause = error_pause
        #: the jobs' timeout (ms): a lease whose pull answer was lost comes back after it
        self.job_timeout = job_timeout
        self.pushed: set[int] = set()
        self.ids: dict[int, int] = {}  # number -> job id
        self.completed: dict[int, int] = {}
        self.acked_ids: dict[int, list[int]] = {}  # number -> the job ids acked for it
        self.unsure: set[int] = set()  # numbers whose ACK failed without an answer
        self.gone: set[int] = set()  # unsure numbers whose job the cluster does not know
        self.longest = 0.0
        self.errors: list[str] = []
        self.stop = asyncio.Event()

    def timed(self, started: float) -> None:
        self.longest = max(self.longest, time.monotonic() - started)

    async def produce(self, producer: int) -> None:
        n = 0
        async with AsyncClient(self.producer_address, token=self.token) as c:
            while not self.stop.is_set():
                number = producer * 1_000_000 + n
                n += 1
                started = time.monotonic()
                try:
                    job_id = await c.push(self.queues[number % len(self.queues)],
                                          {"n": number}, timeout=self.job_timeout)
                except ShardqError as exc:
                    self.errors.append(f"push: {exc}")
                    await asyncio.sleep(self.error_pause)  # back-off after an error (pacing)
                    continue
                self.timed(started)
                self.pushed.add(number)
                self.ids[number] = job_id
                await asyncio.sleep(self.pause)  # the producer's pace, not a wait for a state

    async def work(self, queues: list[str]) -> None:
        async with AsyncClient(self.worker_address, token=self.token) as c:
            while True:
                if self.stop.is_set() and not self.outstanding():
                    if not self.unsure:
                        return
                    await self._resolve_unsure(c)  # completed, or outstanding again
                    continue
                for q in queues:
                    started = time.monotonic()
                    try:
                        jobs = await c.pull_batch(q, 20, timeout=0)
                        self.timed(started)
                        for job in jobs:
                            started = time.monotonic()
                            number = job.data["n"]
                            try:
                                await c.ack(job, number)
                            except Unavailable:
                                self.unsure.add(number)  # it may have been applied
                                raise
                            self.timed(started)
                            self.completed[number] = self.completed.get(number, 0) + 1
                            self.acked_ids.setdefault(number, []).append(job.id)
                    except ShardqError as exc:
                        self.errors.append(f"work: {exc}")
                        await asyncio.sleep(self.error_pause)  # back-off after an error (pacing)
                if self.stop.is_set() and not self.outstanding() and not self.unsure:
                    return
                await asyncio.sleep(self.work_pause)  # the workers' pace, not a wait for a state

    async def _resolve_unsure(self, c: AsyncClient) -> None:
        """Each unsure number: completed (its lost ACK landed), outstanding again (it did
        not: the job comes back after its lease), or gone (the cluster does not know it)."""
        for number in sorted(self.unsure):
            try:
                job = await c.get_job(self.ids[number])
            except ShardqError as exc:
                self.errors.append(f"settle: {exc}")
                await asyncio.sleep(self.error_pause)  # back-off after an error (pacing)
                return
            self.unsure.discard(number)
            if job is None:
                self.gone.add(number)
            elif job.get("state") == "completed":
                self.completed.setdefault(number, 1)

    async def progressed(self, where: str, jobs: int = 20, timeout: float = 60.0) -> None:
        """Wait until ``jobs`` more jobs were completed: the load works on the cluster as it
        is now (before the next change to it)."""
        done = len(self.completed)
        await eventually(lambda: len(self.completed) >= done + jobs, timeout, 0.05,
                         what=f"{jobs} more jobs completed by the load {where}",
                         hint=lambda: f"errors: {self.errors[-5:]}")

    def outstanding(self) -> set[int]:
        return self.pushed - self.completed.keys() - self.unsure - self.gone

    async def settle_unsure(self) -> None:
        """Count a job whose ACK answer was lost as completed if the cluster says it is."""
        async with AsyncClient(self.worker_address, token=self.token) as c:
            for number in sorted(self.unsure - self.completed.keys()):
                job = await c.get_job(self.ids[number])
                if job is not None and job.get("state") == "completed":
                    self.completed[number] = 1
        self.unsure.clear()

    def duplicate_evidence(self) -> dict[int, list[int]]:
        """Each number completed more than once, with the job ids its acks named (one id
        twice: a job acked twice; two ids: the number pushed twice)."""
        return {n: ids for n, ids in self.acked_ids.items() if len(ids) > 1}

    def duplicates(self) -> int:
        return sum(1 for count in self.completed.values() if count > 1)

    def lost(self) -> int:
        return len(self.pushed - self.completed.keys())

