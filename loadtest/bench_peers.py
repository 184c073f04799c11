"""shardq side by side with Redis, beanstalkd and BullMQ: same workloads, same run.

    .venv/bin/python loadtest/bench_peers.py --write BENCHMARKS.md [--quick]

Starts on loopback, one after the other: a shardq node (``--fsync everysec``, a
data directory), a shardq cluster (3 nodes and a gateway), ``redis-server`` with
AOF ``appendfsync everysec``, ``beanstalkd`` with its binlog (fsync at most every
second), and BullMQ on that Redis (Node.js, ``loadtest/bullmq``). The Python
targets are driven by the same client (loadtest/bench_client.py: one uvloop
connection type, pre-encoded requests; each protocol's requests are its own):

  sequential push (one in flight) · pipelined push (1,000 in flight) · batch push
  of 1,000 · push → pull → ack, one at a time (Redis: LPUSH, LMOVE, LREM; beanstalkd:
  put, reserve, delete) · 10 and 50 concurrent producers · fsync on every write
  with 50 producers (shardq ``always`` vs Redis ``appendfsync always``) · a worker
  draining 100,000 waiting jobs (shardq's SDK AsyncWorker, concurrency 50, as it
  comes and with ``prefetch=50``, vs BullMQ's Worker, concurrency 50) · memory per
  waiting 200-byte job (RSS growth of the server process, shardq vs Redis).

BullMQ runs its own workloads from Node (its client is Node-only); those
numbers are from a different client and are marked so. Writes the ``peers``
section of BENCHMARKS.md with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_client as C
import bench_gateway as gw
import bench_procs as procs
import bench_report as report
import orjson
from bench_peers_report import section, versions

from shardq import AsyncClient, AsyncWorker
from shardq_operator.local import free_port

HERE = Path(__file__).resolve().parent
PAYLOAD = C.payload(200)
RAW = orjson.dumps(PAYLOAD)


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing on port {port}")


# -- CPU placement ----------------------------------------------------------------------------
# On this kind of VM a round trip between two processes pays a cross-CPU wake-up or not as
# the scheduler happens to place them, which swings every figure by tens of percent from
# run to run. So every single-process server (shardq node, Redis, beanstalkd, the floor)
# runs on the second CPU and the benchmark client (and BullMQ's Node client) on the first,
# for every target alike. The cluster's four processes are left to the scheduler.
# SHARDQ_BENCH_PIN=0 turns placement off.
CPUS = sorted(os.sched_getaffinity(0))
PINNED = (len(CPUS) >= 2 and os.environ.get("SHARDQ_BENCH_PIN", "1") != "0"
          and shutil.which("taskset") is not None)


def on_server_cpu(argv: list[str]) -> list[str]:
    """``argv`` started on the server CPU (every thread it ever makes included)."""
    return ["taskset", "-c", str(CPUS[1]), *argv] if PINNED else argv


def client_on_cpu(pinned: bool) -> None:
    """This process (the client) on the first CPU, or back on all of them."""
    if PINNED:
        os.sched_setaffinity(0, {CPUS[0]} if pinned else set(CPUS))


def placement() -> str:
    if not PINNED:
        return "not pinned (the scheduler places client and servers)"
    return (f"servers pinned to CPU {CPUS[1]} (`taskset`), the client (and BullMQ's Node "
            f"client) to CPU {CPUS[0]}; the cluster's processes unpinned")


class Proc:
    """A server subprocess stopped by its PID."""

    def __init__(self, argv: list[str], port: int, log: Path,
                 env: dict[str, str] | None = None) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
        self.port = port
        wait_port(port, self.proc)

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# -- protocols ------------------------------------------------------------------------------


def resp(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def starts(prefix: bytes) -> C.Check:
    def check(line: bytes) -> None:
        if not line.startswith(prefix):
            raise C.BenchError(f"expected {prefix!r}: {line[:200]!r}")
    return check


class Target:
    """How one server takes the workloads: request lines and answer checks."""

    def __init__(self, name: str, push: bytes, push_ok: C.Check, batch: bytes | None,
                 batch_ok: C.Check | None, cycle: Callable[[C.LineConn, int], C.Workload]):
        self.name, self.push, self.push_ok = name, push, push_ok
        self.batch, self.batch_ok, self.cycle = batch, batch_ok, cycle


class Steps(C.Workload):
    """A cycle of requests, one in flight; each step knows how many answer lines it gets."""

    def __init__(self, conn: C.LineConn, n: int, steps: list[Any]) -> None:
        super().__init__(conn, 120.0)
        self.n, self.steps, self.step, self.buf = n, steps, 0, []
        self.state: dict[str, Any] = {}
        self.started = 0
        self.lat: list[int] = []

    def send_first(self) -> None:
        self.started = time.perf_counter_ns()
        self.step = 0
        self.conn.write(self.steps[0][0](self.state))

    def on_lines(self, lines: list[bytes]) -> None:
        self.buf.extend(lines)
        while self.buf:
            _, want, handle = self.steps[self.step]
            need = want(self.buf[0])
            if len(self.buf) < need:
                return
            got, self.buf = self.buf[:need], self.buf[need:]
            handle(got, self.state)
            self.step += 1
            if self.step == len(self.steps):
                now = time.perf_counter_ns()
                self.lat.append(now - self.started)
                self.got += 1
                if self.got >= self.n:
                    self.finish(now)
                    return
                self.send_first()
            else:
                self.conn.write(self.steps[self.step][0](self.state))


def redis_cycle(conn: C.LineConn, n: int) -> C.Workload:
    def moved(lines: list[bytes], st: dict[str, Any]) -> None:
        if lines[0].startswith(b"$-1"):
            raise C.BenchError("LMOVE found nothing")
        st["item"] = lines[1].rstrip(b"\r")

    return Steps(conn, n, [
        (lambda st: resp(b"LPUSH", b"cycle", RAW), lambda first: 1,
         lambda lines, st: starts(b":")(lines[0])),
        (lambda st: resp(b"LMOVE", b"cycle", b"processing", b"RIGHT", b"LEFT"),
         lambda first: 1 if first.startswith(b"$-1") else 2, moved),
        (lambda st: resp(b"LREM", b"processing", b"1", st["item"]), lambda first: 1,
         lambda lines, st: starts(b":1")(lines[0])),
    ])


def beanstalk_cycle(conn: C.LineConn, n: int) -> C.Workload:
    def reserved(lines: list[bytes], st: dict[str, Any]) -> None:
        starts(b"RESERVED")(lines[0])
        st["id"] = lines[0].split()[1]

    return Steps(conn, n, [
        (lambda st: b"put 0 0 60 %d\r\n%s\r\n" % (len(RAW), RAW), lambda first: 1,
         lambda lines, st: starts(b"INSERTED")(lines[0])),
        (lambda st: b"reserve\r\n", lambda first: 2, reserved),
        (lambda st: b"delete %s\r\n" % st["id"], lambda first: 1,
         lambda lines, st: starts(b"DELETED")(lines[0])),
    ])


SHARDQ = Target(
    "shardq", C.push_line("bench", PAYLOAD), C.check_ok, C.pushb_line("bench", PAYLOAD, 1000),
    C.check_ids(1000), lambda conn, n: C.Cycle(conn, "cycle", PAYLOAD, n, 120.0))
REDIS = Target(
    "Redis", resp(b"LPUSH", b"bench", RAW), starts(b":"),
    resp(b"LPUSH", b"bench", *([RAW] * 1000)), starts(b":"), redis_cycle)
BEANSTALK = Target(
    "beanstalkd", b"put 0 0 60 %d\r\n%s\r\n" % (len(RAW), RAW), starts(b"INSERTED"), None, None,
    beanstalk_cycle)


# -- workloads ------------------------------------------------------------------------------


async def seq(port: int, t: Target, n: int) -> C.Measure:
    conn = await C.connect(port)
    try:
        await C.run([C.Sequential(conn, t.push, n // 5, 120.0, t.push_ok)], 120.0)  # warm-up
        w = C.Sequential(conn, t.push, n, 120.0, t.push_ok)
        await C.run([w], 120.0)
        return C.measured([w])
    finally:
        conn.close()


async def pipelined(port: int, t: Target, n: int) -> C.Measure:
    conn = await C.connect(port)
    try:
        w = C.Windowed(conn, t.push, n, 1000, 120.0, t.push_ok)
        await C.run([w], 120.0)
        return C.measured([w])
    finally:
        conn.close()


async def batch(port: int, t: Target, k: int) -> C.Measure | None:
    if t.batch is None or t.batch_ok is None:
        return None
    conn = await C.connect(port)
    try:
        w = C.Windowed(conn, t.batch, k, 2, 120.0, t.batch_ok)
        await C.run([w], 120.0)
        return C.measured([w], per_unit=1000)
    finally:
        conn.close()


async def cycle(port: int, t: Target, n: int) -> C.Measure:
    conn = await C.connect(port)
    try:
        await C.run([t.cycle(conn, n // 5)], 120.0)  # warm-up
        w = t.cycle(conn, n)
        await C.run([w], 120.0)
        return C.measured([w])
    finally:
        conn.close()


async def producers(port: int, t: Target, count: int, total: int) -> C.Measure:
    conns = [await C.connect(port) for _ in range(count)]
    try:  # warmed up first (a fifth of the count), like every target
        warm = [C.Sequential(c, t.push, max(1, total // count // 5), 120.0, t.push_ok)
                for c in conns]
        await C.run(list(warm), 120.0)
        ws = [C.Sequential(c, t.push, total // count, 120.0, t.push_ok) for c in conns]
        await C.run(list(ws), 120.0)
        return C.measured(list(ws))
    finally:
        for c in conns:
            c.close()


def build_env(pure: bool) -> dict[str, str]:
    """The environment of a shardq process: the compiled hot path as built, or (``pure``) its
    interpreted sources (``SHARDQ_PURE=1``, shardq.native)."""
    env = {k: v for k, v in os.environ.items() if k != "SHARDQ_PURE"}
    return {**env, "SHARDQ_PURE": "1"} if pure else env


async def drain(port: int, n: int, prefetch: int = 0, pure: bool = False) -> float:
    """``drain_shardq`` in a child process (on this process's CPU), so the SDK worker runs
    compiled or interpreted like the node it drains."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--drain", str(port), str(n), str(prefetch),
        env=build_env(pure), stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 600)
    if proc.returncode != 0:
        raise RuntimeError(f"the drain exited with {proc.returncode}")
    return float(out.decode().split()[-1])


