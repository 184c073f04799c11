"""The node benchmark: shardq against the loopback floor, one command, BENCHMARKS.md.

    .venv/bin/python loadtest/bench.py --write BENCHMARKS.md     # (make bench)
    .venv/bin/python loadtest/bench.py --quick                   # a few seconds, smoke run
    .venv/bin/python loadtest/bench.py --profile [--write ...]   # node under cProfile

Starts a shardq node (memory only) and the floor server (``floor_server.py``)
as subprocesses on free loopback ports, drives both with the same client
(``bench_client.py``) through the workloads of MagicQueue's README
(sequential PUSH, pipelined PUSH, batch PUSHB, PUSH→PULL→ACK, 10
connections) in ``--rounds`` rounds (a fresh node each, node and floor back
to back, CPUs pinned per workload: see ``Placement``), then measures memory
per waiting job (node RSS and tracemalloc on a bare Engine) and the
in-process ceilings, prints a table and writes the ``bench:node`` section of
BENCHMARKS.md (``--profile``: the ``bench:profile`` section). Raw results go
to build/bench/. Servers are stopped by PID at the end, also on error,
Ctrl-C or SIGTERM.

Must not: talk to anything but 127.0.0.1, stop processes it did not start,
or run unbounded (every workload stops at its count or its time cap).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import bench_cli as cli
import bench_client as C
import bench_procs as procs
import bench_report as report

OUT_DIR = procs.ROOT / "build" / "bench"


@dataclass
class Config:
    n_seq: int = 10_000
    n_pipe: int = 100_000
    window: int = 1000
    batch_size: int = 1000
    n_batches: int = 100
    batch_window: int = 1
    n_cycle: int = 5000
    n_conc: int = 10_000
    conns: int = 10
    payload_bytes: int = 200
    mem_jobs: int = 200_000
    inproc_jobs: int = 200_000
    cap_s: float = 60.0
    rounds: int = 3
    warm_fraction: float = 0.2

    def warm(self, n: int) -> int:
        return max(1, int(n * self.warm_fraction))


QUICK = {
    "n_seq": 1000, "n_pipe": 10_000, "n_batches": 10, "n_cycle": 500, "n_conc": 1000,
    "mem_jobs": 20_000, "inproc_jobs": 20_000, "cap_s": 10.0, "rounds": 1,
}

Workload = Callable[[Config, int, str], Awaitable[C.Measure]]


# -- workloads (one target each call: "node" or "floor") --------------------------------------


def _data(cfg: Config) -> dict[str, object]:
    return C.payload(cfg.payload_bytes)


async def seq_push(cfg: Config, port: int, target: str) -> C.Measure:
    line = C.push_line("bench.seq", _data(cfg))
    return await C.sequential_push(port, line, cfg.n_seq, cfg.warm(cfg.n_seq), cfg.cap_s)


async def pipe_push(cfg: Config, port: int, target: str) -> C.Measure:
    line = C.push_line("bench.pipe", _data(cfg))
    return await C.pipelined_push(port, line, cfg.n_pipe, cfg.warm(cfg.n_pipe), cfg.window,
                                  cfg.cap_s)


async def batch_push(cfg: Config, port: int, target: str) -> C.Measure:
    conn = await C.connect(port)
    try:
        line = C.pushb_line("bench.batch", _data(cfg), cfg.batch_size)
        check = C.check_ids(cfg.batch_size) if target == "node" else C.check_ok
        warm = C.Windowed(conn, line, cfg.warm(cfg.n_batches), cfg.batch_window, cfg.cap_s, check)
        await C.run([warm], cfg.cap_s)
        w = C.Windowed(conn, line, cfg.n_batches, cfg.batch_window, cfg.cap_s, check)
        await C.run([w], cfg.cap_s)
        return C.measured([w], per_unit=cfg.batch_size)
    finally:
        conn.close()


async def cycle(cfg: Config, port: int, target: str) -> C.Measure:
    conn = await C.connect(port)
    try:
        data = _data(cfg)
        await C.run([C.Cycle(conn, "bench.cycle", data, cfg.warm(cfg.n_cycle), cfg.cap_s)],
                    cfg.cap_s)
        w = C.Cycle(conn, "bench.cycle", data, cfg.n_cycle, cfg.cap_s)
        await C.run([w], cfg.cap_s)
        return C.measured([w])
    finally:
        conn.close()


async def concurrent(cfg: Config, port: int, target: str) -> C.Measure:
    conns = [await C.connect(port) for _ in range(cfg.conns)]
    try:
        line = C.push_line("bench.conc", _data(cfg))
        per = cfg.n_conc // cfg.conns
        await C.run([C.Sequential(c, line, cfg.warm(per), cfg.cap_s, C.check_ok) for c in conns],
                    cfg.cap_s)
        ws = [C.Sequential(c, line, per, cfg.cap_s, C.check_ok) for c in conns]
        await C.run(list(ws), cfg.cap_s)
        return C.measured(list(ws))
    finally:
        for c in conns:
            c.close()


@dataclass
class Spec:
    key: str
    title: str
    shape: str
    count: str
    unit: str
    fn: Workload
    cores: str  # "same": client and server share a CPU; "split": one CPU each


def specs(cfg: Config) -> list[Spec]:
    return [
        Spec("seq", "Sequential PUSH", "1 connection, 1 request in flight",
             f"{cfg.n_seq:,}", "jobs/s", seq_push, "same"),
        Spec("pipe", "Pipelined PUSH", f"1 connection, {cfg.window:,} requests in flight",
             f"{cfg.n_pipe:,}", "jobs/s", pipe_push, "split"),
        Spec("batch", f"Batch PUSHB of {cfg.batch_size:,}",
             f"1 connection, {cfg.batch_window} line(s) in flight",
             f"{cfg.n_batches:,}×{cfg.batch_size:,}", "jobs/s", batch_push, "split"),
        Spec("cycle", "PUSH→PULL→ACK", "1 connection, 1 request in flight",
             f"{cfg.n_cycle:,} cycles", "cycles/s", cycle, "same"),
        Spec("conc", f"Concurrent, {cfg.conns} connections",
             f"{cfg.conns} × sequential PUSH", f"{cfg.n_conc:,}", "jobs/s", concurrent,
             "split"),
    ]


def _target(key: str, node_rate: float, ratio: float) -> dict[str, Any] | None:
    if key == "seq":
        return {"text": "≥ 0.8× floor", "met": ratio >= 0.8}
    if key == "pipe":
        return {"text": "≥ 100,000 jobs/s", "met": node_rate >= 100_000}
    if key == "batch":
        return {"text": "≥ 150,000 jobs/s", "met": node_rate >= 150_000}
    return None


Rounds = list[dict[str, dict[str, C.Measure]]]  # per round: workload key -> target -> Measure


class Placement:
    """Which CPU the client and the server under test run on, per workload.

    On this kind of VM a round trip between processes on two CPUs pays a
    cross-CPU wake-up (tens of µs, for both targets alike), and whether it is
    paid depends on where the scheduler happens to put the processes. So the
    one-request-in-flight workloads run client and server on the same CPU, and
    the throughput workloads give each its own CPU. ``--no-pin`` leaves it to
    the scheduler.
    """

    def __init__(self, enabled: bool) -> None:
        self.all = os.sched_getaffinity(0)
        cpus = sorted(self.all)
        self.enabled = enabled and len(cpus) >= 2
        self.client, self.server = (cpus[0], cpus[1]) if self.enabled else (-1, -1)

    def describe(self) -> str:
        if not self.enabled:
            return "not pinned (the scheduler places client and servers)"
        return (f"one request in flight: client and server both on CPU {self.client}; "
                f"throughput workloads: client on CPU {self.client}, server on CPU "
                f"{self.server}")

    def apply(self, cores: str, server: procs.Server) -> None:
        if not self.enabled:
            return
        os.sched_setaffinity(0, {self.client})
        server.pin({self.client} if cores == "same" else {self.server})

    def release(self) -> None:
        os.sched_setaffinity(0, self.all)


async def run_round(
    cfg: Config, servers: dict[str, procs.Server], place: Placement, n: int
) -> dict[str, dict[str, C.Measure]]:
    """Every workload once on each target, node and floor back to back (order alternates)."""
    out: dict[str, dict[str, C.Measure]] = {}
    for s in specs(cfg):
        out[s.key] = {}
        for target in ("node", "floor") if n % 2 == 0 else ("floor", "node"):
            place.apply(s.cores, servers[target])
            m = await s.fn(cfg, servers[target].port, target)
            out[s.key][target] = m
            cli.progress(f"round {n + 1} {s.title:<26} {target:<5} {m.rate:>12,.0f} {s.unit}"
                      + (f"  p50 {m.pct_us(0.5):,.0f} µs" if m.latencies_ns else ""))
    place.release()
    return out


def _combine(ms: list[C.Measure]) -> dict[str, Any]:
    """Rate: the median round; latencies: all rounds pooled; every round's rate kept."""
    pooled = C.Measure(
        jobs=sum(m.jobs for m in ms), seconds=sum(m.seconds for m in ms),
        latencies_ns=[x for m in ms for x in m.latencies_ns], capped=any(m.capped for m in ms),
    )
    out = pooled.summary()
    out["rate"] = round(statistics.median(m.rate for m in ms), 1)
    out["rounds"] = [round(m.rate, 1) for m in ms]
    return out


