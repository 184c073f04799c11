"""Dependencies whose parent lives on another node: the watch protocol between real nodes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shardq.wire.slots import slot_of
from shardq.wire.topology import Topology
from shardq_node.runtime import Node
from shardq_operator.rebalance import Rebalancer
from shardq_operator.ring import ring_owners

from ..cluster import Direct, infos, start_nodes
from ..helpers import eventually


def split_queues(topo: Topology) -> tuple[str, str]:
    """A queue on node-0 and a queue on node-1."""
    on: dict[str, str] = {}
    for i in range(200):
        q = f"x{i}"
        on.setdefault(topo.owners[slot_of(q)], q)
        if len(on) == 2:
            break
    return on["node-0"], on["node-1"]


async def state(direct: Direct, job_id: int) -> str | None:
    job = (await direct.call({"cmd": "GETJOB", "id": job_id}))["job"]
    return None if job is None else str(job["state"])


async def until(direct: Direct, job_id: int, wanted: str) -> None:
    seen: str | None = None

    async def there() -> bool:
        nonlocal seen
        seen = await state(direct, job_id)
        return seen == wanted

    await eventually(there, what=f"job {job_id} {wanted}", hint=lambda: f"it is {seen}")


async def run_cluster(tmp_path: Path) -> tuple[list[Node], Rebalancer, Direct, Topology]:
    nodes = await start_nodes(["node-0", "node-1"], tmp_path)
    reb = Rebalancer()
    topo = await reb.converge(infos(nodes))
    return nodes, reb, Direct(nodes), topo


async def close(nodes: list[Node], reb: Rebalancer, direct: Direct) -> None:
    await direct.close()
    await reb.close()
    for n in nodes:
        await n.stop()


async def push(direct: Direct, queue: str, **opts: Any) -> int:
    return int((await direct.call({"cmd": "PUSH", "queue": queue, "data": queue, **opts}))["id"])


async def finish(direct: Direct, queue: str, ok: bool) -> int:
    job = (await direct.call({"cmd": "PULL", "queue": queue, "timeout": 1000}))["job"]
    cmd = {"cmd": "ACK", "id": job["id"]} if ok else {"cmd": "FAIL", "id": job["id"]}
    await direct.call(cmd)
    return int(job["id"])


async def test_a_child_runs_once_its_parent_on_another_node_completes(tmp_path: Path) -> None:
    nodes, reb, direct, topo = await run_cluster(tmp_path)
    try:
        here, there = split_queues(topo)
        parent = await push(direct, there)
        child = await push(direct, here, depends_on=[parent])
        assert await state(direct, child) == "waiting-children"
        await until_watched(nodes[1], parent)
        await finish(direct, there, ok=True)
        await until(direct, child, "waiting")
        # the parent's node forgets the watch once its message is in
        await eventually(lambda: not nodes[1].engine.deps.watchers
                         and not nodes[1].engine.deps.outbox,
                         what="the parent's node done with the watch")
    finally:
        await close(nodes, reb, direct)


async def until_watched(node: Node, parent: int) -> None:
    await eventually(lambda: parent in node.engine.deps.watchers,
                     what=f"a watch on parent {parent}")


async def test_a_parent_dying_on_another_node_sends_the_child_to_the_dlq(tmp_path: Path) -> None:
    nodes, reb, direct, topo = await run_cluster(tmp_path)
    try:
        here, there = split_queues(topo)
        parent = await push(direct, there, max_attempts=1)
        child = await push(direct, here, depends_on=[parent])
        grandchild = await push(direct, there, depends_on=[child])
        await until_watched(nodes[1], parent)
        await finish(direct, there, ok=False)
        await until(direct, child, "dead")
        await until(direct, grandchild, "dead")
        dead = (await direct.call({"cmd": "DLQ", "queue": here}))["jobs"]
        assert dead[0]["error"] == f"Parent job {parent} failed"
    finally:
        await close(nodes, reb, direct)


async def test_an_unknown_parent_on_another_node_kills_the_child(tmp_path: Path) -> None:
    nodes, reb, direct, topo = await run_cluster(tmp_path)
    try:
        here, there = split_queues(topo)
        ghost = 10_000 * 1024 + slot_of(there)
        child = await push(direct, here, depends_on=[ghost])
        await until(direct, child, "dead")
        dead = (await direct.call({"cmd": "DLQ", "queue": here}))["jobs"]
        assert dead[0]["error"] == f"Parent job {ghost} not found"
    finally:
        await close(nodes, reb, direct)


def moving_queues() -> tuple[str, str]:
    """A queue that moves node-0 -> node-2 and one that moves node-1 -> node-2 at 2 -> 3."""
    before, after = ring_owners(["node-0", "node-1"]), ring_owners(["node-0", "node-1", "node-2"])
    found: dict[str, str] = {}
    for i in range(5000):
        q = f"m{i}"
        s = slot_of(q)
        if after[s] == "node-2":
            found.setdefault(before[s], q)
        if len(found) == 2:
            return found["node-0"], found["node-1"]
    raise AssertionError("no moving queues found")


async def test_cross_node_dependencies_survive_restarts_and_slot_moves(tmp_path: Path) -> None:
    nodes, reb, direct, topo = await run_cluster(tmp_path)
    try:
        here, there = moving_queues()  # the child's and the parent's slot both move later
        parent = await push(direct, there)
        child = await push(direct, here, depends_on=[parent])
        await until_watched(nodes[1], parent)
        # restart both nodes: the watch and the waiting child come back
        await direct.close()
        for n in nodes:
            await n.stop()
        nodes = await start_nodes(["node-0", "node-1"], tmp_path)
        direct = Direct(nodes)
        await reb.close()
        reb = Rebalancer()
        topo = await reb.converge(infos(nodes))  # same members: only new addresses
        assert await state(direct, child) == "waiting-children"
        # add a third node: the parent's and the child's slots both move to it
        nodes += await start_nodes(["node-2"], tmp_path)
        direct.add(nodes[-1])
        topo = await reb.converge(infos(nodes))
        assert topo.owner_of_queue(here) == topo.owner_of_queue(there) == "node-2"
        assert parent in nodes[2].engine.deps.watchers
        await finish(direct, there, ok=True)
        await until(direct, child, "waiting")
    finally:
        await close(nodes, reb, direct)
