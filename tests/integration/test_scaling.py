"""A real local cluster (node processes + gateway process) scaled 3 -> 5 -> 2 under load.

Producers push numbered jobs through the gateway while workers pull and ack
them; meanwhile the supervisor adds two nodes and then removes three, moving
slots live. At the end every pushed job was completed exactly once, and no
request waited longer than a second.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shardq import AsyncClient
from shardq.errors import ShardqError
from shardq.wire.topology import Topology
from shardq_operator.local import LocalCluster
from shardq_operator.ring import ring_owners

from ..helpers import SteadyLoad, eventually, free_port, listens, start_node_process

QUEUES = [f"scale-{i}" for i in range(16)]


@pytest.mark.slow
async def test_scaling_3_to_5_to_2_under_load_completes_every_job_once(tmp_path: Path) -> None:
    port = free_port()
    cluster = LocalCluster("127.0.0.1", port, 0, str(tmp_path / "data"), "always")
    try:
        await cluster.start(3)
        load = SteadyLoad(QUEUES, f"127.0.0.1:{port}")
        producers = [asyncio.create_task(load.produce(i)) for i in range(3)]
        workers = [asyncio.create_task(load.work(QUEUES[i::2])) for i in range(2)]
        await load.progressed("on 3 nodes", 250)
        moved: list[tuple[int, int]] = []
        topo = await cluster.scale(5, lambda d, t: moved.append((d, t)))
        assert len(topo.nodes) == 5 and not topo.moving
        await load.progressed("on 5 nodes", 150)
        topo = await cluster.scale(2, lambda d, t: moved.append((d, t)))
        assert [n.name for n in topo.nodes] == ["node-0", "node-1"] and not topo.moving
        await load.progressed("on 2 nodes", 150)
        load.stop.set()
        await asyncio.wait_for(asyncio.gather(*producers), 30)
        await asyncio.wait_for(asyncio.gather(*workers), 60)
    finally:
        await cluster.stop()
    duplicates, lost = load.duplicates(), load.lost()
    print(f"\nscaling 3->5->2: {len(load.pushed)} jobs pushed, {len(load.completed)} completed, "
          f"{duplicates} duplicates, {lost} lost, {sum(t for _, t in moved[-1:])} slots in the "
          f"last move, longest request {load.longest * 1000:.0f} ms, "
          f"{len(load.errors)} errors {load.errors[:3]}")
    assert len(load.pushed) > 500
    assert duplicates == 0
    assert lost == 0
    assert load.errors == []
    assert load.longest < 1.0


async def test_a_killed_node_gives_clear_errors_then_comes_back_whole(tmp_path: Path) -> None:
    port = free_port()
    cluster = LocalCluster("127.0.0.1", port, 0, str(tmp_path / "data"), "always")
    try:
        await cluster.start(2)
        topo = cluster.topology
        assert topo is not None
        async with AsyncClient(f"127.0.0.1:{port}") as c:
            ids = {q: await c.push(q, {"q": q}) for q in QUEUES}
            victim = cluster.nodes[1]
            assert victim.proc is not None
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()
            theirs = [q for q in QUEUES if topo.owner_of_queue(q) == victim.name]
            mine = [q for q in QUEUES if topo.owner_of_queue(q) != victim.name]
            assert theirs and mine
            started = time.monotonic()
            with pytest.raises(ShardqError, match="Unavailable"):
                await c.push(theirs[0], 1)
            assert time.monotonic() - started < 5, "an unreachable node must not hang clients"
            await c.push(mine[0], 2)  # the other node's slots keep working
            victim.proc = cluster._spawn_node(victim)
            await eventually(lambda: listens(victim.port), what="the restarted node listening")

            async def answered(job_id: int) -> dict[str, Any] | None:
                """{"job": GETJOB's answer} once the node answers it, else None."""
                try:
                    return {"job": await c.get_job(job_id)}
                except ShardqError:
                    return None

            for q in theirs:
                job = (await eventually(lambda q=q: answered(ids[q]),
                                        what=f"GETJOB answered for {q}"))["job"]
                assert job is not None and job["state"] == "waiting", (q, job)
    finally:
        await cluster.stop()



async def test_a_coordinator_killed_mid_move_is_finished_by_the_next(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    procs = [start_node_process(p, "--name", f"node-{i}", "--data-dir", str(tmp_path / f"n{i}"))
             for i, p in enumerate(ports)]
    members = [f"node-{i}=127.0.0.1:{p}" for i, p in enumerate(ports)]
    try:
        first = subprocess.run(
            [sys.executable, "-m", "shardq.cli", "rebalance", "--nodes", members[0]],
            capture_output=True, timeout=60, check=True)
        assert b'"ok":true' in first.stdout
        async with AsyncClient(f"127.0.0.1:{ports[0]}") as c:
            ids = [(q, await c.push(q, {"q": q})) for q in QUEUES * 4]  # 64 jobs, 16 queues
        coordinator = subprocess.Popen(
            [sys.executable, "-m", "shardq.cli", "rebalance", "--nodes", ",".join(members),
             "--batch", "1"], stdout=subprocess.PIPE)
        assert coordinator.stdout is not None
        for _ in range(20):  # let it move some slots, then kill it in the middle
            coordinator.stdout.readline()
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait()
        coordinator.stdout.close()
        async with AsyncClient(f"127.0.0.1:{ports[1]}") as c:
            half = Topology.from_wire(await c.topology() or {})
        assert half.owners != ring_owners(["node-0", "node-1"]), "the move was already over"
        again = subprocess.run(
            [sys.executable, "-m", "shardq.cli", "rebalance", "--nodes", ",".join(members)],
            capture_output=True, timeout=120, check=True)
        assert b'"ok":true' in again.stdout
        async with AsyncClient(f"127.0.0.1:{ports[0]}", direct=True) as c:
            topo = Topology.from_wire(await c.topology() or {})
            assert topo.owners == ring_owners(["node-0", "node-1"]) and not topo.moving
            assert {topo.owner_of_queue(q) for q in QUEUES} == {"node-0", "node-1"}
            for q, job_id in ids:
                job = await c.get_job(job_id)
                assert job is not None and job["state"] == "waiting", (q, job)
            stats = await c.stats()
        total = 0
        for port in ports:  # nothing twice: each job on exactly one node
            async with AsyncClient(f"127.0.0.1:{port}") as c:
                total += (await c.stats())["jobs"]
        assert total == len(ids), stats
    finally:
        for p in procs:
            p.terminate()
            p.wait()
