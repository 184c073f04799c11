"""One-shot requests through the gateway Service, for the real-node tests; answers as JSON.

Run inside the node's network namespace (``RealNode.probe``)::

    python -m tests.e2e.probe --address ADDR --token T markers --node shardq-node-1 --count 8
    python -m tests.e2e.probe --address ADDR --token T states 12 13 14

``markers`` pushes one job to each of ``count`` queues whose slots the node ``--node`` owns
(per the topology the gateway serves) and prints ``{queue: id}``; ``states`` prints each job's
state (``gone`` when the cluster has no such job). Must not: pull or ack anything.
"""

from __future__ import annotations

import argparse
import asyncio
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


async def main(args: argparse.Namespace) -> Any:
    async with AsyncClient(args.address, token=args.token) as c:
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
    s = sub.add_parser("states")
    s.add_argument("ids", type=int, nargs="+")
    return p.parse_args()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse())), sort_keys=True))