def summarize(cfg: Config, rounds: Rounds) -> list[dict[str, Any]]:
    """One row per workload; the ratio is the median of the per-round ratios."""
    rows = []
    for s in specs(cfg):
        per = [r[s.key] for r in rounds]
        row: dict[str, Any] = {
            "key": s.key, "title": s.title, "shape": s.shape, "count": s.count, "unit": s.unit,
            "node": _combine([p["node"] for p in per]),
        }
        row["floor"] = _combine([p["floor"] for p in per])
        ratios = [p["node"].rate / p["floor"].rate for p in per]
        row["ratio"] = statistics.median(ratios)
        row["ratios"] = [round(x, 3) for x in ratios]
        row["target"] = _target(s.key, row["node"]["rate"], row["ratio"])
        rows.append(row)
    return rows


# -- memory -------------------------------------------------------------------------------------


async def _rss_workload(cfg: Config, server: procs.Server) -> dict[str, Any]:
    conn = await C.connect(server.port)
    try:
        data = _data(cfg)
        warm = C.Windowed(conn, C.push_line("bench.mem-warm", data), 2000, cfg.window,
                          cfg.cap_s, C.check_ok)
        await C.run([warm], cfg.cap_s)
        await asyncio.sleep(0.3)
        before = server.rss_bytes()
        w = C.Windowed(conn, C.push_line("bench.mem", data), cfg.mem_jobs, cfg.window,
                       cfg.cap_s, C.check_ok)
        await C.run([w], cfg.cap_s)
        await asyncio.sleep(0.3)
        after = server.rss_bytes()
        return {
            "jobs": w.got, "before": before, "after": after, "bytes": after - before,
            "bytes_per_job": (after - before) / max(1, w.got), "capped": w.capped,
        }
    finally:
        conn.close()


