"""Replication benchmark: one shard of three (R = 3) against a single copy (R = 1), one run.

    .venv/bin/python loadtest/bench_replication.py --write BENCHMARKS.md   # (make bench)
    .venv/bin/python loadtest/bench_replication.py --quick                 # smoke run
    .venv/bin/python loadtest/bench_replication.py --no-profile            # no cProfile step

Every node is a ``shardq node`` subprocess on a free loopback port with its own data
directory, started and stopped by PID (``bench_procs.Server``). R = 1 is one node given
the single-copy topology (every slot its own, no shards: how ``shardq up --replicas 1``
runs a node); R = 3 is three nodes made shard ``s0`` (primary ``a``, term 1); both by
publishing a topology with ``SETTOPOLOGY`` (``Controller.publish``, no controller loop),
the followers caught up before anything is measured. The client
(``bench_client.py``, the same as the other benchmarks') talks to the primary directly:

  pipelined PUSH (1 connection, 1,000 in flight) · sequential PUSH (1 in flight; its p50)
  · 50 producers (one connection each, one PUSH in flight each)

under one fsync policy per row, the same for R = 1 and R = 3: ``everysec`` for the
pipelined and sequential rows (the targets; no fsync in the answer path, so the rows show
what replication itself costs), ``always`` for 50 producers (the target) and again for
the sequential and pipelined rows (for reference: the followers' fsync in the path).

The shared machine and its disk are noisy, so the run is ``--rounds`` rounds; in each, per
fsync policy, a fresh R = 1 node and a fresh R = 3 shard are up together and every
workload runs on one and then at once on the other (which goes first alternates), so the
two halves of a pair are seconds apart. Rates are medians of the rounds, R = 3 vs R = 1
is the median of the per-round ratios (p50: of the per-round differences). Across each
measured workload every process's CPU time (/proc/PID/stat), its time runnable but
waiting for a CPU (/proc/PID/task/*/schedstat: what other people's processes cost it) and
each node's mean WAL fsync time (its /metrics) are recorded. Then (unless
``--no-profile``) the primary and one follower run under cProfile (``node_cpuprofile.py``:
a CPU-time clock) at R = 1 and R = 3 for the pipelined and sequential workloads, once
each, for "where the time goes".
Writes the ``replication`` section of BENCHMARKS.md; raw results go to
build/bench/replication.json.

Must not: talk to anything but 127.0.0.1, stop processes it did not start, or run
unbounded (every workload stops at its count or its time cap; every wait has a timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pstats
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import bench
import bench_client as C
import bench_procs as procs
import bench_report as report

from shardq_operator.local import free_port

OUT_DIR = procs.ROOT / "build" / "bench" / "replication"
NAMES = ["a", "b", "c"]  # "a" is the primary at R = 3, and the only node at R = 1
SHARD = "s0"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Config:
    n_seq: int = 10_000
    n_seq_always: int = 3000
    n_pipe: int = 100_000
    window: int = 1000
    producers: int = 50
    per_producer: int = 400
    payload_bytes: int = 200
    rounds: int = 7
    cap_s: float = 30.0
    warm_fraction: float = 0.2
    profile_pipe: int = 50_000
    profile_seq: int = 5000

    def warm(self, n: int) -> int:
        return max(1, int(n * self.warm_fraction))


QUICK = {"n_seq": 1000, "n_seq_always": 300, "n_pipe": 10_000, "per_producer": 60,
         "rounds": 1, "cap_s": 10.0, "profile_pipe": 20_000, "profile_seq": 2000}


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
    (``node_cpuprofile.py``), writing there when it stops."""
    argv = procs.node_argv()
    if profile_to is not None:
        assert argv[1:3] == ["-m", "shardq.cli"]
        argv = [argv[0], str(procs.HERE / "node_cpuprofile.py"), str(profile_to), *argv[3:]]
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


# -- workloads ------------------------------------------------------------------------------


async def seq_push(cfg: Config, port: int, n: int) -> C.Measure:
    conn = await C.connect(port)
    try:
        line = C.push_line("bench.seq", C.payload(cfg.payload_bytes))
        await C.run([C.Sequential(conn, line, cfg.warm(n), cfg.cap_s, C.check_ok)], cfg.cap_s)
        w = C.Sequential(conn, line, n, cfg.cap_s, C.check_ok)
        await C.run([w], cfg.cap_s)
        return C.measured([w])
    finally:
        conn.close()


