"""The replication benchmark's report: the terminal table and the ``replication`` section of
BENCHMARKS.md (rates, R = 3 against R = 1, per-process CPU, where the time goes).

Used by ``bench_replication.py``; reads its results, measures nothing. Must not: write
anything but the text it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import bench_report as report
from bench_replication_shard import NAMES

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
            "CPU-time clock, `loadtest/node_cpuprofile.py`, with the interpreted sources "
            "(`SHARDQ_PURE=1`: cProfile sees Python functions only; the rates above are of "
            "the compiled build): time preempted or idle in the "
            "event loop is charged to no function; the profiler's cost per call inflates "
            "call-heavy code such as `advance`, so read the shares, not absolute times.)")
    return out


def section(res: dict[str, Any], counts: dict[str, int]) -> str:
    """The ``replication`` section of BENCHMARKS.md; ``counts``: each row's job count."""
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
    for row in res["rows"]:
        count = counts[row["key"]]
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


