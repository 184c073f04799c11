"""Rounds of the Kubernetes SIGKILL finding on loopback (issue 17, duplicate completion).

A replicated 3-member shard run as ``shardq up --replicas 3`` runs it (``LocalCluster``: node
processes, the failover controller in-process, a gateway) plus a second gateway, with client
tokens as the operator configures them (every pod gets ``SHARDQ_TOKEN``, so each gateway
authenticates its connections to the nodes). ``SteadyLoad`` pushes through one gateway and
pulls/acks through the other; the shard's primary is SIGKILLed and the same node process is
started again on the same data directory about a second later (as the kubelet does). Each
round drains the load and counts pushed / completed / lost / duplicated, with evidence.

    SHARDQ_PURE=1 .venv/bin/python -m tests.faults.kubelet_kill --rounds 20 [--no-token]

Not collected by pytest (no ``test_`` prefix): a diagnostic, bounded by ``--rounds`` and
``--budget`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from shardq import AsyncClient
from shardq.errors import ShardqError
from shardq_operator.local import LocalCluster, _wait_port, free_port

from ..helpers import SteadyLoad, eventually

QUEUES = [f"kk-{i}" for i in range(6)]
TOKEN = "kubelet-kill-client-token"


@dataclass
class Outcome:
    pushed: int = 0
    completed: int = 0
    lost: list[int] = field(default_factory=list)
    duplicates: dict[int, list[int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    acked_elsewhere: list[int] = field(default_factory=list)  # ack refused, job completed


def spawn_second_gateway(cluster: LocalCluster, port: int) -> subprocess.Popen[bytes]:
    """A second gateway on ``port`` with the same seeds (the e2e load's worker gateway)."""
    seeds = ",".join(f"{cluster.host}:{n.port}" for n in cluster.nodes)
    argv = [sys.executable, "-m", "shardq.cli", "gateway", "--host", cluster.host,
            "--port", str(port), "--http-port", "0", "--seed", seeds]
    return cluster._spawn(argv, "gateway-2")  # a diagnostic may use the private spawner


async def one_round(base: str, n: int, token: bool, job_timeout: int, down: float) -> Outcome:
    data = os.path.join(base, f"round-{n}")
    port, port2 = free_port(), free_port()
    tokens = (TOKEN,) if token else ()
    cluster = LocalCluster("127.0.0.1", port, 0, data, "always", tokens=tokens, replicas=3,
                           failure_timeout=2.0)
    await cluster.start(1)
    gw2 = spawn_second_gateway(cluster, port2)
    out = Outcome()
    try:
        await _wait_port("127.0.0.1", port2, gw2)
        load = SteadyLoad(QUEUES, f"127.0.0.1:{port}", f"127.0.0.1:{port2}",
                          token=TOKEN if token else None, error_pause=0.01,
                          job_timeout=job_timeout)
        producers = [asyncio.create_task(load.produce(i)) for i in range(2)]
        workers = [asyncio.create_task(load.work(QUEUES[i::2])) for i in range(2)]
        await eventually(lambda: len(load.completed) > 100, 30, what="load running")
        topo = await cluster.current()
        assert topo is not None
        victim = next(m for m in cluster.nodes if m.name == topo.shards["shard-0"].primary)
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.proc.wait)
        await asyncio.sleep(down)  # the fault's duration: the kubelet's restart delay
        victim.proc = cluster._spawn_node(victim)  # same data directory
        done = len(load.completed)
        await eventually(lambda: len(load.completed) > done + 150, 40,
                         what="load going on after the failover")
        load.stop.set()
        await asyncio.wait_for(asyncio.gather(*producers), 30)
        try:
            await asyncio.wait_for(asyncio.gather(*workers), job_timeout / 1000 + 20)
        except TimeoutError:
            for w in workers:
                w.cancel()
        await load.settle_unsure()
        out.pushed = len(load.pushed)
        out.completed = len(load.completed)
        out.duplicates = load.duplicate_evidence()
        out.errors = load.errors
        async with AsyncClient(f"127.0.0.1:{port}", token=TOKEN if token else None) as c:
            for number in sorted(load.pushed - load.completed.keys()):
                job = await c.get_job(load.ids[number])
                if job is not None and job.get("state") == "completed":
                    out.acked_elsewhere.append(number)
                else:
                    out.lost.append(number)
                    print(f"  lost {number}: id {load.ids[number]} job {job} (logs in {data})",
                          flush=True)
    finally:
        await cluster.stop()
        gw2.terminate()
        await asyncio.to_thread(gw2.wait, 15)
    return out


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--budget", type=float, default=1800.0, help="seconds for all rounds")
    ap.add_argument("--no-token", action="store_true", help="gateways without AUTH")
    ap.add_argument("--job-timeout", type=int, default=10_000)
    ap.add_argument("--down", type=float, default=1.0)
    args = ap.parse_args()
    started = time.monotonic()
    totals = {"rounds": 0, "pushed": 0, "completed": 0, "lost": 0, "dup": 0, "ackrefused": 0}
    with tempfile.TemporaryDirectory(prefix="kk-") as tmp:
        base = os.environ.get("KK_KEEP") or tmp
        for n in range(args.rounds):
            if time.monotonic() - started > args.budget:
                break
            try:
                o = await one_round(base, n, not args.no_token, args.job_timeout, args.down)
            except (ShardqError, AssertionError, TimeoutError) as exc:
                print(f"round {n}: harness failure: {exc!r}", flush=True)
                continue
            totals["rounds"] += 1
            totals["pushed"] += o.pushed
            totals["completed"] += o.completed
            totals["lost"] += len(o.lost)
            totals["dup"] += len(o.duplicates)
            totals["ackrefused"] += len(o.acked_elsewhere)
            notable = [e for e in o.errors if "JobNotFound" in e or "not found" in e][:3]
            print(f"round {n}: pushed {o.pushed} completed {o.completed} lost {o.lost} "
                  f"dup {o.duplicates} ack-refused-but-completed {o.acked_elsewhere} "
                  f"errors {len(o.errors)} {notable}", flush=True)
    print(f"TOTAL {totals} in {time.monotonic() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