async def pipe_push(cfg: Config, port: int, n: int) -> C.Measure:
    conn = await C.connect(port)
    try:
        line = C.push_line("bench.pipe", C.payload(cfg.payload_bytes))
        warm = C.Windowed(conn, line, cfg.warm(n), cfg.window, cfg.cap_s, C.check_ok)
        await C.run([warm], cfg.cap_s)
        w = C.Windowed(conn, line, n, cfg.window, cfg.cap_s, C.check_ok)
        await C.run([w], cfg.cap_s)
        return C.measured([w])
    finally:
        conn.close()


async def producers(cfg: Config, port: int, n: int) -> C.Measure:
    conns = [await C.connect(port) for _ in range(cfg.producers)]
    try:
        line = C.push_line("bench.durable", C.payload(cfg.payload_bytes))
        per = max(1, n // cfg.producers)
        await C.run([C.Sequential(c, line, cfg.warm(per), cfg.cap_s, C.check_ok)
                     for c in conns], cfg.cap_s)
        ws = [C.Sequential(c, line, per, cfg.cap_s, C.check_ok) for c in conns]
        await C.run(list(ws), cfg.cap_s)
        return C.measured(list(ws))
    finally:
        for c in conns:
            c.close()


Fn = Callable[[Config, int, int], Awaitable[C.Measure]]


@dataclass
class Spec:
    key: str
    title: str
    shape: str
    fsync: str
    fn: Fn
    cores: str  # "same" (one request in flight) or "split" (throughput): see Placement
    measure: str  # "rate": R=3/R=1 of jobs/s; "p50": R=3 p50 minus R=1 p50
    target: float | None  # rate: the least ratio; p50: the most µs added; None: reference
    count: Callable[[Config], int] = field(default=lambda cfg: 0)


#: ``--workloads``: only these rows (exploring); empty: all of them
SELECTED: set[str] = set()


def specs() -> list[Spec]:
    return [s for s in all_specs() if not SELECTED or s.key in SELECTED]


def all_specs() -> list[Spec]:
    return [
        Spec("pipe", "Pipelined PUSH", "1 connection, 1,000 in flight", "everysec", pipe_push,
             "split", "rate", 0.5, lambda cfg: cfg.n_pipe),
        Spec("seq", "Sequential PUSH", "1 connection, 1 in flight", "everysec", seq_push,
             "same", "p50", 150.0, lambda cfg: cfg.n_seq),
        Spec("prod", "50 producers", "50 connections, 1 PUSH in flight each", "always",
             producers, "split", "rate", 0.5, lambda cfg: cfg.producers * cfg.per_producer),
        Spec("seq-always", "Sequential PUSH", "1 connection, 1 in flight", "always",
             seq_push, "same", "p50", None, lambda cfg: cfg.n_seq_always),
        Spec("pipe-always", "Pipelined PUSH", "1 connection, 1,000 in flight", "always",
             pipe_push, "split", "rate", None, lambda cfg: cfg.n_pipe),
    ]


POLICIES = ["everysec", "always"]


async def run_workload(cfg: Config, place: Placement, s: Spec, members: Members
                       ) -> dict[str, Any]:
    """One workload on one set of nodes, with its per-process measures."""
    place.apply(s.cores, members)
    try:
        async with Probe(members) as probe:
            m = await s.fn(cfg, members.port, s.count(cfg))
    finally:
        place.release()
    summary = m.summary()
    # per job over the whole workload, warm-up included (it ran between the reads)
    summary.update(probe.summary(m.jobs * (1 + cfg.warm_fraction)))
    p50 = summary.get("latency_us", {}).get("p50")
    _progress(f"    R={members.r} {s.key:<12} {m.rate:>10,.0f} jobs/s"
              + (f"  p50 {p50:,.0f} µs" if p50 is not None else "")
              + "  cpu µs/job " + " ".join(
                  f"{n}:{v:.1f}" for n, v in summary["cpu_us_per_job"].items())
              + "  runq " + " ".join(f"{n}:{v:.0%}" for n, v in summary["runq_wait"].items())
              + "  fsync ms " + " ".join(f"{n}:{v:.2f}" for n, v in summary["fsync_ms"].items()
                                         if v is not None))
    return summary


async def run_policy(cfg: Config, place: Placement, work: Path, fsync: str, n: int
                     ) -> dict[str, dict[str, Any]]:
    """A fresh R = 1 node and a fresh R = 3 shard, both up at once; every workload of this
    fsync policy on one, then at once on the other (which goes first alternates by round
    and by workload), so each pair is measured seconds apart."""
    out: dict[str, dict[str, Any]] = {"r1": {}, "r3": {}}
    sets = {r: Members(r, fsync, work, f"round{n + 1}-{fsync}-r{r}") for r in (1, 3)}
    try:
        for members in sets.values():
            await members.start()
        for i, s in enumerate(x for x in specs() if x.fsync == fsync):
            for r in (1, 3) if (n + i) % 2 == 0 else (3, 1):
                out[f"r{r}"][s.key] = await run_workload(cfg, place, s, sets[r])
        await sets[3].caught_up(20.0)  # every follower still live at the end
    finally:
        for members in sets.values():
            codes = members.stop()
            if any(code not in (0, None) for code in codes.values()):
                _progress(f"    note: exit codes {codes}")
    return out


async def measure(cfg: Config, place: Placement, work: Path) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    for n in range(cfg.rounds):
        load = bench._loadavg()
        _progress(f"round {n + 1}/{cfg.rounds} (load {load})")
        rnd: dict[str, Any] = {"loadavg": load, "r1": {}, "r3": {}}
        for fsync in POLICIES:
            if any(s.fsync == fsync for s in specs()):
                res = await run_policy(cfg, place, work, fsync, n)
                rnd["r1"].update(res["r1"])
                rnd["r3"].update(res["r3"])
        rounds.append(rnd)
    return {"rounds": rounds, "rows": summarize(rounds)}


def summarize(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for s in specs():
        r1 = [rnd["r1"][s.key] for rnd in rounds]
        r3 = [rnd["r3"][s.key] for rnd in rounds]
        row: dict[str, Any] = {
            "key": s.key, "title": s.title, "shape": s.shape, "fsync": s.fsync,
            "measure": s.measure, "target": s.target,
            "r1": C.median_round(r1), "r3": C.median_round(r3),
            "r1_rounds": [x["rate"] for x in r1], "r3_rounds": [x["rate"] for x in r3],
        }
        for k in ("cpu_us_per_job", "sys_us_per_job", "runq_wait", "busy", "fsync_ms",
                  "fsyncs_per_job"):
            row[k] = {"r1": _median_of([x[k] for x in r1]), "r3": _median_of([x[k] for x in r3])}
        if s.measure == "rate":
            per = [b["rate"] / a["rate"] for a, b in zip(r1, r3, strict=True)]
            row["value"] = statistics.median(per)
            row["met"] = None if s.target is None else row["value"] >= s.target
        else:
            p1 = [a["latency_us"]["p50"] for a in r1]
            p3 = [b["latency_us"]["p50"] for b in r3]
            per = [b - a for a, b in zip(p1, p3, strict=True)]
            row["r1_p50"], row["r3_p50"] = statistics.median(p1), statistics.median(p3)
            row["r1_p50_rounds"], row["r3_p50_rounds"] = p1, p3
            row["value"] = statistics.median(per)
            row["met"] = None if s.target is None else row["value"] <= s.target
        row["per_round"] = [round(x, 3) for x in per]
        rows.append(row)
    return rows


def _median_of(per_round: list[dict[str, float | None]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name in per_round[0]:
        values = [v for r in per_round if (v := r[name]) is not None]
        out[name] = round(statistics.median(values), 3) if values else None
    return out


# -- profile ----------------------------------------------------------------------------------

#: (label, file, function) of the replication path, read from the profiles: cumulative
#: CPU time of the first match with the largest cumtime (a method and a module function may
#: share a name: ``Replication.ship`` calls ``FollowerLink.ship``, and includes it)
PRIMARY_FUNCS = [
    ("shipping (build RECORDS, write to both followers)", "replication.py", "ship"),
    ("reading acks (incl. the commit and releasing answers)", "replication.py", "_session"),
    ("commit LSN (`advance`, every call)", "replication.py", "advance"),
    ("releasing held answers (`released`)", "runtime.py", "released"),
]
FOLLOWER_FUNCS = [
    ("the stream (`FollowerStream.feed`)", "replication.py", "feed"),
    ("append + apply (`follow_records`)", "runtime.py", "follow_records"),
    ("applying (`Engine.apply`)", "engine.py", "apply"),
    ("acks", "replication.py", "ack"),
]


def cumulative(path: Path, funcs: list[tuple[str, str, str]]) -> dict[str, dict[str, float]]:
    """Each (label, file, function)'s cumulative time and call count in a profile."""
    st = pstats.Stats(str(path))
    raw: dict[Any, Any] = st.stats  # type: ignore[attr-defined]
    out = {}
    for label, file, name in funcs:
        best = (0.0, 0)
        for (fname, _line, func), (_cc, nc, _tt, ct, _callers) in raw.items():
            if func == name and fname.endswith("/" + file) and ct > best[0]:
                best = (ct, nc)
        out[label] = {"cumtime": best[0], "ncalls": best[1]}
    return out


async def _profiled(cfg: Config, place: Placement, work: Path, r: int, key: str, fn: Fn,
                    cores: str, n: int) -> dict[str, Any]:
    prof = {NAMES[0]: OUT_DIR / f"profile-r{r}-{key}-a.prof"}
    if r > 1:
        # follower c: on the primary's CPU (split placement), the one whose ack an answer
        # waits for with one request in flight
        prof[NAMES[2]] = OUT_DIR / f"profile-r{r}-{key}-c.prof"
    for p in prof.values():
        p.unlink(missing_ok=True)
    members = await Members(r, "everysec", work, f"profile-r{r}-{key}", profile=prof).start()
    try:
        place.apply(cores, members)
        m = await fn(replace(cfg, cap_s=120.0), members.port, n)
        place.release()
    finally:
        codes = members.stop()
    out: dict[str, Any] = {"r": r, "key": key, "rate": m.rate, "jobs": m.jobs,
                           "capped": m.capped}
    for name, path in prof.items():
        if codes.get(name) != 0 or not path.exists() or path.stat().st_size == 0:
            raise procs.ServerError(f"profile of {name} not written (exit {codes.get(name)})")
        total, top = bench.top_functions(path, 15)
        role = "primary" if name == NAMES[0] else "follower"
        funcs = cumulative(path, PRIMARY_FUNCS if role == "primary" else FOLLOWER_FUNCS)
        out[role] = {"total_tt": total, "top": top, "funcs": funcs,
                     "file": str(path.relative_to(procs.ROOT))}
    _progress(f"  profile R={r} {key}: {m.rate:,.0f} jobs/s under cProfile; primary CPU "
              f"{out['primary']['total_tt']:.2f} s: " + "; ".join(
                  f"{label} {v['cumtime']:.3f} s" for label, v in
                  out["primary"]["funcs"].items()))
    return out


async def profile(cfg: Config, place: Placement, work: Path) -> list[dict[str, Any]]:
    """The primary under cProfile at R = 1 and R = 3 (everysec): pipelined and sequential."""
    out = []
    for key, fn, cores, n in (("pipe", pipe_push, "split", cfg.profile_pipe),
                              ("seq", seq_push, "same", cfg.profile_seq)):
        for r in (1, 3):
            out.append(await _profiled(cfg, place, work, r, key, fn, cores, n))
    return out


# -- report -----------------------------------------------------------------------------------


def _rate(summary: dict[str, Any]) -> str:
    cell = f"**{report.num(summary['rate'])}** jobs/s"
    return cell + (" (capped)" if summary.get("capped") else "")


def _sub(values: list[float], fmt: str = "{:,.0f}") -> str:
    return "<br><sub>" + " · ".join(fmt.format(v) for v in values) + "</sub>" \
        if len(values) > 1 else ""


def _cell(row: dict[str, Any], r: str) -> str:
    if row["measure"] == "rate":
        return _rate(row[r]) + _sub(row[f"{r}_rounds"])
    lat = row[r]["latency_us"]
    return (f"p50 **{row[f'{r}_p50']:,.0f}** µs · p99 {lat['p99']:,.0f} µs "
            f"({report.num(row[r]['rate'])} jobs/s)" + _sub(row[f"{r}_p50_rounds"]))


def _value(row: dict[str, Any]) -> str:
    if row["measure"] == "rate":
        return f"**{row['value']:.2f}×**" + _sub(row["per_round"], "{:.2f}")
    return f"**{row['value']:+,.0f} µs**" + _sub(row["per_round"], "{:+,.0f}")


def _target(row: dict[str, Any]) -> str:
    if row["target"] is None:
        return "— (reference)"
    text = (f"≥ {row['target']:.1f}×" if row["measure"] == "rate"
            else f"≤ +{row['target']:.0f} µs")
    return f"{text}: **{'met' if row['met'] else 'missed'}**"


def _per_process(row: dict[str, Any], key: str, fmt: Callable[[float], str]) -> str:
    """R = 1's node and client, then R = 3's primary, followers and client."""
    v1, v3 = row[key]["r1"], row[key]["r3"]

    def cell(v: float | None) -> str:
        return "—" if v is None else fmt(v)

    return (f"{cell(v1['a'])} · {cell(v1.get('client'))} / {cell(v3['a'])} · "
            + " · ".join(cell(v3[n]) for n in NAMES[1:] if n in v3)
            + f" · {cell(v3.get('client'))}")


def process_table(res: dict[str, Any]) -> list[str]:
    out = [
        "Per process during each workload (medians of the rounds): **R = 1** node · client "
        "/ **R = 3** primary · follower b · follower c · client. *CPU* is user + system time "
        "per job from /proc (warm-up included); *run-queue wait* is the share of the "
        "workload's wall time the process was runnable but waiting for a CPU "
        "(/proc/PID/schedstat, all its threads: what the machine's other load cost it); "
        "*fsync* is the mean time of one WAL fsync, from each node's /metrics.",
        "",
        "| Workload | fsync | CPU µs/job | run-queue wait | fsync ms (nodes only) |",
        "|---|---|---|---|---|",
    ]
    for row in res["rows"]:
        fs1, fs3 = row["fsync_ms"]["r1"], row["fsync_ms"]["r3"]
        fsync = (f"{fs1['a']:.2f} / " + " · ".join(f"{fs3[n]:.2f}" for n in NAMES)
                 if fs1.get("a") is not None and all(fs3.get(n) is not None for n in NAMES)
                 else "—")
        if row["fsync"] == "everysec":
            fsync = "— (once a second, in a thread: not in the answers' path)"
        out.append(
            f"| {row['title']} | `{row['fsync']}` "
            f"| {_per_process(row, 'cpu_us_per_job', lambda v: f'{v:.1f}')} "
            f"| {_per_process(row, 'runq_wait', lambda v: f'{100 * v:.0f}%')} | {fsync} |")
    return [*out, ""]


def terminal_table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        if row["measure"] == "rate":
            a, b = f"{row['r1']['rate']:,.0f}/s", f"{row['r3']['rate']:,.0f}/s"
            v = f"{row['value']:.2f}x"
        else:
            a, b = f"p50 {row['r1_p50']:,.0f}us", f"p50 {row['r3_p50']:,.0f}us"
            v = f"{row['value']:+,.0f}us"
        t = "reference" if row["target"] is None else ("met" if row["met"] else "MISSED")
        lines.append(f"{row['title']:<16} {row['fsync']:<9} R=1 {a:>14}  R=3 {b:>14}  "
                     f"{v:>9}  {t:<9} per round {row['per_round']}")
    return "\n".join(lines)


def _find(profiles: list[dict[str, Any]], r: int, key: str) -> dict[str, Any] | None:
    for p in profiles:
        if p["r"] == r and p["key"] == key:
            return p
    return None


def _us(v: float) -> str:
    return f"{v:,.1f}" if abs(v) < 100 else f"{v:,.0f}"


def _per_cpu(cpu_us: dict[str, float], cpus: dict[str, int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for name, cpu in cpus.items():
        out[cpu] = out.get(cpu, 0.0) + cpu_us.get(name, 0.0)
    return out


def where_the_time_goes(res: dict[str, Any]) -> list[str]:
    rows = {row["key"]: row for row in res["rows"]}
    if "pipe" not in rows or "seq" not in rows:
        return []
    meta = res["meta"]
    pipe, seq = rows["pipe"], rows["seq"]
    c1, c3 = pipe["cpu_us_per_job"]["r1"], pipe["cpu_us_per_job"]["r3"]
    w1, w3 = pipe["runq_wait"]["r1"], pipe["runq_wait"]["r3"]
    b1, b3 = pipe["busy"]["r1"], pipe["busy"]["r3"]
    idle1, idle3 = max(0.0, 1 - b1["a"] - w1["a"]), max(0.0, 1 - b3["a"] - w3["a"])
    out = ["### Where the time goes at R = 3", ""]
    cpus = meta.get("cpus", {}).get("split") or {}
    bound = ""
    if cpus:
        load1 = _per_cpu(c1, {"a": cpus["a"], "client": cpus["client"]})
        load3 = _per_cpu(c3, cpus)
        bound1, bound3 = 1e6 / max(load1.values()), 1e6 / max(load3.values())
        bound = (" Per CPU that is " + ", ".join(
            f"CPU {cpu} {_us(v)} µs" for cpu, v in sorted(load3.items())) + " per job at "
            "R = 3 (" + ", ".join(f"CPU {cpu} {_us(v)} µs" for cpu, v in sorted(load1.items()))
            + f" at R = 1): if CPU were the only limit, R = 3 would reach ~{bound3:,.0f} "
            f"jobs/s against R = 1's ~{bound1:,.0f} (**{bound3 / bound1:.2f}×**, an upper "
            "bound).")
    out.append(
        f"- **Pipelined PUSH.** CPU per job: the single copy {_us(c1['a'])} µs; at R = 3 the "
        f"primary {_us(c3['a'])} µs ({c3['a'] - c1['a']:+.1f} µs: shipping and acks are per "
        "group of hundreds of jobs, so they nearly vanish per job) and each follower "
        + " and ".join(_us(c3[n]) for n in NAMES[1:]) + " µs (reading the stream, its WAL "
        f"write and `Engine.apply`: about {100 * c3['b'] / c1['a']:.0f}% of what the primary "
        "spends on a command)." + bound + " The rate is set by waiting instead: R = 1's "
        f"node ran {100 * b1['a']:.0f}% of the workload's wall time, waited for a CPU "
        f"{100 * w1['a']:.0f}% and was idle {100 * idle1:.0f}%; R = 3's primary ran "
        f"{100 * b3['a']:.0f}%, waited for a CPU {100 * w3['a']:.0f}% and was idle "
        f"{100 * idle3:.0f}% (its followers waited for a CPU "
        + " and ".join(f"{100 * w3[n]:.0f}%" for n in NAMES[1:]) + "). The primary reads "
        "the client's 1,000 requests in one or two reads, so a group is most of the window, "
        "and none of its answers may leave until a follower has received the whole group, "
        "applied it to its engine, written it and acked; meanwhile the client has nothing "
        "left to send and the primary nothing to do. So the primary's and the followers' "
        "work on a window run one after the other rather than side by side, and every "
        "hand-off between them also waits its turn for a CPU behind other people's "
        "processes.")
    s1, s3 = seq["cpu_us_per_job"]["r1"], seq["cpu_us_per_job"]["r3"]
    y1, y3 = seq["sys_us_per_job"]["r1"], seq["sys_us_per_job"]["r3"]
    near = {"split": "follower c, on the primary's CPU,",
            "primary": "a follower on the primary's CPU",
            "apart": "a follower on the other CPU"}.get(meta.get("followers", ""),
                                                     "a follower")
    out.append(
        f"- **Sequential PUSH** (one request in flight): p50 {seq['r1_p50']:,.0f} µs at "
        f"R = 1, {seq['r3_p50']:,.0f} µs at R = 3 ({seq['value']:+,.0f} µs, the median of "
        "the per-round differences). The answer waits for a second process: the primary "
        f"writes the record to its WAL and sends it to both followers, {near} wakes, reads "
        "it, applies it, writes it to its WAL (in the next turn of its event loop) and acks, "
        "and the primary wakes again, reads the ack, moves the commit LSN and releases the "
        "answer (the other follower's ack comes later and is not waited for). With one "
        "request in flight every group is one job, so nothing is amortised: the primary "
        f"spends {_us(s3['a'])} µs of CPU per request against the single copy's "
        f"{_us(s1['a'])} ({s3['a'] - s1['a']:+.0f} µs, of which {y3['a'] - y1['a']:+.0f} µs in "
        "the kernel: two loopback sends that also deliver to and wake the followers, two ack "
        "reads, one more sleep and wake-up), and each follower "
        + " and ".join(_us(s3[n]) for n in NAMES[1:]) + " µs. The answer's path holds the "
        "primary's extra work up to the first ack and the nearer follower's whole work, on "
        "the same CPU one after the other.")
    always = rows.get("seq-always")
    if always is not None:
        f1, f3 = always["fsync_ms"]["r1"], always["fsync_ms"]["r3"]
        fs = ""
        if f1.get("a") is not None and all(f3.get(n) is not None for n in NAMES):
            fs = (f" The nodes' mean fsync was {f1['a']:.2f} ms at R = 1 and "
                  + " · ".join(f"{f3[n]:.2f}" for n in NAMES) + " ms at R = 3 (primary · "
                  "followers).")
        out.append(
            f"- **Followers' fsync in the path (`always`):** sequential p50 "
            f"{always['r1_p50']:,.0f} µs at R = 1, {always['r3_p50']:,.0f} µs at R = 3 "
            f"({always['value']:+,.0f} µs). The primary ships before its own fsync, so its "
            "fsync and the followers' overlap, and a majority is any two of the three: an "
            "answer waits for the hop plus the second-fastest of three fsyncs, not for all "
            f"of them.{fs} On this shared disk an fsync's time swings with everyone else's "
            "writes, so this row moves more than any other from round to round.")
    profiles = res.get("profiles") or []
    for key, title in (("pipe", "pipelined"), ("seq", "sequential")):
        p1, p3 = _find(profiles, 1, key), _find(profiles, 3, key)
        if p1 is None or p3 is None:
            continue
        prim = p3["primary"]
        total = prim["total_tt"]
        parts = "; ".join(f"{label} {100 * v['cumtime'] / total:.1f}%"
                          for label, v in prim["funcs"].items())
        line = (f"- **cProfile, {title} PUSH** ({p3['jobs']:,} jobs after warm-up, "
                f"everysec): the R = 3 primary's profiled CPU {total:.2f} s against "
                f"{p1['primary']['total_tt']:.2f} s for the single copy doing the same; of the "
                f"primary's CPU (nested: the ack reads include the commit and the release): "
                f"{parts}.")
        fol = p3.get("follower")
        if fol is not None:
            ftotal = fol["total_tt"]
            line += (" Follower c: " + "; ".join(
                f"{label} {100 * v['cumtime'] / ftotal:.0f}%"
                for label, v in fol["funcs"].items()) + " of its CPU.")
        line += f" Profiles: `{prim['file']}`, `{p1['primary']['file']}`"
        line += f", `{fol['file']}`." if fol is not None else "."
        out.append(line)
    if profiles:
        out.append(
            "  (Profiles are of the whole process, start-up included, under cProfile with a "
            "CPU-time clock, `loadtest/node_cpuprofile.py`: time preempted or idle in the "
            "event loop is charged to no function; the profiler's cost per call inflates "
            "call-heavy code such as `advance`, so read the shares, not absolute times.)")
    return out


def section(res: dict[str, Any]) -> str:
    meta = res["meta"]
    cfg = res["config"]
    out = [
        "## Replication: R = 1 vs R = 3",
        "",
        "_Written by `loadtest/bench_replication.py`. R = 1 is one node in the single-copy "
        "form of the topology (no shards, every slot its own, as `shardq up --replicas 1` "
        "runs a node); R = 3 is three nodes made one shard (primary and two followers, "
        "`SETTOPOLOGY`, followers caught up first), so both route every command through "
        "the topology and the difference is replication; every node is a `shardq node` process "
        "with its own data directory on this machine's disk (ext4), and the client "
        "(`bench_client.py`, as in the other benchmarks) talks to the node or the primary "
        "directly. Each row's fsync policy is the same at R = 1 and R = 3. The run is "
        f"{cfg['rounds']} rounds; in each, per fsync policy, a fresh R = 1 node and a fresh "
        "R = 3 shard are up together and every workload runs on one and at once on the "
        "other (which goes first alternates), so a pair is measured seconds apart. A cell "
        "is the median round (every round below it), **R = 3 vs R = 1 is the median of "
        "the per-round ratios** (latency: of the per-round p50 differences)._",
        "",
        f"- **Date:** {meta['date']} · **commit:** `{meta['commit']}` · "
        f"**shardq from:** {meta['source']}",
        f"- **Command:** `{meta['command']}`",
        f"- **Machine:** {meta['nproc']} CPUs (nproc), {meta['cpu']}, Linux {meta['kernel']}; "
        f"Python {meta['python']}, uvloop {meta['uvloop']}, orjson {meta['orjson']}",
        f"- **Load average** (1/5/15 min; other engineers' tests share this machine): at "
        f"start {meta['loadavg']}, at end {meta.get('loadavg_end', '?')}; 1-min load at each "
        "round's start: " + ", ".join(r.split()[0] for r in meta.get("round_loads", [])),
        f"- **Nodes:** `{meta['node_cmd']}` (`--name b`, `--name c` for the followers)",
        f"- **CPU placement:** {meta['placement']}. The primary sits where the single copy "
        "sits (as `bench.py` places a node), so the difference is what the followers add, "
        "and one follower shares each CPU: with one request in flight an answer's whole "
        "path (client, primary, the nearer follower) stays on one CPU, bench.py's rule "
        "against cross-CPU wake-ups that measure the scheduler rather than the code. Every "
        "thread of every node is pinned. Why this and not both followers on one CPU: "
        "`Placement` in the script, with measurements.",
        f"- {cfg['payload_bytes']}-byte payloads; every workload warmed up first "
        f"({cfg['warm_fraction']:.0%} of its count) on its connection(s), then measured; each "
        f"stops at its count or after {cfg['cap_s']:.0f} s (*capped*).",
        "",
        "| Workload | fsync | Count | R = 1 | R = 3 | R = 3 vs R = 1 | Target |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    by_key = {s.key: s for s in specs()}
    conf = Config(**cfg)
    for row in res["rows"]:
        count = by_key[row["key"]].count(conf)
        out.append(
            f"| {row['title']}<br><sub>{row['shape']}</sub> | `{row['fsync']}` | {count:,} "
            f"| {_cell(row, 'r1')} | {_cell(row, 'r3')} | {_value(row)} | {_target(row)} |")
    out += [
        "",
        "Targets (issue 15): pipelined PUSH at R = 3 ≥ 0.5× R = 1 (three copies share these "
        "2 cores); sequential PUSH p50 at R = 3 no more than 150 µs above R = 1; "
        "`fsync=always` with 50 producers at R = 3 ≥ 0.5× R = 1. The `always` sequential and "
        "pipelined rows are for reference (no target): the followers' fsync is in their "
        "answers' path.",
        "",
    ]
    out += process_table(res)
    out += where_the_time_goes(res)
    return "\n".join(out) + "\n"


# -- the run ----------------------------------------------------------------------------------


def meta(argv: list[str], place: Placement) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": bench._commit(),
        "source": bench._source(),
        "command": procs.shown([sys.executable, "loadtest/bench_replication.py", *argv]),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": bench._cpu_model(),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "uvloop": bench._version("uvloop"),
        "orjson": bench._version("orjson"),
        "loadavg": bench._loadavg(),
        "node_cmd": procs.shown(node_argv("a", Path("DIR/a"), "FSYNC")).replace(
            "--http-port 0", "--http-port FREE"),
        "placement": place.describe(),
        "followers": place.followers if place.enabled else "unpinned",
        "cpus": {cores: {**place.cpus(cores), "client": place.client} if place.enabled else {}
                 for cores in ("same", "split")},
    }


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Config]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", metavar="FILE", help="write the results into this Markdown file")
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile step")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument("--followers", choices=("split", "apart", "primary"), default="split",
                   help="one follower on each CPU (split, default), both on the CPU the "
                        "primary does not use (apart) or both on the primary's (see "
                        "Placement)")
    p.add_argument("--workloads", default="",
                   help="only these rows, comma-separated keys (pipe, seq, prod, seq-always, "
                        "pipe-always): for exploring; the section needs them all")
    p.add_argument("--dir", default=None, help="where the data directories go (default /tmp)")
    defaults = Config()
    for name, value in asdict(defaults).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=None,
                       help=f"default {value} ({QUICK.get(name, value)} with --quick)")
    args = p.parse_args(argv)
    cfg = Config(**{**asdict(defaults), **(QUICK if args.quick else {}),
                    **{k: v for k, v in vars(args).items() if k in asdict(defaults)
                       and v is not None}})
    return args, cfg


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


async def main_async(args: argparse.Namespace, cfg: Config, place: Placement
                     ) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="shardq-replication-", dir=args.dir))
    try:
        res = await measure(cfg, place, work)
        if not args.no_profile:
            res["profiles"] = await profile(cfg, place, work)
        return res
    finally:
        place.release()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, cfg = parse_args(argv)
    SELECTED.update(k for k in args.workloads.split(",") if k)
    signal.signal(signal.SIGTERM, _terminate)  # Members are stopped on SIGTERM too
    try:
        import uvloop
    except ImportError:
        _progress("uvloop not installed: the client runs on asyncio's own loop")
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    place = Placement(not args.no_pin, args.followers)
    m = meta(argv, place)
    res = asyncio.run(main_async(args, cfg, place))
    m["loadavg_end"] = bench._loadavg()
    m["round_loads"] = [r["loadavg"] for r in res["rounds"]]
    res = {"meta": m, "config": asdict(cfg), **res}
    print()
    print(terminal_table(res["rows"]))
    raw = json.dumps(res, indent=2, default=str) + "\n"
    (OUT_DIR / "replication.json").write_text(raw)
    body = section(res)
    if args.write:
        report.write_section(Path(args.write), "replication", body)
        _progress(f"wrote {args.write}")
    else:
        print()
        print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
