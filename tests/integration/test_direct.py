"""The SDK's direct mode: queue and job commands go straight to the owning node."""

from __future__ import annotations

from pathlib import Path

from shardq import AsyncClient
from shardq_operator.rebalance import Rebalancer

from ..cluster import infos, start_nodes

QUEUES = [f"d{i}" for i in range(30)]


async def test_direct_mode_routes_by_topology_and_follows_moves(tmp_path: Path) -> None:
    nodes = await start_nodes(["node-0", "node-1", "node-2"], tmp_path)
    reb = Rebalancer()
    try:
        topo = await reb.converge(infos(nodes))
        client = AsyncClient(f"127.0.0.1:{nodes[0].tcp_port}", direct=True)
        async with client:
            ids = {q: await client.push(q, {"q": q}) for q in QUEUES}
            for n in nodes:  # each job sits on its queue's owner: no MOVED was needed
                for name in n.engine.queues:
                    assert topo.owner_of_queue(name) == n.settings.name
            assert {n.engine.job_count() > 0 for n in nodes} == {True}
            await reb.converge(infos(nodes[:2]))  # the client does not know yet
            for q in QUEUES:
                job = await client.pull(q, timeout=1000)
                assert job is not None and job.id == ids[q]
                await client.ack(job, {"done": q})
                assert await client.get_result(ids[q]) == {"done": q}
            assert client.routing is not None and client.routing.epoch > topo.epoch
            assert not nodes[2].engine.job_count() and not nodes[2].engine.finished
    finally:
        await reb.close()
        for n in nodes:
            await n.stop()