async def drain_shardq(port: int, n: int, prefetch: int = 0) -> float:
    async with AsyncClient(f"127.0.0.1:{port}") as client:
        for _ in range(n // 1000):
            await client.push_batch("drain", [{"data": PAYLOAD}] * 1000)
        worker = AsyncWorker("drain", None, client, concurrency=50, batch_size=100, poll_ms=100,
                             prefetch=prefetch)

        async def handle(job: Any) -> None:
            return None

        worker.handler(handle)
        started = time.perf_counter()
        await asyncio.wait_for(worker.run(max_jobs=n, handle_signals=False), 300)
        return n / (time.perf_counter() - started)


async def suite(port: int, t: Target, q: bool) -> dict[str, Any]:
    n = 3_000 if q else 10_000
    out: dict[str, Any] = {
        "sequential": (await seq(port, t, n)).summary(),
        "pipelined": (await pipelined(port, t, 20_000 if q else 100_000)).summary(),
        "cycle": (await cycle(port, t, 1_000 if q else 5_000)).summary(),
        "concurrent10": (await producers(port, t, 10, n)).summary(),
        "concurrent50": (await producers(port, t, 50, n)).summary(),
    }
    b = await batch(port, t, 20 if q else 100)
    out["batch"] = b.summary() if b else None
    return out


def mean_round(runs: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Rounds of one workload as one: the mean rate (the first round's latencies), every
    round's rate under ``rounds``."""
    if any(r is None for r in runs):
        return None
    rates = [float(r["rate"]) for r in runs if r is not None]
    first: dict[str, Any] = dict(runs[0] or {})
    return {**first, "rate": sum(rates) / len(rates), "rounds": rates}


# -- servers --------------------------------------------------------------------------------


def shardq_node(work: Path, fsync: str, logs: Path, pure: bool = False) -> Proc:
    """A node with the compiled hot path (as built), or its interpreted sources (``pure``)."""
    port = free_port()
    kind = "pure" if pure else "built"
    return Proc(on_server_cpu([
        sys.executable, "-m", "shardq.cli", "node", "--port", str(port), "--http-port", "0",
        "--data-dir", str(work / f"node-{fsync}-{kind}-{port}"), "--fsync", fsync,
        "--log-level", "WARNING"]), port, logs / f"node-{fsync}-{kind}.log", build_env(pure))


def shardq_pure(work: Path, fsync: str, logs: Path) -> Proc:
    return shardq_node(work, fsync, logs, pure=True)


class Cluster:
    """Three ``--fsync everysec`` nodes with a published topology and a gateway in front."""

    def __init__(self, work: Path, logs: Path) -> None:
        self.nodes: list[procs.Server] = []
        self.gateway: procs.Server | None = None
        for i in range(3):
            n = procs.node(logs, f"cluster-node{i}")
            n.argv += ["--name", f"node-{i}", "--data-dir", str(work / f"cluster-{i}"),
                       "--fsync", "everysec"]
            self.nodes.append(n)

    async def start(self) -> int:
        for n in self.nodes:
            n.start()
        await gw.publish(self.nodes)
        self.gateway = gw.gateway(
            Path(self.nodes[0].log_path).parent, [f"127.0.0.1:{n.port}" for n in self.nodes]
        ).start()
        return self.gateway.port

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        for n in self.nodes:
            n.stop()


def redis(work: Path, fsync: str, logs: Path) -> Proc:
    port = free_port()
    d = work / f"redis-{fsync}-{port}"
    d.mkdir()
    return Proc(on_server_cpu([
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "yes", "--appendfsync", fsync, "--dir", str(d),
        "--protected-mode", "no"]), port, logs / f"redis-{fsync}.log")


def beanstalkd(work: Path, logs: Path) -> Proc:
    port = free_port()
    d = work / f"beanstalkd-{port}"
    d.mkdir()
    return Proc(on_server_cpu(["beanstalkd", "-l", "127.0.0.1", "-p", str(port), "-b", str(d),
                               "-f", "1000"]), port, logs / "beanstalkd.log")


async def memory(proc: Proc, t: Target, jobs: int) -> float:
    before = proc.rss()
    await pipelined(proc.port, t, jobs)
    await asyncio.sleep(0.5)
    return (proc.rss() - before) / jobs


def bullmq(redis_port: int, q: bool) -> dict[str, Any] | None:
    d = HERE / "bullmq"
    if shutil.which("node") is None:
        return None
    if not (d / "node_modules" / "bullmq").exists():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=d, check=True, timeout=300)
    n = 3_000 if q else 10_000
    args = [str(redis_port), str(n), "20" if q else "100", "20000" if q else "100000", "200"]
    out = subprocess.run(["node", "bench.mjs", *args], cwd=d, capture_output=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.decode()[-2000:])
    result: dict[str, Any] = orjson.loads(out.stdout.splitlines()[-1])
    return result


async def measure(q: bool, logs: Path, work: Path) -> dict[str, Any]:
    client_on_cpu(True)
    try:
        return await _measure(q, logs, work)
    finally:
        client_on_cpu(False)


async def _measure(q: bool, logs: Path, work: Path) -> dict[str, Any]:
    res: dict[str, Any] = {}
    # compiled and interpreted in the order A B B A (a fresh node each round): a load that
    # drifts during the run weighs on both alike; each figure is the mean of its two rounds
    rounds: dict[str, list[dict[str, Any]]] = {"shardq": [], "shardq_pure": []}
    for name, pure in (("shardq", False), ("shardq_pure", True), ("shardq_pure", True),
                       ("shardq", False)):
        node = shardq_node(work, "everysec", logs, pure)
        try:
            one = await suite(node.port, SHARDQ, q)
            one["drain"] = {"rate": await drain(node.port, 20_000 if q else 100_000,
                                                pure=pure)}
            one["drain_prefetch"] = {
                "rate": await drain(node.port, 20_000 if q else 100_000, 50, pure)}
            rounds[name].append(one)
        finally:
            node.stop()
    for name, both in rounds.items():
        res[name] = {key: mean_round([r[key] for r in both]) for key in both[0]}
    cluster = Cluster(work, logs)
    client_on_cpu(False)  # four processes: the scheduler spreads them (and the client)
    try:
        port = await cluster.start()
        res["gateway"] = await suite(port, SHARDQ, q)
        res["gateway"]["drain"] = {"rate": await drain(port, 20_000 if q else 100_000)}
        res["gateway"]["drain_prefetch"] = {
            "rate": await drain(port, 20_000 if q else 100_000, prefetch=50)}
    finally:
        cluster.stop()
        client_on_cpu(True)
    with procs.floor(logs) as fl:
        if PINNED:
            fl.pin({CPUS[1]})
        n = 3_000 if q else 10_000
        res["floor"] = {
            "sequential": (await seq(fl.port, SHARDQ, n)).summary(),
            "pipelined": (await pipelined(fl.port, SHARDQ, 20_000 if q else 100_000)).summary(),
            "concurrent10": (await producers(fl.port, SHARDQ, 10, n)).summary(),
            "concurrent50": (await producers(fl.port, SHARDQ, 50, n)).summary(),
        }
    r = redis(work, "everysec", logs)
    try:
        res["Redis"] = await suite(r.port, REDIS, q)
        res["BullMQ"] = bullmq(r.port, q)
    finally:
        r.stop()
    b = beanstalkd(work, logs)
    try:
        res["beanstalkd"] = await suite(b.port, BEANSTALK, q)
    finally:
        b.stop()
    # fsync on every write swings with the disk's mood more than anything else here: three
    # rounds, a fresh server each, the order rotating; each side's median round is kept
    n = 2_000 if q else 10_000
    trio: tuple[tuple[str, Any, Target], ...] = (
        ("shardq", shardq_node, SHARDQ), ("Redis", redis, REDIS),
        ("shardq_pure", shardq_pure, SHARDQ))
    rounds: dict[str, list[dict[str, Any]]] = {"shardq": [], "Redis": [], "shardq_pure": []}
    for i in range(3):
        for name, start, t in trio[i:] + trio[:i]:
            p = start(work, "always", logs)
            try:
                rounds[name].append((await producers(p.port, t, 50, n)).summary())
            finally:
                p.stop()
    for name, runs in rounds.items():
        res[name]["always50"] = C.median_round(runs)
    for name, start, t in trio:
        p = start(work, "no" if name == "Redis" else "never", logs)
        try:
            res[name]["memory_per_job"] = await memory(p, t, 50_000 if q else 200_000)
        finally:
            p.stop()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--drain", nargs=3, type=int, metavar=("PORT", "JOBS", "PREFETCH"),
                   help="(internal) drain JOBS with the SDK worker, print the rate")
    args = p.parse_args(argv)
    if args.drain:
        try:
            import uvloop
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            pass
        print(asyncio.run(drain_shardq(*args.drain)))
        return 0
    for binary in ("redis-server", "beanstalkd"):
        if shutil.which(binary) is None:
            print(f"{binary} is not installed: apt-get install -y redis-server beanstalkd",
                  file=sys.stderr)
            return 2
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    logs = procs.ROOT / "build" / "bench" / "peers"
    work = Path(tempfile.mkdtemp(prefix="shardq-peers-", dir=os.environ.get("TMPDIR", "/tmp")))
    load_start = os.getloadavg()
    try:
        res = asyncio.run(measure(args.quick, logs, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_end = os.getloadavg()
    (logs / "peers.json").write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))
    meta = (f"{time.strftime('%Y-%m-%d %H:%M UTC')}, {os.cpu_count()} CPUs (load average "
            f"1/5/15 min at start {' '.join(f'{x:.2f}' for x in load_start)}, at end "
            f"{' '.join(f'{x:.2f}' for x in load_end)}), {versions()}")
    body = section(res, " ".join(["loadtest/bench_peers.py", *(argv or sys.argv[1:])]), meta,
                   placement())
    print(body)
    if args.write:
        report.write_section(Path(args.write), "peers", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
