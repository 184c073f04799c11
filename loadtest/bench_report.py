"""Turning benchmark results into a terminal table and a BENCHMARKS.md section.

Each benchmark owns one section of BENCHMARKS.md, delimited by
``<!-- bench:NAME -->`` … ``<!-- /bench:NAME -->``; writing a section replaces
only the text between its markers (or appends the section), so other
benchmarks can keep theirs in the same file.

Must not: measure anything, or touch the file outside its own markers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FILE_HEADER = (
    "# Benchmarks\n\n"
    "Each section below is written by a benchmark script between its markers; "
    "`make bench` refreshes them. Edit outside the markers only.\n"
)

#: MagicQueue's README figures (Rust server, Node.js client, Apple Silicon Mac): context only.
MAGICQUEUE = {
    "seq": "15,949",
    "cycle": "5,848",
    "batch": "285,714 (100×100)",
    "conc": "74,074",
}
MAGICQUEUE_LATENCY = "min 34, p50 47, p95 71, p99 93, max 129 µs"


def num(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "—"
    return f"{v:,.{digits}f}"


def _lat(summary: dict[str, Any] | None, key: str) -> str:
    if not summary or "latency_us" not in summary:
        return "—"
    return num(summary["latency_us"][key])


def _floor_rate(row: dict[str, Any]) -> tuple[float | None, str]:
    if row.get("floor"):
        return row["floor"]["rate"], num(row["floor"]["rate"])
    return None, "—"


def ratio(row: dict[str, Any]) -> float | None:
    value = row.get("ratio")
    return None if value is None else float(value)


def _rounds(summary: dict[str, Any] | None) -> str:
    if not summary or len(summary.get("rounds", ())) < 2:
        return ""
    return "<br><sub>" + " · ".join(num(x) for x in summary["rounds"]) + "</sub>"


def _target(row: dict[str, Any]) -> str:
    t = row.get("target")
    if not t:
        return "—"
    return f"{t['text']}: **{'met' if t['met'] else 'missed'}**"


def _rate_cell(summary: dict[str, Any], unit: str) -> str:
    cell = f"**{num(summary['rate'])}** {unit}"
    if summary.get("capped"):
        cell += " (capped)"
    return cell + _rounds(summary)


# -- terminal ---------------------------------------------------------------------------------


def terminal_table(rows: list[dict[str, Any]]) -> str:
    head = ("workload", "shardq/s", "p50µs", "p99µs", "floor/s", "fl p50", "fl p99", "ratio",
            "per round", "target")
    lines = [head]
    for r in rows:
        _, floor = _floor_rate(r)
        rt = ratio(r)
        t = r.get("target")
        lines.append((
            r["title"], num(r["node"]["rate"]), _lat(r["node"], "p50"), _lat(r["node"], "p99"),
            floor, _lat(r.get("floor"), "p50"), _lat(r.get("floor"), "p99"),
            "—" if rt is None else f"{rt:.2f}",
            " ".join(f"{x:.2f}" for x in r.get("ratios", ())) or "—",
            "—" if not t else f"{t['text']} {'met' if t['met'] else 'MISSED'}",
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        out.append("  ".join(cells))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# -- markdown ---------------------------------------------------------------------------------


def node_section(res: dict[str, Any]) -> str:
    meta, cfg = res["meta"], res["config"]
    out = [
        "## Node vs. the loopback floor",
        "",
        "_Written by `loadtest/bench.py`. One shardq node (memory only) and a minimal "
        "uvloop+orjson line server (the **floor**: parse each line, answer "
        '`{"ok":true,"id":N}`) run as subprocesses on 127.0.0.1 and are driven by the same '
        "client (asyncio+uvloop, raw sockets, orjson) in one run; the ratio shardq/floor is "
        "the number to watch on a shared machine._",
        "",
        f"- **Date:** {meta['date']} · **commit:** `{meta['commit']}` · "
        f"**shardq from:** {meta['source']}",
        f"- **Command:** `{meta['command']}`",
        f"- **Machine:** {meta['nproc']} CPUs (nproc), {meta['cpu']}, Linux {meta['kernel']}; "
        f"Python {meta['python']}, uvloop {meta['uvloop']}, orjson {meta['orjson']}; "
        f"load average (1/5/15 min) at start {meta['loadavg']}, "
        f"at end {meta.get('loadavg_end', '?')}",
        f"- **Payload:** {cfg['payload_bytes']}-byte JSON `data` per job; PUSH line "
        f"{meta['push_line_bytes']} bytes, PUSHB line of {cfg['batch_size']} jobs "
        f"{num(meta['pushb_line_bytes'])} bytes",
        f"- **Node:** `{meta['node_cmd']}`",
        f"- **Floor:** `{meta['floor_cmd']}`",
        f"- **CPU placement:** {meta['placement']}. (Unpinned, the scheduler decides "
        "whether a round trip crosses CPUs; on this VM crossing adds tens of µs of wake-up "
        "to every round trip, for both targets alike.)",
        "- Every workload is warmed up on its connection(s) first "
        f"({cfg['warm_fraction']:.0%} of its count), then measured; "
        f"each stops at its count or after {cfg['cap_s']:.0f} s (marked *capped*).",
        f"- {cfg['rounds']} round(s): a fresh node per round, one floor throughout; in each "
        "round every workload runs on the node and on the floor back to back (which goes "
        "first alternates). Rates are the median round (each round's rate below it), "
        "latency percentiles pool all rounds, and **shardq/floor is the median of the "
        "per-round ratios**. The node keeps every pushed job, so within a round later "
        "workloads run against a node holding the earlier ones' jobs "
        "(up to ~" + f"{meta.get('jobs_per_round', 0):,} waiting jobs).",
        "",
        "| Workload | Count | shardq | p50 µs | p95 µs | p99 µs | floor | floor p50 µs "
        "| floor p99 µs | shardq/floor | Target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["workloads"]:
        _, floor = _floor_rate(r)
        floor += _rounds(r.get("floor"))
        rt = ratio(r)
        out.append(
            f"| {r['title']}<br><sub>{r['shape']}</sub> | {r['count']} "
            f"| {_rate_cell(r['node'], r['unit'])} | {_lat(r['node'], 'p50')} "
            f"| {_lat(r['node'], 'p95')} | {_lat(r['node'], 'p99')} | {floor} "
            f"| {_lat(r.get('floor'), 'p50')} | {_lat(r.get('floor'), 'p99')} "
            f"| {'—' if rt is None else f'{rt:.2f}'} | {_target(r)} |"
        )
    out += [
        "",
        "The floor has no queue: in PUSH→PULL→ACK it answers each of the same three lines "
        "with its short line (three round trips per cycle), and it answers a PUSHB line with "
        "one short line (the node answers with all the ids). At the "
        "pipelined and batch rates the floor is bounded by the client as much as by the "
        "floor server, so those ratios are upper bounds of the node's share.",
        "",
        "Targets: sequential PUSH ≥ 0.8× the floor's round-trip rate; pipelined PUSH ≥ "
        "100,000 jobs/s; batch PUSHB ≥ 150,000 jobs/s.",
        "",
        "For context only (another machine, language and client): MagicQueue's README "
        f"reports sequential PUSH {MAGICQUEUE['seq']}/s, PUSH→PULL→ACK "
        f"{MAGICQUEUE['cycle']} cycles/s, batch PUSH {MAGICQUEUE['batch']} jobs/s, "
        f"10 connections {MAGICQUEUE['conc']}/s; PUSH latency {MAGICQUEUE_LATENCY}.",
        "",
    ]
    out += _memory_md(res)
    out += _inproc_md(res)
    return "\n".join(out)


def _memory_md(res: dict[str, Any]) -> list[str]:
    mem = res.get("memory")
    if not mem:
        return []
    rss, tm = mem["rss"], mem["tracemalloc"]
    out = [
        "### Memory per waiting job",
        "",
        "| Measure | Jobs | Growth | Bytes per job |",
        "|---|---:|---:|---:|",
        f"| Node process VmRSS before/after pipelined PUSH into one queue (fresh node) "
        f"| {num(rss['jobs'])} | {num(rss['bytes'] / 2**20, 1)} MiB "
        f"| **{num(rss['bytes_per_job'])}** |",
        f"| `tracemalloc`, bare `Engine.push` as `commands.py` calls it "
        f"| {num(tm['jobs'])} | {num(tm['bytes'] / 2**20, 1)} MiB "
        f"| **{num(tm['bytes_per_job'])}** |",
        "",
        f"The stored payload is {tm['payload_len']} bytes of JSON "
        f"(`sys.getsizeof` {tm['payload_getsizeof']}). Where the traced bytes per job go "
        "(tracemalloc, top allocation sites):",
        "",
        "| Bytes per job | Site | Code |",
        "|---:|---|---|",
    ]
    for site in tm["sites"]:
        out.append(f"| {num(site['bytes_per_job'])} | `{site['where']}` | `{site['code']}` |")
    out.append("")
    return out


def _inproc_md(res: dict[str, Any]) -> list[str]:
    ip = res.get("inproc")
    if not ip:
        return []
    return [
        "### Ceilings without sockets (in the benchmark process, one core)",
        "",
        "| Path | jobs/s |",
        "|---|---:|",
        f"| `Engine.push`, one job per call | {num(ip['engine_push'])} |",
        f"| `Node.execute` on PUSH lines, {ip['chunk']} lines per flush (the TCP session's "
        f"loop without the socket) | {num(ip['execute_push'])} |",
        f"| `Node.execute` on PUSHB lines of {ip['batch_size']} jobs "
        f"| {num(ip['execute_pushb'])} |",
        "",
    ]


def profile_section(res: dict[str, Any]) -> str:
    meta = res["meta"]
    out = [
        "## Where the node spends its time (cProfile)",
        "",
        "_Written by `loadtest/bench.py --profile`: the node runs under `python -m cProfile` "
        "with its interpreted sources (`SHARDQ_PURE=1`: cProfile sees Python functions only; "
        "a compiled build's would be charged to their callers) "
        "(one fresh node per workload, stopped with SIGINT so the profile is written). "
        "Profiled throughput is not comparable to the table above. uvloop's loop is C code "
        "that cProfile does not see: its time (epoll, socket reads, idle time before and "
        "after the workload) is charged to `asyncio/runners.py(run)`, and `transport.write` "
        "to its caller (`Session.send`). Garbage collection is charged to whichever "
        "function allocated when a collection started, so it is timed separately "
        "(`loadtest/node_gcstats.py`, a `gc.callbacks` hook around the same CLI). "
        "Start-up (imports) is in the profile too._",
        "",
        f"- **Date:** {meta['date']} · **commit:** `{meta['commit']}` · "
        f"**command:** `{meta['command']}`",
        "",
    ]
    for p in res["profiles"]:
        out += [
            f"### {p['title']}",
            "",
            f"- Without the profiler: **{num(p['plain_rate'])} jobs/s**; over the node's "
            f"life (start-up, warm-up, workload) {p['plain_gc_text']}.",
            f"- Under cProfile: {num(p['rate'])} jobs/s, {p['jobs']:,} jobs in "
            f"{p['seconds']:.2f} s; {p['profiled_gc_text']}. Profile: `{p['file']}`.",
            "",
            f"Profile total {p['total_tt']:.2f} s of own time; top {len(p['top'])} by tottime:",
            "",
            "| tottime s | % | ncalls | cumtime s | function |",
            "|---:|---:|---:|---:|---|",
        ]
        for t in p["top"]:
            out.append(
                f"| {t['tottime']:.3f} | {t['pct']:.1f} | {t['ncalls']} | {t['cumtime']:.3f} "
                f"| `{t['func']}` |"
            )
        out.append("")
    return "\n".join(out)


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- bench:name -->`` markers."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else FILE_HEADER
    i = text.find(start)
    j = text.find(end, i + 1) if i >= 0 else -1
    if i >= 0 and j >= 0:
        text = text[:i] + block + text[j + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
