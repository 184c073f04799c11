"""Messages between nodes: the watch protocol of dependencies across slots.

After every batch the runtime calls ``Peers.pump``: messages whose other end
is a slot this node serves are applied at once (dependencies.settle); the rest
are sent to the owning node, one task per message, retried every second until
the owner acknowledges (``MOVED``, ``TRYAGAIN`` or an unreachable node just
mean "later": the coordinator publishes the topology that makes it work).

Must not: block the loop, or decide anything a record does not carry.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Protocol

from shardq.connection import Connection
from shardq.errors import ShardqError
from shardq.wire.slots import SLOTS

from .dependencies import settle

if TYPE_CHECKING:
    from .cluster import Cluster
    from .engine import Engine
    from .replication import Replication
    from .settings import NodeSettings

log = logging.getLogger("shardq_node.peers")

RETRY_S = 1.0


class PeersHost(Protocol):
    """What the watch protocol needs of its node (the runtime is one)."""

    @property
    def settings(self) -> NodeSettings: ...

    @property
    def engine(self) -> Engine: ...

    @property
    def cluster(self) -> Cluster: ...

    @property
    def replication(self) -> Replication: ...

    @property
    def log(self) -> Any: ...

    def after_batch(self) -> None: ...


class Peers:
    def __init__(self, node: PeersHost) -> None:
        self.node = node
        self.conns: dict[str, Connection] = {}
        self.inflight: set[tuple[str, int, int]] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        # a client token only gets the node's clear refusal of WATCH/PARENTEND back
        self.token = node.settings.cluster_token or (node.settings.tokens[0]
                                                     if node.settings.tokens else None)

    def pump(self) -> None:
        engine = self.node.engine
        deps = engine.deps
        if not deps.to_watch and not deps.outbox:
            return
        watches, ends = settle(engine, self.node.cluster.serves)
        for parent, child in watches:
            self._start("WATCH", parent, child, None)
        for parent, child, state in ends:
            self._start("PARENTEND", parent, child, state)

    def _start(self, kind: str, parent: int, child: int, state: str | None) -> None:
        key = (kind, parent, child)
        if key in self.inflight:
            return
        self.inflight.add(key)
        task = asyncio.get_running_loop().create_task(self._send(kind, parent, child, state))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, kind: str, parent: int, child: int, state: str | None) -> None:
        target_slot = parent % SLOTS if kind == "WATCH" else child % SLOTS
        req: dict[str, Any] = {"cmd": kind, "parent": parent, "child": child}
        if state is not None:
            req["state"] = state
        try:
            while True:
                answer = await self._call(target_slot, req)
                if answer is not None:
                    break
                await asyncio.sleep(RETRY_S)
                if not self._still_wanted(kind, parent, child):
                    return
        finally:
            self.inflight.discard((kind, parent, child))
        if not self.node.replication.writable:
            return  # no longer the primary: the new one says it again (deps.rebuild)
        engine = self.node.engine
        if kind == "WATCH":
            engine.deps.to_watch.discard((parent, child))
            if answer.get("state", "pending") != "pending":
                engine.parent_end(parent, child, answer["state"])
        else:
            engine.notified(parent, child)
        self.node.after_batch()

    def _still_wanted(self, kind: str, parent: int, child: int) -> bool:
        deps = self.node.engine.deps
        if kind == "WATCH":
            return (parent, child) in deps.to_watch
        return (parent, child) in deps.outbox

    async def _call(self, slot: int, req: dict[str, Any]) -> dict[str, Any] | None:
        topo = self.node.cluster.topology
        if topo is None or self.node.log.failed is not None:
            return None
        owner = topo.node(topo.owners[slot])
        if owner is None or owner.name == self.node.settings.name:
            return None  # ours after all (a move is landing): the next pump applies it
        conn = self.conns.get(owner.name)
        try:
            if conn is None or conn.closed or conn.address != owner.tcp:
                conn = self.conns[owner.name] = await Connection(owner.tcp, self.token).open(5)
            return await asyncio.wait_for(conn.call(req), 10)
        except (TimeoutError, ShardqError, OSError) as exc:
            log.debug("%s to %s: %s; will retry", req["cmd"], owner.name, exc)
            self.conns.pop(owner.name, None)
            return None

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for conn in self.conns.values():
            await conn.close()
