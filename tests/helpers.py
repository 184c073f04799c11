"""Test helpers: a fake clock, a raw line client, real nodes on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from typing import Any

import orjson

from shardq import AsyncClient
from shardq.errors import ShardqError

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


class FakeClock:
    """Milliseconds that move only when a test says so."""

    def __init__(self, start: int = 1_700_000_000_000) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> int:
        self.now += ms
        return self.now


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(
    port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


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
    errors, and the longest single request."""

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
        self.completed: dict[int, int] = {}
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
                    await c.push(self.queues[number % len(self.queues)], {"n": number},
                                 timeout=self.job_timeout)
                except ShardqError as exc:
                    self.errors.append(f"push: {exc}")
                    await asyncio.sleep(self.error_pause)
                    continue
                self.timed(started)
                self.pushed.add(number)
                await asyncio.sleep(self.pause)

    async def work(self, queues: list[str]) -> None:
        async with AsyncClient(self.worker_address, token=self.token) as c:
            while not self.stop.is_set() or self.pushed - self.completed.keys():
                for q in queues:
                    started = time.monotonic()
                    try:
                        jobs = await c.pull_batch(q, 20, timeout=0)
                        self.timed(started)
                        for job in jobs:
                            started = time.monotonic()
                            await c.ack(job, job.data["n"])
                            self.timed(started)
                            number = job.data["n"]
                            self.completed[number] = self.completed.get(number, 0) + 1
                    except ShardqError as exc:
                        self.errors.append(f"work: {exc}")
                        await asyncio.sleep(self.error_pause)
                if self.stop.is_set() and not self.pushed - self.completed.keys():
                    return
                await asyncio.sleep(self.work_pause)

    def duplicates(self) -> int:
        return sum(1 for count in self.completed.values() if count > 1)

    def lost(self) -> int:
        return len(self.pushed - self.completed.keys())


async def eventually(predicate: Any, timeout: float = 10.0, what: str = "",
                     interval: float = 0.02) -> Any:
    """Poll ``predicate`` (a function, sync or async) until it returns something truthy;
    return that. Fails the test after ``timeout`` seconds, saying what was awaited and the
    last value seen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while True:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what or predicate!r} "
                                 f"(last seen: {last!r})")
        await asyncio.sleep(interval)
