"""Cost that does not grow with the work: a node holding 10 thousand to 10 million waiting jobs.

    .venv/bin/python loadtest/bench_scale.py --write BENCHMARKS.md [--quick]

In one run, in this process (no sockets: the node's own work, so sizes compare
on a busy machine):

* **Rates with N waiting jobs** (per CPU second of this process). A ``Node``
  (memory only) is filled with N waiting 200-byte jobs in one queue
  (``Engine.push`` of 1,000), then runs request lines as a TCP session does
  (``Node.execute``, the journal flushed every 100 lines): PUSH to that
  queue, PULL from it (its oldest jobs) and ACK of what was pulled. The nodes
  of all sizes are filled first; then each round runs the three phases on
  every node in turn (the order alternating), so a machine that gets busier
  meanwhile weighs on every size alike; the best of ``--rounds`` counts (the
  round the machine's other work disturbed least).
  N = 10 thousand, 1 million and 10 million: the rate at 10 million ÷ the
  rate at 10 thousand is the figure (target ≥ 0.8).
* **Memory per waiting job.** The process's RSS growth while the node took its
  N jobs, per job; and Redis' ``used_memory`` growth for 1 million LPUSH of
  200-byte values (``redis-server`` from Debian on a free port; skipped when
  not installed).
* **Recovery per million jobs.** 1 million waiting jobs written as the node
  writes them (a WAL segment of PUSH records of 1,000; a snapshot), recovered
  by ``Storage.recover`` into a fresh engine: from the snapshot, and from the
  log alone; wall and CPU seconds (on a shared machine the CPU time is the
  steadier figure).

The node's own GC settings apply (``shardq_node.main``). Writes the ``scale``
section of BENCHMARKS.md, or with ``SHARDQ_PURE=1`` (the interpreted sources,
shardq.native) the ``scale-interpreted`` one, beside it. Memory use peaks near
3 GiB (10 million jobs and the smaller nodes, all held at once).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_report as report
import orjson
from bench_inproc import Caller

from shardq import native
from shardq.wire.protocol import JobSpec
from shardq_node.engine import Engine
from shardq_node.runtime import Node, wall_clock_ms
from shardq_node.settings import NodeSettings, StorageSettings
from shardq_node.storage import SNAP_PREFIX, Storage, snapshot_name, write_snapshot
from shardq_node.wal import frames, segment_name

QUEUE = "scale"
#: BENCHMARKS.md sections: the compiled node's figures, and the interpreted fallback's
_SECTIONS = {"compiled": "scale", "interpreted": "scale-interpreted"}
PAYLOAD = 200  # bytes of each job's JSON payload
BATCH = 100  # request lines between two flushes (a read's worth)


def _payload(i: int) -> bytes:
    """A distinct 200-byte JSON string (each job keeps its own bytes)."""
    return b'"%0*d"' % (PAYLOAD - 2, i)


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fill(engine: Engine, n: int, start: int = 0) -> None:
    """``n`` waiting jobs in QUEUE, pushed 1,000 a call; the journal dropped (memory only)."""
    spec = JobSpec(None)
    i = start
    while i < start + n:
        k = min(1000, start + n - i)
        engine.push(QUEUE, [spec] * k, [_payload(j) for j in range(i, i + k)])
        engine.journal = []
        i += k


def _node() -> Node:
    settings = NodeSettings()
    settings.storage.memory_budget = 1 << 40  # 10 M payloads stay in memory
    return Node(settings, clock=wall_clock_ms)


def _run(node: Node, caller: Caller, lines: list[bytes]) -> tuple[float, list[bytes]]:
    """Run ``lines`` as a session does; lines per CPU second of this process (no I/O here:
    its CPU time is the work, and the time other processes take the CPU is left out)."""
    execute = node.execute
    out: list[bytes] = []
    t0 = time.process_time()
    for i in range(0, len(lines), BATCH):
        out.extend([execute(x, caller) or b"" for x in lines[i : i + BATCH]])
        node.flush()
    return len(lines) / (time.process_time() - t0), out


class Filled:
    """A node holding ``n`` waiting jobs, and what it cost to fill."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.node = _node()
        gc.collect()
        rss0 = _rss()
        t0 = time.perf_counter()
        fill(self.node.engine, n)
        self.fill_s = time.perf_counter() - t0
        gc.collect()
        self.rss_per_job = (_rss() - rss0) / n
        self.got: dict[str, list[float]] = {"push": [], "pull": [], "ack": []}

    def round(self, ops: int) -> None:
        """One round: ``ops`` PUSH, then ``ops`` PULL, then ACK of what was pulled."""
        import orjson

        node, caller = self.node, Caller()
        data = orjson.dumps("x" * (PAYLOAD - 2))
        push = [b'{"cmd":"PUSH","queue":"%b","data":%b}' % (QUEUE.encode(), data)] * ops
        pull = [b'{"cmd":"PULL","queue":"%b","timeout":0}' % QUEUE.encode()] * ops
        rate, _ = _run(node, caller, push)
        self.got["push"].append(rate)
        rate, answers = _run(node, caller, pull)
        self.got["pull"].append(rate)
        ids = [orjson.loads(a)["job"]["id"] for a in answers]
        rate, answers = _run(node, caller, [b'{"cmd":"ACK","id":%d}' % i for i in ids])
        self.got["ack"].append(rate)
        if any(b'"ok":true' not in a for a in answers):
            raise RuntimeError(f"ACK refused: {answers[0]!r}")

    def result(self) -> dict[str, Any]:
        return {
            "jobs": self.n, "waiting_after": self.node.engine.queues[QUEUE].n_waiting,
            "fill_s": self.fill_s, "rss_per_job": self.rss_per_job,
            **{k: max(v) for k, v in self.got.items()}, "rounds": self.got,
        }


