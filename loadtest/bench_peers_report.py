"""The peers benchmark's report: shardq against Redis, BullMQ and beanstalkd, as the
``peers`` section of BENCHMARKS.md (rates, latencies, shardq's ratio to the best peer).

Used by ``bench_peers.py``; reads its results, measures nothing. Must not: write anything
but the text it returns.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from shardq import native

HERE = Path(__file__).resolve().parent

ROWS = [
    ("sequential", "Sequential push (1 in flight)"),
    ("pipelined", "Pipelined push (1,000 in flight)"),
    ("batch", "Batch push of 1,000"),
    ("cycle", "Push → pull → ack, one at a time"),
    ("concurrent10", "10 concurrent producers"),
    ("concurrent50", "50 concurrent producers"),
    ("always50", "fsync every write, 50 producers <sub>median of 3 rounds</sub>"),
    ("drain", "Worker draining 100k jobs (concurrency 50)"),
    ("drain_prefetch", "… the SDK worker with `prefetch=50` (BullMQ: the row above)"),
]
#: rows whose peers' figure is another row's (BullMQ has no prefetch setting)
PEER_KEY = {"drain_prefetch": "drain"}


def _cell(m: dict[str, Any] | None) -> str:
    if not m:
        return "—"
    lat = m.get("latency_us") or {}
    extra = f" <sub>p50 {lat['p50']:,.0f} / p99 {lat['p99']:,.0f} µs</sub>" if lat else ""
    if "p50_us" in m and m["p50_us"] is not None:
        extra = f" <sub>p50 {m['p50_us']:,.0f} / p99 {m['p99_us']:,.0f} µs</sub>"
    return f"{m['rate']:,.0f}{extra}"


def _rate(res: dict[str, Any], target: str, key: str) -> float | None:
    m = (res.get(target) or {}).get(key)
    return float(m["rate"]) if m and m.get("rate") else None


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "—"


# (what, shardq's figure, the peer's figure or None for an absolute target, the bound);
# every bound is "at least" except memory's, which is "at most"
def targets(res: dict[str, Any]) -> list[tuple[str, float | None, float | None, float]]:
    r = res
    s = lambda key: _rate(r, "shardq", key)  # noqa: E731
    mem_s, mem_r = r["shardq"]["memory_per_job"], r["Redis"]["memory_per_job"]
    return [
        ("sequential push ÷ the loopback floor", s("sequential"), _rate(r, "floor", "sequential"),
         0.9),
        ("sequential push ÷ Redis LPUSH", s("sequential"), _rate(r, "Redis", "sequential"), 0.7),
        ("pipelined push ÷ Redis pipelined LPUSH", s("pipelined"),
         _rate(r, "Redis", "pipelined"), 0.5),
        ("batch push of 1,000 (jobs/s)", s("batch"), None, 300_000),
        ("fsync every write, 50 producers ÷ Redis appendfsync always", s("always50"),
         _rate(r, "Redis", "always50"), 0.5),
        ("push → pull → ack ÷ Redis LPUSH+LMOVE+LREM", s("cycle"), _rate(r, "Redis", "cycle"),
         1.0),
        ("push → pull → ack ÷ beanstalkd put+reserve+delete", s("cycle"),
         _rate(r, "beanstalkd", "cycle"), 1.0),
        ("SDK worker draining 100k ÷ BullMQ worker", s("drain"), _rate(r, "BullMQ", "drain"), 3.0),
        ("SDK worker with prefetch=50 draining 100k ÷ BullMQ worker", s("drain_prefetch"),
         _rate(r, "BullMQ", "drain"), 3.0),
        ("through the gateway ÷ direct, pipelined push", _rate(r, "gateway", "pipelined"),
         s("pipelined"), 0.7),
        ("memory per waiting 200-byte job (bytes) ÷ Redis", mem_s, mem_r, 2.0),
    ]


def section(res: dict[str, Any], command: str, meta: str, placement: str) -> str:
    peers = ["Redis", "beanstalkd", "BullMQ"]
    out = [
        "## shardq vs Redis, beanstalkd and BullMQ",
        "",
        f"_Written by `loadtest/bench_peers.py`. Command: `{command}`. {meta}. CPU placement: "
        f"{placement}. Loopback, one target at a time; durability comparable: shardq "
        "`--fsync everysec` (its WAL), Redis "
        "AOF `appendfsync everysec`, beanstalkd binlog fsynced at most every second, BullMQ on "
        "that Redis. **shardq node**: one node; **shardq cluster**: 3 nodes behind a gateway, "
        "the client talks to the gateway (all compiled); **node, interpreted**: the same node "
        "with `SHARDQ_PURE=1`; **floor**: a minimal uvloop line server that parses "
        "each line and answers a short one (loadtest/floor_server.py). Rates in jobs/s "
        "(cycles/s for push → pull → ack). BullMQ's figures come from its own Node.js client "
        "(no Python client exists), the others from one Python client (loadtest/"
        "bench_client.py), so every ratio but BullMQ's compares servers under the same "
        "client._",
        "",
        "| workload | shardq node | node, interpreted | shardq cluster | Redis | beanstalkd "
        "| BullMQ (Node) | floor | node ÷ Redis | node ÷ beanstalkd | node ÷ BullMQ "
        "| node ÷ floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, title in ROWS:
        s = (res["shardq"] or {}).get(key)
        cells = [_cell((res.get(p) or {}).get(key))
                 for p in ["shardq_pure", "gateway", *peers, "floor"]]
        ratios = [_ratio(_rate(res, "shardq", key), _rate(res, p, PEER_KEY.get(key, key)))
                  for p in [*peers, "floor"]]
        out.append(f"| {title} | {_cell(s)} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    mem_s, mem_r = res["shardq"]["memory_per_job"], res["Redis"]["memory_per_job"]
    out += [
        "",
        f"**Memory per waiting 200-byte job** (RSS growth of the server): shardq "
        f"**{mem_s:,.0f} B**, Redis (a list element) **{mem_r:,.0f} B**: "
        f"**{mem_s / mem_r:.2f}×** Redis (interpreted: "
        f"**{res['shardq_pure']['memory_per_job']:,.0f} B**).",
        "",
        *targets18(res),
        "",
        "### Targets (issue 10), the compiled node",
        "",
        "| target | shardq | peer | ratio | bound | |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for what, mine, peer, least in targets(res):
        if mine is None:
            out.append(f"| {what} | — | — | — | {least:g} | not measured |")
            continue
        at_most = what.startswith("memory")
        value = mine / peer if peer else mine
        shown = f"{value:.2f}" if peer else f"{value:,.0f}"
        met = value <= least if at_most else value >= least
        bound = f"{'≤' if at_most else '≥'} {least:,g}"
        out.append(f"| {what} | {mine:,.0f} | {f'{peer:,.0f}' if peer else '—'} | {shown} | "
                   f"{bound} | {'**met**' if met else '**missed**'} |")
    return "\n".join(out)


def versions() -> str:
    """The peers' versions, for the section's first line."""
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, timeout=10).stdout.decode()
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return out.strip().splitlines()[0] if out.strip() else "?"

    redis_v = re.search(r"v=([\d.]+)", first_line(["redis-server", "--version"]))
    node_v = first_line(["node", "--version"])
    bull = "?"
    pkg = HERE / "bullmq" / "node_modules" / "bullmq" / "package.json"
    if pkg.exists():
        bull = orjson.loads(pkg.read_bytes())["version"]
    bean = first_line(["beanstalkd", "-v"])
    return (f"redis-server {redis_v[1] if redis_v else '?'}, {bean}, BullMQ {bull} on Node "
            f"{node_v}, Python {sys.version.split()[0]}")


#: issue 18's targets: (what, shardq's key, the peer and its key or None, the bound, the
#: figure before the compiled hot path); every bound is "at least" but memory's
ISSUE18: list[tuple[str, str, tuple[str, str] | None, float, str]] = [
    ("sequential push ÷ the loopback floor", "sequential", ("floor", "sequential"), 0.9,
     "0.53×"),
    ("sequential push ÷ Redis LPUSH", "sequential", ("Redis", "sequential"), 0.8, "0.47×"),
    ("pipelined push ÷ Redis pipelined LPUSH", "pipelined", ("Redis", "pipelined"), 0.5,
     "0.15×"),
    ("batch push of 1,000 (jobs/s)", "batch", None, 1_000_000, "323,219"),
    ("push → pull → ack ÷ beanstalkd put+reserve+delete", "cycle", ("beanstalkd", "cycle"),
     1.0, "0.49×"),
    ("fsync always, 50 producers ÷ Redis appendfsync always", "always50",
     ("Redis", "always50"), 0.5, "0.22×"),
    ("SDK worker draining 100k ÷ BullMQ worker, without prefetch", "drain",
     ("BullMQ", "drain"), 5.0, "3.07×"),
    ("memory per waiting 200-byte job ÷ Redis list element", "memory_per_job",
     ("Redis", "memory_per_job"), 1.5, "2.42×"),
]
#: issue 18's targets another benchmark measures: what ``make bench`` ran before this one
#: left its figures here (bench_scale.py --write, bench_replication.py)
SCALE_SUMMARY = HERE.parent / "build" / "bench" / "scale-{mode}.json"
REPLICATION_RESULT = HERE.parent / "build" / "bench" / "replication" / "replication.json"


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data


def _verdict(met: bool) -> str:
    return "**met**" if met else "**missed**"


def elsewhere18() -> list[str]:
    """The rows of issue 18's table that bench_scale.py (compiled and interpreted) and
    bench_replication.py (compiled) measure, from the files their last ``--write`` left;
    a benchmark that has not run says so and where to run it."""
    scale = {mode: _load(Path(str(SCALE_SUMMARY).format(mode=mode)))
             for mode in ("compiled", "interpreted")}
    rows = []
    if any(scale.values()):
        cells, verdicts, dates = [], [], []
        for data in scale.values():
            if data is None:
                cells.append("—")
                verdicts.append("not measured")
                continue
            r = data["ratios"]
            cells.append(f"**{data['worst']:.2f}×**<br><sub>push {r['push']:.2f} · pull "
                         f"{r['pull']:.2f} · ack {r['ack']:.2f}</sub>")
            verdicts.append(_verdict(data["worst"] >= 0.8))
            dates.append(data["date"][11:16])
        sizes = next(d for d in scale.values() if d)["sizes"]
        rows.append(f"| rates at {sizes[1]:,} waiting jobs ÷ at {sizes[0]:,} (lowest of push, "
                    f"pull, ack) | — | {' | '.join(cells)} | bench_scale.py, "
                    f"{' and '.join(dates)} UTC | ≥ 0.8 | {' | '.join(verdicts)} |")
        cells, verdicts = [], []
        for data in scale.values():
            if data is None:
                cells.append("—")
                verdicts.append("not measured")
                continue
            cells.append(f"**{data['snapshot_s_per_m']:.2f} s**<br><sub>from the log "
                         f"{data['log_s_per_m']:.2f} s</sub>")
            verdicts.append(_verdict(data["snapshot_s_per_m"] <= 1.0))
        rows.append(f"| recovery from a snapshot, per million jobs | 4.5 s | "
                    f"{' | '.join(cells)} | bench_scale.py | ≤ 1 s | {' | '.join(verdicts)} |")
    else:
        rows += ["| rates at 10 M waiting jobs ÷ at 10 k | — | — | — | — | ≥ 0.8 | not measured: "
                 "`loadtest/bench_scale.py --write BENCHMARKS.md` | |",
                 "| recovery from a snapshot, per million jobs | 4.5 s | — | — | — | ≤ 1 s | not "
                 "measured: `loadtest/bench_scale.py --write BENCHMARKS.md` | |"]
    repl = _load(REPLICATION_RESULT)
    rates = [r for r in (repl or {}).get("rows", []) if r["measure"] == "rate"]
    if repl is not None and rates:
        worst = min(r["value"] for r in rates)
        parts = " · ".join(f"{r['title'].lower()} ({r['fsync']}) {r['value']:.2f}" for r in rates)
        rows.append(f"| the rates above at R = 3 ÷ R = 1 (lowest) | — | **{worst:.2f}×**<br>"
                    f"<sub>{parts}</sub> | — | bench_replication.py, "
                    f"{repl['meta']['date'][11:16]} UTC | ≥ 0.6× | {_verdict(worst >= 0.6)} | "
                    f"not measured |")
    else:
        rows.append("| the rates above at R = 3 ÷ R = 1 | — | — | — | — | ≥ 0.6× | not measured: "
                    "`loadtest/bench_replication.py --write BENCHMARKS.md` | |")
    return rows


def _figure(res: dict[str, Any], target: str, key: str) -> float | None:
    if key == "memory_per_job":
        v = (res.get(target) or {}).get(key)
        return float(v) if v else None
    return _rate(res, target, key)


def targets18(res: dict[str, Any]) -> list[str]:
    """The table of issue 18's targets: the compiled node and its interpreted sources side
    by side, each against the same peer figure of the same run."""
    out = [
        "### Targets (issue 18): compiled and interpreted",
        "",
        f"The node as built by `scripts/build_native.py` ({native.status().describe()} in the "
        "benchmark's process) and the same node with `SHARDQ_PURE=1` (its interpreted "
        "sources) in this run, in the order compiled, interpreted, interpreted, compiled (a "
        "fresh node each; each figure is the mean of its two rounds; the fsync row: the "
        "median of three), the same client and CPU placement; the SDK worker's drain runs "
        "compiled or interpreted like its node. Each cell: the ratio to the peer (shardq's "
        "figure below it).",
        "",
        "| target | before | compiled | interpreted | peer | bound | compiled | interpreted |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for what, key, peer, bound, before in ISSUE18:
        peer_v = _figure(res, *peer) if peer else None
        at_most = key == "memory_per_job"
        cells, verdicts = [], []
        for name in ("shardq", "shardq_pure"):
            mine = _figure(res, name, key)
            if mine is None or (peer and not peer_v):
                cells.append("—")
                verdicts.append("not measured")
                continue
            value = mine / peer_v if peer_v else mine
            met = value <= bound if at_most else value >= bound
            cells.append(f"**{value:.2f}×**<br><sub>{mine:,.0f}</sub>" if peer_v
                         else f"**{value:,.0f}**")
            verdicts.append("**met**" if met else "**missed**")
        peer_cell = f"{peer_v:,.0f}" if peer_v else "—"
        out.append(f"| {what} | {before} | {' | '.join(cells)} | {peer_cell} | "
                   f"{'≤' if at_most else '≥'} {bound:,g}{'' if peer is None else '×'} | "
                   f"{' | '.join(verdicts)} |")
    return out + elsewhere18()


