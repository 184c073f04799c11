"""Slot moves between real nodes: everything a slot holds arrives, nothing stays behind."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from shardq.errors import Moved, TryAgain
from shardq.wire.slots import slot_of
from shardq.wire.topology import NodeInfo
from shardq_node.runtime import Node
from shardq_node.settings import NodeSettings, StorageSettings
from shardq_operator.rebalance import RebalanceError, Rebalancer
from shardq_operator.ring import pending_moves, ring_owners

from ..cluster import Direct, infos, start_nodes
from ..helpers import free_port

QUEUES = [f"q{i}" for i in range(40)]


async def stop_all(nodes: list[Node]) -> None:
    for n in nodes:
        await n.stop()


async def fill(direct: Direct) -> dict[str, list[int]]:
    """Jobs in several states on many queues; returns ids by queue."""
    ids: dict[str, list[int]] = {}
    for q in QUEUES:
        ids[q] = [(await direct.call({"cmd": "PUSH", "queue": q, "data": {"q": q, "n": n},
                                      "unique_key": f"{q}-{n}"}))["id"] for n in range(5)]
        await direct.call({"cmd": "PUSH", "queue": q, "data": "late", "delay": 3_600_000})
        dead = (await direct.call({"cmd": "PUSH", "queue": q, "data": "d", "max_attempts": 1}))
        ids[q].append(dead["id"])
    for q in QUEUES[:10]:
        await direct.call({"cmd": "PAUSE", "queue": q})
    return ids


async def test_scaling_3_to_5_to_2_moves_every_job_with_its_slot(tmp_path: Path) -> None:
    nodes = await start_nodes(["node-0", "node-1", "node-2"], tmp_path)
    reb = Rebalancer()
    direct = Direct(nodes)
    try:
        topo = await reb.converge(infos(nodes))
        assert topo.epoch == 1 and set(topo.owners) == {"node-0", "node-1", "node-2"}
        ids = await fill(direct)
        # one active job and one dead job per queue, one result
        for q in QUEUES[10:]:
            job = (await direct.call({"cmd": "PULL", "queue": q, "timeout": 0}))["job"]
            if job["data"] == "d":
                await direct.call({"cmd": "FAIL", "id": job["id"], "error": "x"})
        first = QUEUES[10]
        acked = (await direct.call({"cmd": "PULL", "queue": first, "timeout": 0}))["job"]["id"]
        await direct.call({"cmd": "ACK", "id": acked, "result": {"r": 1}})
        await direct.call({"cmd": "CRON", "name": "c1", "queue": first, "data": 1,
                           "schedule": "0 3 * * *"})
        before = await census(nodes)

        more = await start_nodes(["node-3", "node-4"], tmp_path)
        nodes += more
        for n in more:
            direct.add(n)
        progress: list[tuple[int, int]] = []
        reb.on_progress = lambda d, t: progress.append((d, t))
        topo = await reb.converge(infos(nodes))
        assert topo.owners == ring_owners([f"node-{i}" for i in range(5)])
        assert not topo.moving
        assert progress[-1][0] == progress[-1][1] > 200
        assert await census(nodes) == before
        await check_owners(nodes)

        topo = await reb.converge(infos(nodes[:2]))
        assert set(topo.owners) == {"node-0", "node-1"}
        assert [n.name for n in topo.nodes] == ["node-0", "node-1"]
        assert await census(nodes) == before
        await check_owners(nodes)
        # the moved jobs are whole: data, unique keys, pause state, results, crons, ids
        for q in QUEUES[:3]:
            with pytest.raises(Exception, match="Duplicate job with key"):
                await direct.call({"cmd": "PUSH", "queue": q, "data": 0, "unique_key": f"{q}-0"})
            job = (await direct.call({"cmd": "GETJOB", "id": ids[q][0]}))["job"]
            assert job["data"] == {"q": q, "n": 0}
            new_id = (await direct.call({"cmd": "PUSH", "queue": q, "data": 1}))["id"]
            assert new_id > max(ids[q])
        queues = {x["name"]: x for n in nodes[:2] for x in await list_queues(n)}
        assert all(queues[q]["paused"] for q in QUEUES[:10])
        result = await direct.call({"cmd": "GETRESULT", "id": acked})
        assert result["result"] == {"r": 1}
        crons = [c for n in nodes[:2] for c in (await call(n, {"cmd": "CRONLIST"}))["crons"]]
        assert [c["name"] for c in crons] == ["c1"]
    finally:
        await direct.close()
        await reb.close()
        await stop_all(nodes)


async def call(node: Node, req: dict[str, object]) -> dict[str, object]:
    from shardq.connection import Connection

    conn = await Connection(f"127.0.0.1:{node.tcp_port}").open()
    try:
        return await conn.send(req)  # the raw answer, errors included
    finally:
        await conn.close()


async def list_queues(node: Node) -> list[dict[str, object]]:
    answer = await call(node, {"cmd": "LISTQUEUES"})
    return answer["queues"]  # type: ignore[return-value]


async def census(nodes: list[Node]) -> Counter[str]:
    """Jobs by state over the whole cluster."""
    total: Counter[str] = Counter()
    for n in nodes:
        for job in n.engine.live_jobs():
            total[job.state.value] += 1
        total["finished"] += len(n.engine.finished)
    return total


async def check_owners(nodes: list[Node]) -> None:
    """Every job sits on the node that owns its slot, and nowhere else."""
    for n in nodes:
        topo = n.cluster.topology
        assert topo is not None
        for job in n.engine.live_jobs():
            assert topo.owners[job.queue.slot] == n.settings.name, (job.id, n.settings.name)
        for jid in n.engine.finished:
            assert topo.owners[jid % 1024] == n.settings.name


async def test_a_node_answers_moved_and_tryagain_for_slots_it_does_not_serve(
    tmp_path: Path,
) -> None:
    nodes = await start_nodes(["node-0", "node-1"], tmp_path)
    reb = Rebalancer()
    try:
        topo = await reb.converge(infos(nodes))
        queue = QUEUES[0]
        owner = topo.owners[slot_of(queue)]
        other = next(n for n in nodes if n.settings.name != owner)
        mine = next(n for n in nodes if n.settings.name == owner)
        from shardq.errors import error_from_text

        answer = await call(other, {"cmd": "PUSH", "queue": queue, "data": 1})
        assert isinstance(error_from_text(str(answer["error"])), Moved)
        assert answer["error"] == f"MOVED {topo.epoch}"
        topo.moving[slot_of(queue)] = {"from": owner, "to": other.settings.name}
        topo.epoch += 1
        await reb.publish(topo)
        answer = await call(mine, {"cmd": "PUSH", "queue": queue, "data": 1})
        assert isinstance(error_from_text(str(answer["error"])), TryAgain)
    finally:
        await reb.close()
        await stop_all(nodes)


async def test_a_coordinator_that_died_mid_move_is_finished_by_the_next(tmp_path: Path) -> None:
    nodes = await start_nodes(["node-0", "node-1"], tmp_path)
    reb = Rebalancer()
    direct = Direct(nodes)
    try:
        await reb.converge(infos(nodes[:1]))
        for q in QUEUES:
            await direct.call({"cmd": "PUSH", "queue": q, "data": q})
        topo = await reb.current([f"127.0.0.1:{nodes[0].tcp_port}"])
        assert topo is not None
        # the dead coordinator got as far as: members published, one batch frozen and copied
        topo.nodes = infos(nodes)
        topo.epoch += 1
        await reb.publish(topo)
        _, src, dst = pending_moves(topo)[0]
        slots = [s for s, _, d in pending_moves(topo) if d == dst][:4]
        topo.moving.update({s: {"from": src, "to": dst} for s in slots})
        topo.epoch += 1
        await reb.publish(topo)
        await reb._copy(topo, slots, src, dst)
        await reb.close()
        fresh = Rebalancer()
        done = await fresh.converge(infos(nodes))
        await fresh.close()
        assert not done.moving
        assert done.owners == ring_owners(["node-0", "node-1"])
        assert sum(n.engine.job_count() for n in nodes) == len(QUEUES)
        await check_owners(nodes)
    finally:
        await direct.close()
        await reb.close()
        await stop_all(nodes)


async def test_a_silent_node_keeps_the_coordinator_from_starting_a_new_topology() -> None:
    nodes = await start_nodes(["node-0", "node-1"])
    try:
        silent = NodeInfo("node-2", f"127.0.0.1:{free_port()}")  # its pod runs, nothing answers
        reb = Rebalancer(retry_for=0.3)
        try:
            with pytest.raises(RebalanceError, match="did not answer"):
                await reb.converge([*infos(nodes), silent])
        finally:
            await reb.close()
        # nobody was given a fresh topology that the silent node's might be newer than
        assert [n.cluster.topology for n in nodes] == [None, None]
    finally:
        await stop_all(nodes)


async def test_a_leaving_node_whose_pod_moved_is_followed_to_its_new_address(
    tmp_path: Path
) -> None:
    nodes = await start_nodes(["node-0", "node-1", "node-2"], tmp_path)
    reb = Rebalancer(retry_for=2.0)
    try:
        await reb.converge(infos(nodes))
        direct = Direct(nodes)
        ids = {q: (await direct.call({"cmd": "PUSH", "queue": q, "data": q}))["id"]
               for q in QUEUES}
        await direct.close()
        # node-2's pod is recreated on a new address (same volume) in the middle of a
        # scale-down to 2: the coordinator must fetch its slots from where it is now
        await nodes[2].stop()
        moved = Node(NodeSettings(name="node-2", port=0, http_port=0,
                                  storage=StorageSettings(data_dir=str(tmp_path / "node-2"))))
        await moved.start()
        nodes[2] = moved
        topo = await reb.converge(infos(nodes[:2]), known=infos(nodes[2:]))
        assert set(topo.owners) == {"node-0", "node-1"} and not pending_moves(topo)
        direct = Direct(nodes[:2])
        for q, job_id in ids.items():
            job = (await direct.call({"cmd": "GETJOB", "id": job_id}))["job"]
            assert job is not None and job["data"] == q
        await direct.close()
    finally:
        await reb.close()
        await stop_all(nodes)