def memory(cfg: Config) -> dict[str, Any]:
    import bench_inproc

    with procs.node(OUT_DIR, "node-mem") as server:
        rss = asyncio.run(_rss_workload(cfg, server))
    cli.progress(f"memory: node RSS {rss['bytes_per_job']:,.0f} bytes/job "
              f"({rss['jobs']:,} jobs, {rss['bytes'] / 2**20:,.1f} MiB)")
    tm = bench_inproc.engine_memory(_data(cfg), cfg.mem_jobs)
    cli.progress(f"memory: tracemalloc {tm['bytes_per_job']:,.0f} bytes/job")
    return {"rss": rss, "tracemalloc": tm}


def inproc(cfg: Config) -> dict[str, Any]:
    import bench_inproc

    data = _data(cfg)
    n = cfg.inproc_jobs
    out = {
        "chunk": cfg.window, "batch_size": cfg.batch_size,
        "engine_push": bench_inproc.engine_rate(data, n),
        "execute_push": bench_inproc.execute_rate(C.push_line("q", data), n, cfg.window),
        "execute_pushb": bench_inproc.execute_rate(
            C.pushb_line("q", data, cfg.batch_size), max(1, n // cfg.batch_size), 1,
            jobs_per_line=cfg.batch_size),
    }
    cli.progress("in-process: " + ", ".join(
        f"{k} {v:,.0f}/s" for k, v in out.items() if isinstance(v, float)))
    return out


# -- profile ------------------------------------------------------------------------------------


def top_functions(path: Path, n: int) -> tuple[float, list[dict[str, Any]]]:
    st = pstats.Stats(str(path))
    raw: dict[Any, Any] = st.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    rows = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    top = []
    for func, (cc, nc, tt, ct, _callers) in rows:
        name = pstats.func_std_string(func)
        prefixes = (str(procs.ROOT) + "/", _package_root(), f"{sys.base_prefix}/lib/",
                    f"{sys.prefix}/lib/")
        for prefix in prefixes:
            name = name.replace(prefix, "")
        top.append({
            "tottime": tt, "pct": 100 * tt / total if total else 0.0, "cumtime": ct,
            "ncalls": str(nc) if nc == cc else f"{nc}/{cc}", "func": name,
        })
    return total, top


def _gc_line(gc: dict[str, Any] | None) -> str:
    if not gc:
        return "no GC statistics"
    n, sec = gc["collections"], gc["seconds"]
    return (f"GC {sum(sec):.2f} s of {gc['cpu_seconds']:.2f} s node CPU "
            f"({100 * sum(sec) / max(gc['cpu_seconds'], 1e-9):.0f}%; collections gen0/1/2 "
            f"{n[0]}/{n[1]}/{n[2]} took {sec[0]:.2f}/{sec[1]:.2f}/{sec[2]:.2f} s)")


def _profiled_run(
    cfg: Config, place: Placement, key: str, fn: Workload, prof: Path | None, cores: str
) -> tuple[C.Measure, dict[str, Any] | None]:
    """One fresh node (through node_gcstats.py, under cProfile if ``prof``), one workload,
    placed as the node table places it (``cores``)."""
    tag = f"node-{'profile' if prof else 'gcstats'}-{key}"
    server = procs.node(OUT_DIR, tag, profile_to=prof, gcstats=True)
    with server:
        place.apply(cores, server)
        m = asyncio.run(fn(cfg, server.port, "node"))
        place.release()
    code = server.stop()
    if code != 0 or (prof is not None and (not prof.exists() or prof.stat().st_size == 0)):
        raise procs.ServerError(f"{tag}: exit {code}, profile {prof}:\n{server.tail()}")
    return m, procs.gc_stats(server)


def profile(cfg: Config, place: Placement) -> list[dict[str, Any]]:
    """Pipelined PUSH, PUSHB and PUSH→PULL→ACK: once plain (rate, GC time), once under
    cProfile."""
    out = []
    for key, title, fn, cores in (
            ("pipe", "Pipelined PUSH", pipe_push, "split"),
            ("batch", f"Batch PUSHB of {cfg.batch_size:,}", batch_push, "split"),
            ("cycle", "PUSH→PULL→ACK, one request in flight", cycle, "same")):
        plain, plain_gc = _profiled_run(cfg, place, key, fn, None, cores)
        prof = OUT_DIR / f"profile-{key}.prof"
        prof.unlink(missing_ok=True)
        m, prof_gc = _profiled_run(cfg, place, key, fn, prof, cores)
        total, top = top_functions(prof, 25)
        out.append({
            "key": key, "title": title, "rate": m.rate, "jobs": m.jobs, "seconds": m.seconds,
            "total_tt": total, "top": top, "file": str(prof.relative_to(procs.ROOT)),
            "plain_rate": plain.rate, "plain_gc": plain_gc, "profiled_gc": prof_gc,
            "plain_gc_text": _gc_line(plain_gc), "profiled_gc_text": _gc_line(prof_gc),
        })
        print(f"\n== {title}: {plain.rate:,.0f} jobs/s without the profiler; "
              f"{_gc_line(plain_gc)} over the node's life")
        print(f"   under cProfile {m.rate:,.0f} jobs/s ({m.jobs:,} jobs, {m.seconds:.2f} s); "
              f"profile {prof.relative_to(procs.ROOT)}, total own time {total:.2f} s")
        print(f"{'tottime':>8} {'%':>5} {'ncalls':>12} {'cumtime':>8}  function")
        for t in top:
            print(f"{t['tottime']:8.3f} {t['pct']:5.1f} {t['ncalls']:>12} {t['cumtime']:8.3f}  "
                  f"{t['func']}")
    return out


# -- the run ------------------------------------------------------------------------------------




def _version(mod: str) -> str:
    try:
        return str(__import__(mod).__version__)
    except (ImportError, AttributeError):
        return "not installed"


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=procs.ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=procs.ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha} + uncommitted changes" if dirty else sha or "unknown"


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _source() -> str:
    """Where shardq is imported from (PYTHONPATH can point the node at another tree)."""
    import shardq

    where = Path(shardq.__file__).absolute().parent
    if where.resolve().is_relative_to(procs.ROOT):
        return "the working tree"
    return f"`{where}` (PYTHONPATH)"