def rates(sizes: list[int], ops: int, rounds: int) -> list[dict[str, Any]]:
    """PUSH, PULL and ACK lines/s with each of ``sizes`` jobs waiting in the queue they use:
    one node per size, all filled first, then the rounds go over the sizes in turn (so a
    machine that gets busier meanwhile weighs on every size alike)."""
    nodes = []
    for n in sizes:
        nodes.append(Filled(n))
        print(f"{n:,} waiting: RSS {nodes[-1].rss_per_job:,.0f} B/job "
              f"(filled in {nodes[-1].fill_s:.1f} s)", file=sys.stderr)
    gc.freeze()  # as the node does with its recovered state (shardq_node.main)
    for r in range(rounds):
        for f in (nodes if r % 2 == 0 else nodes[::-1]):
            f.round(ops)
    out = [f.result() for f in nodes]
    for r in out:
        print(f"{r['jobs']:,} waiting: push {r['push']:,.0f}/s pull {r['pull']:,.0f}/s "
              f"ack {r['ack']:,.0f}/s", file=sys.stderr)
    gc.unfreeze()
    del nodes
    gc.collect()
    return out


# -- Redis ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


def _used_memory(sock: socket.socket) -> int:
    """INFO memory's used_memory (the reply is one bulk string: ``$len``, then the text)."""
    sock.sendall(_resp(b"INFO", b"memory"))
    buf = b""
    while b"\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, rest = buf.partition(b"\r\n")
    size = int(head[1:])
    while len(rest) < size + 2:
        rest += sock.recv(65536)
    return int(rest.split(b"used_memory:", 1)[1].split(b"\r\n", 1)[0])


def redis_memory(n: int, work: Path) -> dict[str, Any] | None:
    """Redis' used_memory growth for ``n`` LPUSH of 200-byte values (one list)."""
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                sock = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("redis-server not listening")
        with sock:
            before = _used_memory(sock)
            for i in range(0, n, 1000):
                k = min(1000, n - i)
                sock.sendall(b"".join(_resp(b"LPUSH", b"bench", _payload(i + j))
                                      for j in range(k)))
                got = 0
                buf = b""
                while got < k:
                    buf += sock.recv(1 << 20)
                    got = buf.count(b"\r\n")
            after = _used_memory(sock)
            return {"jobs": n, "bytes_per_job": (after - before) / n}
    finally:
        proc.terminate()
        proc.wait(10)


