"""Replicated shards (DESIGN §9): majority acks, followers' warm copies, failover, learners.

The shard's three members are real nodes on loopback (in this test's event loop, each with
its own data directory and TCP port); the failover controller runs over a MemoryStore and
talks to them over sockets as it would in ``shardq up``. Nodes are "killed" by stopping
them and "restarted" on the same directory and port.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shardq.connection import Connection
from shardq.errors import Moved, ShardqError, Unavailable
from shardq.wire.slots import SLOTS
from shardq.wire.topology import NodeInfo, Shard, Topology
from shardq_node.runtime import Node
from shardq_node.settings import NodeSettings, StorageSettings
from shardq_operator.controller import Controller, ControllerSettings
from shardq_operator.store import MemoryStore

from ..helpers import eventually

NAMES = ["a", "b", "c"]


class Shard3:
    """Three members of shard ``s0`` and a controller."""

    def __init__(self, root: Path, **storage: Any) -> None:
        self.root = root
        self.storage = storage
        self.nodes: dict[str, Node] = {}
        self.ports: dict[str, int] = {}
        self.store: MemoryStore | None = None
        self.controller: Controller | None = None
        self._task: asyncio.Task[None] | None = None

    async def start_node(self, name: str) -> Node:
        settings = NodeSettings(
            name=name, port=self.ports.get(name, 0), http_port=0, failure_timeout=1.0,
            storage=StorageSettings(data_dir=str(self.root / name), **self.storage))
        node = Node(settings)
        await node.start()
        self.nodes[name] = node
        self.ports[name] = node.tcp_port
        return node

    async def stop_node(self, name: str) -> None:
        await self.nodes.pop(name).stop()

    async def start(self) -> None:
        for name in NAMES:
            await self.start_node(name)
        topo = Topology(
            epoch=1, nodes=[NodeInfo(n, f"127.0.0.1:{self.ports[n]}") for n in NAMES],
            owners=["s0"] * SLOTS,
            shards={"s0": Shard(members=list(NAMES), primary="a", term=1,
                                ids={n: self.nodes[n].membership.storage_id for n in NAMES})})
        self.store = MemoryStore(topo)
        self.controller = Controller(self.store, ControllerSettings(
            failure_timeout=1.0, heartbeat=0.05))
        await self.controller.publish(topo)
        self._task = asyncio.get_running_loop().create_task(self.controller.run())
        await eventually(lambda: self.caught_up("a"), 10, what="followers caught up")

    async def shard(self) -> Shard:
        assert self.store is not None
        _, topo = await self.store.read()
        assert topo is not None
        return topo.shards["s0"]

    def caught_up(self, primary: str) -> bool:
        node = self.nodes.get(primary)
        if node is None or node.replication.role != "primary":
            return False
        links = node.replication.links.values()
        return all(link.live and link.acked >= node.log.seq for link in links) and any(links)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.controller is not None:
            await self.controller.close()
        for node in list(self.nodes.values()):
            await node.stop()


@pytest.fixture
async def shard(tmp_path: Path) -> AsyncIterator[Shard3]:
    s = Shard3(tmp_path)
    await s.start()
    yield s
    await s.close()


async def conn(s: Shard3, name: str) -> Connection:
    return await Connection(f"127.0.0.1:{s.ports[name]}").open()


async def test_followers_hold_a_warm_copy_and_send_clients_to_the_primary(shard: Shard3) -> None:
    c = await conn(shard, "a")
    ids = [(await c.call({"cmd": "PUSH", "queue": "q", "data": {"i": i}}))["id"]
           for i in range(50)]
    await c.close()
    for name in ("b", "c"):
        node = shard.nodes[name]
        await eventually(lambda node=node: all(node.engine.has_job(i) for i in ids), 5,
                         what=f"{name} holds every pushed job")
        assert node.replication.role == "follower"
        f = await conn(shard, name)
        with pytest.raises(Moved) as refused:
            await f.call({"cmd": "PUSH", "queue": "q", "data": 1})
        assert refused.value.primary == "a"
        assert str(refused.value) == "MOVED 1 NOTPRIMARY a"
        await f.close()


async def test_a_push_is_answered_only_once_a_majority_holds_it(shard: Shard3) -> None:
    c = await conn(shard, "a")
    two = asyncio.ensure_future(c.call({"cmd": "PUSH", "queue": "q", "data": "two of three"}))
    await shard.stop_node("c")
    assert (await asyncio.wait_for(two, 5))["ok"] is True  # a and b: a majority
    await shard.stop_node("b")
    held = asyncio.ensure_future(c.call({"cmd": "PUSH", "queue": "q", "data": "held"}))
    done, _ = await asyncio.wait({held}, timeout=0.5)
    assert not done, "no follower holds it: the push must not be confirmed"
    assert shard.nodes["a"].log.durable >= shard.nodes["a"].log.seq  # on the primary's disk
    # once the quorum has been gone for failure_timeout (1 s), what waits for it is told
    # that it may or may not have happened, and new writes are refused outright
    with pytest.raises(Unavailable, match=r"has no quorum \(the write may have been applied\)"):
        await asyncio.wait_for(held, 5)
    refused = await conn(shard, "a")
    with pytest.raises(Unavailable, match=r"^Unavailable: shard s0 has no quorum$"):
        await refused.call({"cmd": "PUSH", "queue": "q", "data": "refused"})
    assert (await shard.shard()).primary == "a", "no failover without a majority to elect"
    await shard.start_node("b")  # one follower back: two of three again
    answer = await eventually(lambda: _push_ok(refused), 10, what="writes accepted again")
    follower = shard.nodes["b"].engine
    assert follower.has_job(answer["id"])
    held_jobs = [j for j in follower.live_jobs() if j.data == b'"held"']
    assert len(held_jobs) == 1, "the unconfirmed push was applied after all (as it was told)"
    assert not [j for j in follower.live_jobs() if j.data == b'"refused"']
    await c.close()
    await refused.close()


async def _push_ok(c: Connection) -> dict[str, Any] | None:
    try:
        return await c.call({"cmd": "PUSH", "queue": "q", "data": "back"})
    except Unavailable:
        return None


async def test_failover_keeps_every_acknowledged_job_and_the_workers_lease(shard: Shard3) -> None:
    c = await conn(shard, "a")
    ids = [(await c.call({"cmd": "PUSH", "queue": "q", "data": {"i": i}}))["id"]
           for i in range(20)]
    pulled = (await c.call({"cmd": "PULL", "queue": "q"}))["job"]
    await c.close()
    started = time.monotonic()
    await shard.stop_node("a")
    new = await eventually(_new_primary(shard, "a"), 10, what="a new primary")
    took = time.monotonic() - started
    n = await conn(shard, new)
    for job_id in ids:
        job = (await n.call({"cmd": "GETJOB", "id": job_id}))["job"]
        assert job is not None, f"job {job_id} was acknowledged and is gone"
    assert (await n.call({"cmd": "GETJOB", "id": pulled["id"]}))["job"]["state"] == "active"
    ack = await n.call({"cmd": "ACK", "id": pulled["id"], "lease": pulled["started_at"]})
    assert ack == {"ok": True}
    assert (await n.call({"cmd": "PUSH", "queue": "q", "data": "after"}))["ok"]
    await n.close()
    assert (await shard.shard()).term == 2
    print(f"\nfailover: {new} primary in term 2, {took:.2f}s after the primary stopped")


def _new_primary(shard: Shard3, old: str) -> Any:
    async def found() -> str | None:
        sh = await shard.shard()
        if sh.primary and sh.primary != old and shard.nodes[sh.primary].replication.role \
                == "primary":
            return sh.primary
        return None

    return found


async def test_the_old_primary_cuts_its_unconfirmed_tail_when_it_returns(shard: Shard3) -> None:
    c = await conn(shard, "a")
    kept = (await c.call({"cmd": "PUSH", "queue": "q", "data": "kept"}))["id"]
    await shard.stop_node("b")
    await shard.stop_node("c")
    lost = asyncio.ensure_future(c.call({"cmd": "PUSH", "queue": "q", "data": "never confirmed"}))
    await asyncio.wait({lost}, timeout=0.3)
    tail_id = max(j.id for j in shard.nodes["a"].engine.live_jobs())
    assert tail_id != kept and not lost.done()
    await shard.stop_node("a")  # its tail: on its disk, on no follower
    with pytest.raises((ShardqError, OSError)):
        await lost
    await c.close()
    await shard.start_node("b")
    await shard.start_node("c")
    new = await eventually(_new_primary(shard, "a"), 15, what="b or c made primary")
    await shard.start_node("a")
    old = shard.nodes["a"]
    await eventually(lambda: old.replication.role == "follower"
                     and old.engine.terms == shard.nodes[new].engine.terms
                     and old.log.seq == shard.nodes[new].log.seq, 10,
                     what="a follows the new primary's log (its term 2 included)")
    assert old.engine.has_job(kept)
    assert not old.engine.has_job(tail_id), "the unconfirmed push must be cut, not kept"
    assert old.engine.terms == shard.nodes[new].engine.terms


async def test_a_wiped_member_comes_back_as_a_learner_and_catches_up(tmp_path: Path) -> None:
    s = Shard3(tmp_path, segment_bytes=16 * 1024, snapshot_bytes=32 * 1024)
    await s.start()
    try:
        c = await conn(s, "a")
        for i in range(400):
            await c.call({"cmd": "PUSH", "queue": "q", "data": {"i": i, "pad": "x" * 200}})
        await c.close()
        primary = s.nodes["a"]
        await eventually(lambda: primary.storage is not None
                         and primary.storage.retained_from() > 1, 10,
                         what="the primary snapshotted and dropped its oldest segments")
        await s.stop_node("c")
        shutil.rmtree(tmp_path / "c")
        await s.start_node("c")
        learner = s.nodes["c"]

        async def made_learner() -> bool:
            return "c" in (await s.shard()).learners

        async def member_again() -> bool:
            sh = await s.shard()
            return "c" in sh.members and sh.ids["c"] == learner.membership.storage_id

        await eventually(made_learner, 10, what="c demoted to a learner (new storage id)")
        await eventually(member_again, 20, what="c caught up and made a member again")
        assert learner.engine.job_count() == primary.engine.job_count() == 400
        assert learner.recovery is not None and learner.recovery.snapshot is not None
    finally:
        await s.close()
