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
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import bench
import bench_cli as cli
import bench_client as C
import bench_procs as procs
import bench_report as report
from bench_replication_report import section, terminal_table
from bench_replication_shard import NAMES, OUT_DIR, Members, Placement, Probe, node_argv


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




# -- workloads ------------------------------------------------------------------------------


async def seq_push(cfg: Config, port: int, n: int) -> C.Measure:
    line = C.push_line("bench.seq", C.payload(cfg.payload_bytes))
    return await C.sequential_push(port, line, n, cfg.warm(n), cfg.cap_s)


async def pipe_push(cfg: Config, port: int, n: int) -> C.Measure:
    line = C.push_line("bench.pipe", C.payload(cfg.payload_bytes))
    return await C.pipelined_push(port, line, n, cfg.warm(n), cfg.window, cfg.cap_s)


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
    cli.progress(f"    R={members.r} {s.key:<12} {m.rate:>10,.0f} jobs/s"
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
                cli.progress(f"    note: exit codes {codes}")
    return out


async def measure(cfg: Config, place: Placement, work: Path) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    for n in range(cfg.rounds):
        load = bench._loadavg()
        cli.progress(f"round {n + 1}/{cfg.rounds} (load {load})")
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
    ("taking acks (incl. the commit and releasing answers)", "shipping.py", "_acked"),
    ("commit LSN (`advance`, every call)", "replication.py", "advance"),
    ("releasing held answers (`released`)", "runtime.py", "released"),
]
FOLLOWER_FUNCS = [
    ("the stream (`FollowerStream.feed`)", "following.py", "feed"),
    ("append + apply (`Follower.records`)", "following.py", "records"),
    ("applying (`Engine.apply`)", "engine.py", "apply"),
    ("acks", "following.py", "ack"),
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
        missing = [label for label, v in funcs.items() if not v["ncalls"]]
        if r > 1 and missing:  # a function renamed or moved: the breakdown would read 0%
            raise procs.ServerError(f"the R = {r} {role}'s profile has no calls of "
                                    f"{missing}: see PRIMARY_FUNCS and FOLLOWER_FUNCS")
        out[role] = {"total_tt": total, "top": top, "funcs": funcs,
                     "file": str(path.relative_to(procs.ROOT))}
    cli.progress(f"  profile R={r} {key}: {m.rate:,.0f} jobs/s under cProfile; primary CPU "
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
    return cli.parse_config(p, Config, QUICK, argv)


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
    cli.prepare_process()  # Members are stopped on SIGTERM too
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
    body = section(res, {s.key: s.count(cfg) for s in specs()})
    if args.write:
        report.write_section(Path(args.write), "replication", body)
        cli.progress(f"wrote {args.write}")
    else:
        print()
        print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