# -- recovery ------------------------------------------------------------------------------------


def recovery(n: int, work: Path) -> dict[str, Any]:
    """Seconds to recover ``n`` waiting jobs by ``Storage.recover``: from a snapshot, from
    the log; and the snapshot's size."""
    engine = Engine(wall_clock_ms)
    log_dir = work / "log"
    (log_dir / "wal").mkdir(parents=True)
    spec = JobSpec(None)
    with open(log_dir / "wal" / segment_name(1), "wb") as f:
        for i in range(0, n, 1000):
            k = min(1000, n - i)
            engine.push(QUEUE, [spec] * k, [_payload(j) for j in range(i, i + k)])
            f.write(frames(engine.journal))
            engine.journal = []
    snap_dir = work / "snap"
    (snap_dir / "wal").mkdir(parents=True)
    path = snap_dir / snapshot_name(2)
    write_snapshot(engine, str(path), 2, n // 1000)
    snap_bytes = path.stat().st_size
    assert path.name.startswith(SNAP_PREFIX)
    del engine
    gc.collect()
    out: dict[str, Any] = {"jobs": n, "snapshot_bytes": snap_bytes}
    for what, where in (("snapshot", snap_dir), ("log", log_dir)):
        fresh = Engine(wall_clock_ms)
        storage = Storage(StorageSettings(data_dir=str(where), fsync="never"))
        cpu = time.process_time()
        rep = storage.recover(fresh, open_wal=False)
        out[what + "_cpu"] = time.process_time() - cpu
        if fresh.queues[QUEUE].n_waiting != n:
            raise RuntimeError(f"{what}: {fresh.queues[QUEUE].n_waiting} jobs recovered of {n}")
        out[what] = rep.seconds
        del fresh, storage
        gc.collect()
    return out


# -- the report ----------------------------------------------------------------------------------


def _num(x: float) -> str:
    return f"{x:,.0f}"


def section(res: dict[str, Any], command: str) -> str:
    rows = res["rates"]
    first = rows[0]
    lines = [
        f"## Scale: cost with 10 thousand to 10 million waiting jobs ({res['mode']})",
        "",
        f"`{command}` · {res['meta']}. In process (`Node.execute` over request lines, the "
        "rates per CPU second of the process, so the machine's other work is left out; the "
        f"journal flushed every {BATCH} lines; no sockets), one queue holding the waiting "
        "jobs (200-byte payloads) that PUSH adds to, PULL takes the oldest of and ACK "
        "settles; the best of the rounds (each round visits every size in turn).",
        "",
        "| waiting jobs | PUSH /s | PULL /s | ACK /s | ÷ rates at "
        f"{first['jobs']:,} (push / pull / ack) | RSS growth per job |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = " / ".join(f"{r[k] / first[k]:.2f}×" for k in ("push", "pull", "ack"))
        lines.append(f"| {r['jobs']:,} | {_num(r['push'])} | {_num(r['pull'])} | "
                     f"{_num(r['ack'])} | {ratio} | {r['rss_per_job']:,.0f} B |")
    last = rows[-1]
    worst = min(last[k] / first[k] for k in ("push", "pull", "ack"))
    lines += ["", f"**Rate at {last['jobs']:,} ÷ rate at {first['jobs']:,}**: lowest of the "
              f"three **{worst:.2f}×** (target ≥ 0.8: {'met' if worst >= 0.8 else 'missed'})."]
    mem = res.get("redis")
    big = max(rows, key=lambda r: r["jobs"] if r["jobs"] <= 1_000_000 else 0)
    if mem is not None:
        ratio = big["rss_per_job"] / mem["bytes_per_job"]
        lines += ["", f"**Memory per waiting 200-byte job**: node RSS growth over "
                  f"{big['jobs']:,} jobs **{big['rss_per_job']:,.0f} B**, Redis `used_memory` "
                  f"growth over {mem['jobs']:,} LPUSH **{mem['bytes_per_job']:,.0f} B**: "
                  f"**{ratio:.2f}×** Redis (target ≤ 1.5: {'met' if ratio <= 1.5 else 'missed'})."]
    rec = res["recovery"]
    per_m = 1e6 / rec["jobs"]
    lines += [
        "",
        f"**Recovery of {rec['jobs']:,} waiting jobs** (`Storage.recover`; snapshot "
        f"{rec['snapshot_bytes'] / 2**20:,.0f} MiB):",
        "",
        "| from | seconds | seconds per million jobs | CPU seconds per million jobs |",
        "|---|---:|---:|---:|",
        f"| snapshot | {rec['snapshot']:.2f} | {rec['snapshot'] * per_m:.2f} | "
        f"{rec['snapshot_cpu'] * per_m:.2f} |",
        f"| log (PUSH records of 1,000) | {rec['log']:.2f} | {rec['log'] * per_m:.2f} | "
        f"{rec['log_cpu'] * per_m:.2f} |",
        "",
        f"Target ≤ 1 s per million from a snapshot: "
        f"{'met' if rec['snapshot'] * per_m <= 1 else 'missed'} by wall time, "
        f"{'met' if rec['snapshot_cpu'] * per_m <= 1 else 'missed'} by CPU time (recovery "
        f"does no I/O but reading the files; wall time counts the machine's other work too: "
        f"load average {res['load']:.1f} on {os.cpu_count()} CPUs during the run).",
    ]
    return "\n".join(lines)


#: Where ``--write`` also leaves the figures issue 18's targets table reads
#: (bench_peers_report.py, the last step of ``make bench``), one file per build.
SUMMARY = Path(__file__).resolve().parent.parent / "build" / "bench" / "scale-{mode}.json"


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """The target figures of one run: the lowest of the rates at the largest size ÷ at the
    smallest, recovery per million jobs, memory ÷ Redis."""
    rows = res["rates"]
    first, last = rows[0], rows[-1]
    ratios = {k: last[k] / first[k] for k in ("push", "pull", "ack")}
    rec = res["recovery"]
    per_m = 1e6 / rec["jobs"]
    return {"mode": res["mode"], "date": res["date"], "sizes": [first["jobs"], last["jobs"]],
            "ratios": ratios, "worst": min(ratios.values()),
            "snapshot_s_per_m": rec["snapshot"] * per_m, "log_s_per_m": rec["log"] * per_m}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--write", help="update this BENCHMARKS.md")
    p.add_argument("--quick", action="store_true", help="small counts (smoke run)")
    p.add_argument("--sizes", default="10000,1000000,10000000",
                   help="waiting jobs, comma separated, smallest first")
    p.add_argument("--ops", type=int, default=20_000, help="requests per phase and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--recovery-jobs", type=int, default=1_000_000)
    p.add_argument("--dir", default=None, help="where the data directories go (default /tmp)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes, args.ops, args.rounds, args.recovery_jobs = [1000, 20_000], 2000, 2, 20_000
    gc.set_threshold(100_000, 50, 100)  # as the node runs (shardq_node.main)
    work = Path(tempfile.mkdtemp(prefix="shardq-scale-", dir=args.dir))
    res: dict[str, Any] = {}
    try:
        res["rates"] = rates(sizes, args.ops, args.rounds)
        res["redis"] = redis_memory(max(min(sizes[-1], 1_000_000), 1000), work)
        if res["redis"] is not None:
            print(f"Redis: {res['redis']['bytes_per_job']:,.0f} B/job", file=sys.stderr)
        res["recovery"] = recovery(args.recovery_jobs, work)
        print(f"recovery: {res['recovery']}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["load"] = os.getloadavg()[1]
    build = native.status()
    res["mode"] = "compiled" if build.compiled else "interpreted"
    res["date"] = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    res["meta"] = f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {res['date']}"
    command = " ".join(["loadtest/bench_scale.py", *(argv if argv is not None else sys.argv[1:])])
    body = section(res, command)
    print(body)
    if args.write:
        report.write_section(Path(args.write), _SECTIONS[res["mode"]], body)
        out = Path(str(SUMMARY).format(mode=res["mode"]))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(orjson.dumps(summary(res), option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
