"""The replication benchmark's shard: its members as ``shardq node`` subprocesses, where
they run (CPU placement) and what they cost (CPU time, run-queue waits, fsyncs).

Used by ``bench_replication.py``. Must not: stop a process it did not start, or wait
without a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

import bench_procs as procs

from shardq_operator.local import free_port

OUT_DIR = procs.ROOT / "build" / "bench" / "replication"
NAMES = ["a", "b", "c"]  # "a" is the primary at R = 3, and the only node at R = 1
SHARD = "s0"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- CPU placement ----------------------------------------------------------------------------


class Placement:
    """Which CPU each process runs on: bench.py's placement, extended to a shard's followers.

    As in ``bench.Placement``: the one-request-in-flight workload runs the client and the
    node it talks to (R = 1: the node; R = 3: the primary) on the first CPU; the throughput
    workloads give the client the first CPU and that node the second. So the primary sits
    exactly where the single copy sits, and R = 3 vs R = 1 is what the followers add.

    ``followers="split"`` (the default) puts one follower on each CPU: follower c with the
    primary, follower b on the other CPU. For the sequential workload that keeps one whole
    path of an answer on one CPU (client → primary → c → primary → client), which is
    bench.py's rule for one request in flight: a round trip between CPUs pays a cross-CPU
    wake-up that depends on where the scheduler puts things, not on the code; b, on the
    other CPU, keeps the shard from relying on one CPU. For the throughput workloads the
    client and the primary keep their own CPUs and each also hosts a follower: the three
    copies share the two cores, one follower beside the light client.

    ``followers="apart"`` puts both followers on the CPU the primary does not use,
    ``followers="primary"`` both on the primary's; ``--no-pin`` leaves everything to the
    scheduler. Every thread of a node is pinned, not only its event loop.

    Tried on 2026-12-06 (2 CPUs, other people's tests on them, load average 7-15),
    interleaved, 3-4 rounds each; R = 3 vs R = 1: sequential p50 +67 µs split, +101 to
    +162 µs apart, +159 to +416 µs primary; 50 producers (always) 1.09× split, 0.68× apart;
    pipelined 0.43× split, 0.48× apart (the same within the noise), 0.50-0.61× primary under
    the heaviest load (a loaded CPU is shared per runnable process: three nodes on one CPU
    take three shares where the single copy takes one). Apart, every acknowledgement of the
    sequential workload crosses CPUs twice, and with 1,000 requests in flight both
    followers apply each group on one CPU, each at half speed, while the primary waits.
    """

    def __init__(self, enabled: bool, followers: str = "split") -> None:
        self.all = os.sched_getaffinity(0)
        cpus = sorted(self.all)
        self.enabled = enabled and len(cpus) >= 2
        self.followers = followers
        self.client, self.server = (cpus[0], cpus[1]) if self.enabled else (-1, -1)

    def cpus(self, cores: str) -> dict[str, int]:
        """Each node's CPU for a workload's ``cores`` ("same" or "split")."""
        primary = self.client if cores == "same" else self.server
        other = self.server if primary == self.client else self.client
        b, c = {"split": (other, primary), "apart": (other, other),
                "primary": (primary, primary)}[self.followers]
        return {NAMES[0]: primary, NAMES[1]: b, NAMES[2]: c}

    def describe(self) -> str:
        if not self.enabled:
            return "not pinned (the scheduler places the client and every node)"

        def where(cores: str) -> str:
            cpus = self.cpus(cores)
            on = {cpu: ["the client"] if cpu == self.client else [] for cpu in
                  sorted({self.client, *cpus.values()})}
            on[cpus["a"]].append("the R = 1 node / R = 3 primary a")
            for n in NAMES[1:]:
                on[cpus[n]].append(f"follower {n}")
            return "; ".join(f"CPU {cpu}: {', '.join(who)}" for cpu, who in on.items())

        return (f"sequential PUSH: {where('same')}. Pipelined PUSH and 50 producers: "
                f"{where('split')}")

    def apply(self, cores: str, members: Members) -> None:
        if not self.enabled:
            return
        os.sched_setaffinity(0, {self.client})
        cpus = self.cpus(cores)
        for name, server in members.servers.items():
            pin_all(server.pid, {cpus[name]})

    def release(self) -> None:
        os.sched_setaffinity(0, self.all)


def pin_all(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` (and threads it starts later) onto ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU time of process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


# -- the shard's members ------------------------------------------------------------------------


def node_argv(name: str, data_dir: Path, fsync: str, http_port: int = 0,
              profile_to: Path | None = None) -> list[str]:
    """``shardq node`` with a data directory and (``http_port``) its /metrics, where the
    WAL's fsync times are read; ``profile_to``: under cProfile timed by CPU time
    (``node_cpuprofile.py``) with the interpreted sources (``bench_procs.PROFILED``),
    writing there when it stops."""
    argv = procs.node_argv()
    if profile_to is not None:
        assert argv[1:3] == ["-m", "shardq.cli"]
        argv = [*procs.PROFILED, argv[0], str(procs.HERE / "node_cpuprofile.py"),
                str(profile_to), *argv[3:]]
    argv[argv.index("--http-port") + 1] = str(http_port)
    return [*argv, "--name", name, "--data-dir", str(data_dir), "--fsync", fsync]


def fsync_stats(http_port: int) -> tuple[float, float]:
    """(seconds, count) of the node's WAL fsyncs so far, from its /metrics."""
    url = f"http://127.0.0.1:{http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    total = re.search(r"^shardq_wal_fsync_seconds_sum (\S+)$", text, re.M)
    count = re.search(r"^shardq_wal_fsync_seconds_count (\S+)$", text, re.M)
    if total is None or count is None:
        raise procs.ServerError(f"no fsync histogram at {url}")
    return float(total[1]), float(count[1])


def sched_ns(pid: int) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for one) of every thread of ``pid`` so far
    (/proc/PID/task/TID/schedstat): the wait is what other processes cost it."""
    on = wait = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            a, b, _ = f.read().split()
            on, wait = on + int(a), wait + int(b)
    return on, wait


class Probe:
    """CPU, run-queue wait and fsyncs of every process, across one measured workload."""

    def __init__(self, members: Members) -> None:
        self.members = members
        self.pids = {**members.pids, "client": os.getpid()}

    async def __aenter__(self) -> Probe:
        self.cpu0 = {n: cpu_seconds(p) for n, p in self.pids.items()}
        self.sched0 = {n: sched_ns(p) for n, p in self.pids.items()}
        self.fsync0 = await self.members.fsyncs()
        self.t0 = time.perf_counter()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        cpu = {n: cpu_seconds(p) for n, p in self.pids.items()}
        self.cpu = {n: sum(cpu[n]) - sum(self.cpu0[n]) for n in cpu}
        self.sys = {n: cpu[n][1] - self.cpu0[n][1] for n in cpu}
        sched = {n: sched_ns(p) for n, p in self.pids.items()}
        self.runq = {n: (sched[n][1] - self.sched0[n][1]) / 1e9 / self.wall for n in sched}
        after = await self.members.fsyncs()
        self.fsync = {n: (after[n][0] - self.fsync0[n][0], after[n][1] - self.fsync0[n][1])
                      for n in after}

    def summary(self, jobs: float) -> dict[str, Any]:
        return {
            "cpu_us_per_job": {n: round(1e6 * u / jobs, 2) for n, u in self.cpu.items()},
            "sys_us_per_job": {n: round(1e6 * u / jobs, 2) for n, u in self.sys.items()},
            "runq_wait": {n: round(w, 3) for n, w in self.runq.items()},
            "busy": {n: round(u / self.wall, 3) for n, u in self.cpu.items()},
            "fsync_ms": {n: round(1e3 * t / c, 3) if c else None
                         for n, (t, c) in self.fsync.items()},
            "fsyncs_per_job": {n: round(c / jobs, 4) for n, (_, c) in self.fsync.items()},
        }


class Members:
    """R node processes: at R = 1 a standalone node, at R = 3 shard s0 with primary "a"."""

    def __init__(self, r: int, fsync: str, work: Path, tag: str,
                 profile: dict[str, Path] | None = None) -> None:
        self.r = r
        self.fsync = fsync
        self.work = work / tag
        self.primary = NAMES[0]
        self.servers: dict[str, procs.Server] = {}
        profile = profile or {}
        self.http: dict[str, int] = {}
        for name in NAMES[:r]:
            self.http[name] = free_port()
            argv = node_argv(name, self.work / name, fsync, self.http[name], profile.get(name))
            self.servers[name] = procs.Server(f"shardq {tag}-{name}", argv, procs._NODE_READY,
                                              OUT_DIR / f"{tag}-{name}.log")

    @property
    def port(self) -> int:
        return self.servers[self.primary].port

    @property
    def pids(self) -> dict[str, int]:
        return {name: s.pid for name, s in self.servers.items()}

    async def start(self) -> Members:
        try:
            await asyncio.gather(*(asyncio.to_thread(s.start) for s in self.servers.values()))
            await self._publish()
        except BaseException:
            self.stop()
            raise
        return self

    async def _publish(self) -> None:
        """R = 3: shard s0 of the three, "a" primary in term 1, followers caught up. R = 1:
        the single-copy form (no shards, every slot owned by "a"), as ``shardq up
        --replicas 1`` runs each node: both then route every command through the
        topology, and the difference is replication."""
        from shardq.wire.slots import SLOTS
        from shardq.wire.topology import NodeInfo, Shard, Topology
        from shardq_operator.controller import Controller
        from shardq_operator.store import MemoryStore

        names = list(self.servers)
        nodes = [NodeInfo(n, f"127.0.0.1:{self.servers[n].port}") for n in names]
        if self.r == 1:
            topo = Topology(epoch=1, nodes=nodes, owners=[self.primary] * SLOTS)
        else:
            ids = {}
            for name, server in self.servers.items():
                ids[name] = str((await call(server.port, {"cmd": "STATUS"}))["storage_id"])
            topo = Topology(
                epoch=1, nodes=nodes, owners=[SHARD] * SLOTS,
                shards={SHARD: Shard(members=names, primary=self.primary, term=1, ids=ids)})
        controller = Controller(MemoryStore(topo))
        try:
            await controller.publish(topo)
        finally:
            await controller.close()
        if self.r > 1:
            await self.caught_up(20.0)
        else:
            st = await call(self.port, {"cmd": "STATUS"})
            if st.get("epoch") != 1 or st.get("role") != "standalone":
                raise procs.ServerError(f"R = 1 node did not take the topology: {st}")

    async def caught_up(self, timeout: float) -> dict[str, Any]:
        """Wait until every follower is live and holds the primary's whole log."""
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            st = await call(self.port, {"cmd": "STATUS"})
            followers = st.get("followers") or []
            if (st.get("role") == "primary" and len(followers) == self.r - 1
                    and all(f["live"] and f["acked"] >= st["seq"] for f in followers)):
                return st
            await asyncio.sleep(0.05)
        raise procs.ServerError(f"followers not caught up after {timeout:.0f} s: {st}\n"
                                + "\n".join(s.tail(5) for s in self.servers.values()))

    async def fsyncs(self) -> dict[str, tuple[float, float]]:
        got = await asyncio.gather(*(asyncio.to_thread(fsync_stats, port)
                                     for port in self.http.values()))
        return dict(zip(self.http, got, strict=True))

    def stop(self) -> dict[str, int | None]:
        codes = {name: s.stop() for name, s in self.servers.items()}
        shutil.rmtree(self.work, ignore_errors=True)
        return codes


async def call(port: int, req: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """One request on a fresh connection (set-up and STATUS only, never measured)."""
    from shardq.connection import Connection

    conn = await Connection(f"127.0.0.1:{port}").open(timeout)
    try:
        return await asyncio.wait_for(conn.call(req), timeout)
    finally:
        await conn.close()


