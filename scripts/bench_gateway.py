"""Pipelined PUSH through a gateway vs straight to a node: same client, one run.

Starts three ``shardq node`` processes (memory only) with a published topology and
a ``shardq gateway`` process in front, then pushes N jobs with one pipelined
connection (a window of requests in flight), three ways:

  direct     to node-0, queues that node-0 owns
  gw-1node   through the gateway, the same queues (all on node-0): the gateway's cost
  gw-3nodes  through the gateway, queues spread over the three nodes

    .venv/bin/python scripts/bench_gateway.py [--jobs 200000] [--rounds 3] [--pin]

``--pin`` (2+ CPUs): the nodes on the last CPU, the client and the gateway on the
first, so the node under test never loses CPU time to the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

import orjson

from shardq.connection import Connection
from shardq.topology import NodeInfo, initial


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


class Counter(asyncio.Protocol):
    """Counts answer lines; wakes the sender when the window has room."""

    def __init__(self) -> None:
        self.answers = 0
        self.errors = 0
        self.room = asyncio.Event()
        self.want = 0

    def data_received(self, data: bytes) -> None:
        self.answers += data.count(b"\n")
        self.errors += data.count(b'"ok":false')
        if self.answers >= self.want:
            self.room.set()


async def pipelined_push(port: int, queues: list[str], jobs: int, window: int = 4000,
                         chunk: int = 500) -> float:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(Counter, "127.0.0.1", port)
    lines = [orjson.dumps({"cmd": "PUSH", "queue": queues[i % len(queues)],
                           "data": {"n": i, "payload": "x" * 40}}) + b"\n"
             for i in range(chunk)]
    block = b"".join(lines)
    started = time.perf_counter()
    sent = 0
    while sent < jobs:
        while sent - proto.answers >= window:
            proto.want = sent - window // 2
            proto.room.clear()
            await asyncio.wait_for(proto.room.wait(), 30)
        transport.write(block)
        sent += chunk
    proto.want = sent
    while proto.answers < sent:
        proto.room.clear()
        await asyncio.wait_for(proto.room.wait(), 30)
    elapsed = time.perf_counter() - started
    transport.close()
    assert proto.errors == 0, f"{proto.errors} errors"
    return sent / elapsed


async def bench(args: argparse.Namespace) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ports = [free_port() for _ in range(3)]
    procs = []
    try:
        for i, port in enumerate(ports):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "shardq.cli", "node", "--port", str(port),
                 "--http-port", "0", "--name", f"node-{i}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        for port in ports:
            wait_port(port)
        cpus = sorted(os.sched_getaffinity(0))
        if args.pin and len(cpus) >= 2:
            os.sched_setaffinity(0, {cpus[0]})
            for proc in procs:
                os.sched_setaffinity(proc.pid, {cpus[-1]})
        topo = initial([NodeInfo(f"node-{i}", f"127.0.0.1:{p}") for i, p in enumerate(ports)])
        for port in ports:
            conn = await Connection(f"127.0.0.1:{port}").open()
            await conn.call({"cmd": "SETTOPOLOGY", "topology": topo.wire()})
            await conn.close()
        gw_port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "shardq.cli", "gateway", "--port", str(gw_port),
             "--http-port", "0", "--seed", ",".join(f"127.0.0.1:{p}" for p in ports)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        wait_port(gw_port)
        if args.pin and len(cpus) >= 2:
            os.sched_setaffinity(procs[-1].pid, {cpus[0]})

        mine = [q for q in (f"bench-{i}" for i in range(2000))
                if topo.owner_of_queue(q) == "node-0"][:16]
        spread = [f"bench-{i}" for i in range(48)]
        print(f"{os.cpu_count()} CPUs; {args.jobs} pipelined PUSH per run, best of {args.rounds}")
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, port, queues in (("direct", ports[0], mine), ("gw-1node", gw_port, mine),
                                       ("gw-3nodes", gw_port, spread)):
                rate = await pipelined_push(port, queues, args.jobs)
                best[name] = max(best.get(name, 0.0), rate)
                print(f"  {name:10s} {rate:10,.0f} jobs/s")
        for name in ("gw-1node", "gw-3nodes"):
            print(f"{name}: {best[name]:,.0f} jobs/s = {best[name] / best['direct']:.2f}x direct "
                  f"({best['direct']:,.0f} jobs/s)")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pin", action="store_true", help="pin nodes apart from client+gateway")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
