"""A coordinator process for replicated shards: ``python -m tests.faults.rebalance_shards
--store PATH --shards a,b[,…] [--cluster-token T]`` moves slots until those shards own the
ring (``Rebalancer.converge_shards`` over the topology store). ``shardq up`` runs the same
code in its supervisor; the fault tier needs it as a process of its own, to run it during
faults. Prints ``{"ok": true, "epoch": N}`` when done."""

from __future__ import annotations

import argparse
import asyncio

import orjson

from shardq_operator.rebalance import Rebalancer
from shardq_operator.store import FileStore


async def converge(store: str, shards: list[str], token: str | None, batch: int) -> int:
    reb = Rebalancer(token=token, batch=batch, store=FileStore(store))
    try:
        return (await reb.converge_shards(shards)).epoch
    finally:
        await reb.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--cluster-token", default=None)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    epoch = asyncio.run(converge(args.store, [s for s in args.shards.split(",") if s],
                                 args.cluster_token, args.batch))
    print(orjson.dumps({"ok": True, "epoch": epoch}).decode(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
