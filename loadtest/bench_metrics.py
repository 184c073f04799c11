"""The cost of metrics on the hot path: the same node with metrics on and off, one run.

    .venv/bin/python loadtest/bench_metrics.py --write BENCHMARKS.md [--quick]

"On" is a node as shipped (per-command counters, wait/run histograms) with
``/metrics`` scraped every second during the run; "off" is ``--no-metrics``
and no scraping. Pipelined PUSH and PUSH→PULL→ACK, three alternating rounds;
the ratio on/off of the medians goes to the ``metrics`` section.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import bench_client as C
import bench_procs as procs
import bench_report as report

from shardq_operator.local import free_port


def node(log_dir: Path, tag: str, http_port: int, metrics: bool) -> procs.Server:
    argv = procs.node_argv()
    argv[argv.index("--http-port") + 1] = str(http_port)  # node_argv sets 0: serve /metrics
    if not metrics:
        argv.append("--no-metrics")
    return procs.Server(f"shardq {tag}", argv, procs._NODE_READY, log_dir / f"{tag}.log")


async def scrape(port: int, stop: asyncio.Event) -> int:
    n = 0
    while not stop.is_set():
        await asyncio.to_thread(lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=5).read())
        n += 1
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass
    return n


async def workloads(port: int, n_pipe: int, n_cycle: int) -> tuple[float, float]:
    conn = await C.connect(port)
    try:
        w = C.Windowed(conn, C.push_line("m", C.payload(200)), n_pipe, 1000, 60, C.check_ok)
        await C.run([w], 60)
        pipe = C.measured([w]).rate
        c = C.Cycle(conn, "m2", C.payload(200), n_cycle, 60)
        await C.run([c], 60)
        return pipe, C.measured([c]).rate
    finally:
        conn.close()


async def main_async(quick: bool) -> dict[str, list[float]]:
    log_dir = procs.ROOT / "build" / "bench" / "metrics"
    res: dict[str, list[float]] = {"on_pipe": [], "off_pipe": [], "on_cycle": [], "off_cycle": []}
    n_pipe, n_cycle = (30_000, 2_000) if quick else (150_000, 8_000)
    for _ in range(3):
        for on in (True, False):
            http = free_port()
            with node(log_dir, "on" if on else "off", http, on) as server:
                stop = asyncio.Event()
                scraper = asyncio.create_task(scrape(http, stop)) if on else None
                pipe, cycle = await workloads(server.port, n_pipe, n_cycle)
                stop.set()
                if scraper is not None:
                    await scraper
            key = "on" if on else "off"
            res[f"{key}_pipe"].append(pipe)
            res[f"{key}_cycle"].append(cycle)
            print(f"  metrics {key:<3} pipelined {pipe:>10,.0f}/s  cycle {cycle:>8,.0f}/s",
                  file=sys.stderr)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    res = asyncio.run(main_async(args.quick))
    med = {k: statistics.median(v) for k, v in res.items()}
    pipe, cycle = med["on_pipe"] / med["off_pipe"], med["on_cycle"] / med["off_cycle"]
    body = "\n".join([
        "## Metrics on vs off",
        "",
        f"_Written by `loadtest/bench_metrics.py`. {time.strftime('%Y-%m-%d %H:%M UTC')}. "
        "One node, memory only; \"on\" = as shipped with `/metrics` scraped every second, "
        "\"off\" = `--no-metrics`, not scraped; three alternating rounds, medians._",
        "",
        "| workload | metrics on | metrics off | on / off |",
        "|---|---:|---:|---:|",
        f"| pipelined PUSH (1,000 in flight) | {med['on_pipe']:,.0f}/s | {med['off_pipe']:,.0f}/s "
        f"| {pipe:.2f} |",
        f"| PUSH→PULL→ACK cycles | {med['on_cycle']:,.0f}/s | {med['off_cycle']:,.0f}/s | "
        f"{cycle:.2f} |",
        "",
        f"Target ≥ 0.95×: {'met' if min(pipe, cycle) >= 0.95 else 'missed'} "
        f"(worst {min(pipe, cycle):.2f}).",
    ])
    print(body)
    if args.write:
        report.write_section(Path(args.write), "metrics", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
