"""One-shot requests through the gateway Service, for the real-node tests; answers as JSON.

Run inside the node's network namespace (``RealNode.probe``)::

    python -m tests.e2e.probe --address ADDR --token T markers --node shardq-node-1 --count 8
    python -m tests.e2e.probe --address ADDR --token T states 12 13 14

``outage --shard S`` pushes to a queue of shard S (replicated clusters) every 50 ms, each push
bounded by 2 s (a new connection, bounded by 5 s, after a failed one), until a line (or EOF) on
stdin or ``--limit`` seconds; it writes ``ready`` to stderr once a push went through, and
prints the longest gap between two successful pushes with its wall-clock ends.
``markers`` pushes one job to each of ``count`` queues whose slots the node ``--node`` owns
(per the topology the gateway serves) and prints ``{queue: id}``; ``states`` prints each job's
state (``gone`` when the cluster has no such job). Must not: pull or ack anything.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from typing import Any

from shardq import AsyncClient
from shardq.wire.slots import slot_of

TIMEOUT = 10.0


async def markers(c: AsyncClient, node: str, count: int, prefix: str) -> dict[str, int]:
    topology = (await asyncio.wait_for(c.call({"cmd": "TOPOLOGY"}), TIMEOUT))["topology"]
    owners = topology["owners"]
    queues = [q for q in (f"{prefix}-{i}" for i in range(4096))
              if owners[slot_of(q)] == node][:count]
    if len(queues) < count:
        raise SystemExit(f"{node} owns too few slots: {len(queues)} of {count} queues")
    return {q: await asyncio.wait_for(c.push(q, {"marker": q}), TIMEOUT) for q in queues}


async def states(c: AsyncClient, ids: list[int]) -> dict[str, str]:
    out = {}
    for job_id in ids:
        job = await asyncio.wait_for(c.get_job(job_id), TIMEOUT)
        out[str(job_id)] = (job or {}).get("state", "gone")
    return out


async def outage(c: AsyncClient, shard: str, limit: float, address: str,
                 token: str | None) -> dict[str, Any]:
    import sys
    import time

    topology = (await asyncio.wait_for(c.call({"cmd": "TOPOLOGY"}), TIMEOUT))["topology"]
    queue = next(q for q in (f"outage-{shard}-{i}" for i in range(4096))
                 if topology["owners"][slot_of(q)] == shard)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), stop.set)
    oks: list[float] = []
    client: AsyncClient | None
    failures = 0
    deadline = time.monotonic() + limit
    client = c
    while time.monotonic() < deadline and not stop.is_set():
        try:
            if client is None:
                # (a slow machine: connecting through the Service's DNS name can take seconds)
                client = await asyncio.wait_for(AsyncClient(address, token=token).__aenter__(),
                                                5.0)
            await asyncio.wait_for(client.push(queue, {"probe": True}), 2.0)
        except (Exception, TimeoutError):
            failures += 1
            # a push cut short leaves its answer on the way: never reuse that connection
            if client is not None and client is not c:
                await client.close()
            client = None
        else:
            if not oks:
                print("ready", file=sys.stderr, flush=True)
            oks.append(time.time())
        await asyncio.sleep(0.05)  # the probe's pace: one push every 50 ms
    gaps = [(b - a, a, b) for a, b in itertools.pairwise(oks)]
    gap, before, after = max(gaps) if gaps else (0.0, None, None)
    return {"queue": queue, "pushes": len(oks), "failures": failures, "longest_gap": gap,
            "last_ok_before": before, "first_ok_after": after}


async def main(args: argparse.Namespace) -> Any:
    async with AsyncClient(args.address, token=args.token) as c:
        if args.what == "outage":
            return await outage(c, args.shard, args.limit, args.address, args.token)
        if args.what == "markers":
            return await markers(c, args.node, args.count, args.prefix)
        return await states(c, args.ids)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--address", required=True)
    p.add_argument("--token", default=None)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("markers")
    m.add_argument("--node", required=True)
    m.add_argument("--count", type=int, default=8)
    m.add_argument("--prefix", default="marker")
    o = sub.add_parser("outage")
    o.add_argument("--shard", required=True)
    o.add_argument("--limit", type=float, default=60.0)
    s = sub.add_parser("states")
    s.add_argument("ids", type=int, nargs="+")
    return p.parse_args()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse())), sort_keys=True))