def _package_root() -> str:
    import shardq

    return str(Path(shardq.__file__).absolute().parent.parent) + "/"


def meta(cfg: Config, argv: list[str]) -> dict[str, Any]:
    data = _data(cfg)
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "source": _source(),
        "command": procs.shown([sys.executable, "loadtest/bench.py", *argv]),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": _version("uvloop"),
        "orjson": _version("orjson"),
        "loadavg": _loadavg(),
        "jobs_per_round": int((cfg.n_seq + cfg.n_pipe + cfg.n_batches * cfg.batch_size
                               + cfg.n_conc) * (1 + cfg.warm_fraction)),
        "push_line_bytes": len(C.push_line("bench.seq", data)),
        "pushb_line_bytes": len(C.pushb_line("bench.batch", data, cfg.batch_size)),
        "node_cmd": procs.shown(procs.node_argv()),
        "floor_cmd": procs.shown(procs.floor(OUT_DIR).argv),
    }


def full(cfg: Config, place: Placement) -> dict[str, Any]:
    """The workloads, ``rounds`` times: one floor throughout, a fresh node per round."""
    rounds: Rounds = []
    with procs.floor(OUT_DIR) as floor:
        cli.progress(f"floor pid {floor.pid} port {floor.port}")
        for n in range(cfg.rounds):
            with procs.node(OUT_DIR, f"node-round{n + 1}") as node:
                cli.progress(f"round {n + 1}: node pid {node.pid} port {node.port}")
                servers = {"node": node, "floor": floor}
                rounds.append(asyncio.run(run_round(cfg, servers, place, n)))
                rss = node.rss_bytes()
            cli.progress(f"round {n + 1}: node RSS at the end {rss / 2**20:,.0f} MiB")
    return {"workloads": summarize(cfg, rounds), "memory": memory(cfg), "inproc": inproc(cfg)}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Config]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", metavar="FILE", help="write the results into this Markdown file")
    p.add_argument("--json", metavar="FILE",
                   help="also write the raw results here (always: build/bench/node.json "
                   "or profile.json)")
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    p.add_argument("--profile", action="store_true",
                   help="only profile the node (cProfile) under pipelined PUSH, PUSHB and "
                        "PUSH→PULL→ACK")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin client and servers to CPUs (see Placement)")
    return cli.parse_config(p, Config, QUICK, argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, cfg = parse_args(argv)
    cli.prepare_process()  # stop the servers on SIGTERM too
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    place = Placement(not args.no_pin)
    res: dict[str, Any] = {"meta": meta(cfg, argv), "config": asdict(cfg)}
    res["meta"]["placement"] = place.describe()
    if args.profile:
        res["profiles"] = profile(cfg, place)
    else:
        res.update(full(cfg, place))
        res["meta"]["loadavg_end"] = _loadavg()
        print()
        print(report.terminal_table(res["workloads"]))
        rss, tm = res["memory"]["rss"], res["memory"]["tracemalloc"]
        print(f"\nmemory per waiting {cfg.payload_bytes}-byte job: node RSS "
              f"{rss['bytes_per_job']:,.0f} B ({rss['jobs']:,} jobs), tracemalloc Engine "
              f"{tm['bytes_per_job']:,.0f} B ({tm['jobs']:,} jobs)")
    raw = json.dumps(res, indent=2, default=str) + "\n"
    (OUT_DIR / ("profile.json" if args.profile else "node.json")).write_text(raw)
    if args.json:
        Path(args.json).write_text(raw)
    if args.write:
        path = Path(args.write)
        if args.profile:
            report.write_section(path, "profile", report.profile_section(res))
        else:
            report.write_section(path, "node", report.node_section(res))
        cli.progress(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
