"""``POST /publish`` latency on one node at half of its saturation rate.

    .venv/bin/python loadtest/bench_publish.py --write BENCHMARKS.md

Locust (loadtest/run_locust.py --suite publish) is the Poor Man Queue's own kind of
test, but on a 2-core machine its greenlets, not the node, set the latency it
reports. This measures the node with a lean client instead: raw HTTP/1.1 on
keep-alive connections from an asyncio (uvloop) client pinned to one CPU, the
node pinned to the other. First 64 connections with one request in flight each
give the node's saturation rate; then requests are paced at half that rate over
16 connections, and every request's latency is kept (exact p50/p99). Writes
the ``publish-latency`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import bench_report as report
import orjson

from shardq_operator.local import free_port

BODY = orjson.dumps({"type": "user_registration", "userId": "12345",
                     "email": "user@example.com", "pad": "x" * 120})
REQUEST = (b"POST /publish?queue=pmq HTTP/1.1\r\nHost: 127.0.0.1\r\n"
           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY))


class Conn(asyncio.Protocol):
    """One keep-alive connection; ``call`` sends the request and waits for the whole answer."""

    def __init__(self) -> None:
        self.buf = b""
        self.waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        head, sep, rest = self.buf.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if len(rest) >= length:
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"publish refused: {head[:80]!r} {rest[:200]!r}")
            self.buf = rest[length:]
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)

    async def call(self) -> float:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        self.transport.write(REQUEST)
        await asyncio.wait_for(self.waiter, 10)
        return time.perf_counter() - started


async def connect(port: int, n: int) -> list[Conn]:
    loop = asyncio.get_running_loop()
    return [(await loop.create_connection(Conn, "127.0.0.1", port))[1] for _ in range(n)]


async def saturation(port: int, seconds: float) -> float:
    conns = await connect(port, 64)
    done = 0
    stop = time.perf_counter() + seconds

    async def loop(c: Conn) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await c.call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in conns))
    rate = done / (time.perf_counter() - started)
    for c in conns:
        assert c.transport is not None
        c.transport.close()
    return rate


async def paced(port: int, rate: float, seconds: float) -> list[float]:
    conns = await connect(port, 16)
    free: asyncio.Queue[Conn] = asyncio.Queue()
    for c in conns:
        free.put_nowait(c)
    latencies: list[float] = []
    tasks = set()

    async def one() -> None:
        c = await free.get()
        latencies.append(await c.call())
        free.put_nowait(c)

    gap = 1 / rate
    start = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        delay = start + i * gap - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t = asyncio.create_task(one())
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    return sorted(latencies)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write")
    p.add_argument("--seconds", type=float, default=10)
    args = p.parse_args(argv)
    port = free_port()
    cpus = os.cpu_count() or 1
    node_cpu, client_cpus = ({cpus - 1}, set(range(cpus - 1))) if cpus > 1 else (None, None)
    node = subprocess.Popen(
        [sys.executable, "-m", "shardq.cli", "node", "--port", "0", "--http-port", str(port),
         "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, preexec_fn=(lambda: os.sched_setaffinity(0, node_cpu))
        if node_cpu else None)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        if client_cpus:
            os.sched_setaffinity(0, client_cpus)
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        sat = asyncio.run(saturation(port, args.seconds))
        lat = asyncio.run(paced(port, sat / 2, args.seconds))
    finally:
        node.terminate()
        node.wait(30)
    n = len(lat)
    p50, p99 = lat[n // 2] * 1000, lat[int(n * 0.99)] * 1000
    body = "\n".join([
        "## `/publish` latency at half of the node's saturation",
        "",
        f"_Written by `loadtest/bench_publish.py`. {time.strftime('%Y-%m-%d %H:%M UTC')}. "
        "One node (memory only) pinned to one CPU; a lean raw-HTTP/1.1 asyncio client pinned "
        "to the other (locust's own latency figures are in the section above; on 2 cores its "
        "greenlets dominate them). ~200-byte JSON messages._",
        "",
        f"- Saturation (64 keep-alive connections, one request in flight each): "
        f"**{sat:,.0f} publishes/s**.",
        f"- Paced at half of it ({sat / 2:,.0f}/s over 16 connections, {n:,} requests): "
        f"p50 **{p50:.2f} ms**, p99 **{p99:.2f} ms** (targets p50 ≤ 1 ms: "
        f"{'met' if p50 <= 1 else 'missed'}; p99 ≤ 5 ms: {'met' if p99 <= 5 else 'missed'}).",
    ])
    print(body)
    if args.write:
        report.write_section(Path(args.write), "publish-latency", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
