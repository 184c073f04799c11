"""Test helpers for clusters: in-process nodes on loopback, a router by topology, gateways.

``Cluster.start(3)`` starts three nodes in-process (``Node(NodeSettings(name=…,
port=0, http_port=0))``), builds ``topology.initial`` over them and publishes it
with ``SETTOPOLOGY``. ``freeze``/``move_slot`` play the coordinator's part of a
slot move by hand (a gateway in front is not told), and ``start_gateway`` runs a
gateway in front of the nodes.
"""

from __future__ import annotations

import secrets
from typing import Any

from shardq.connection import Connection
from shardq.wire.slots import slot_of
from shardq.wire.topology import NodeInfo, Topology
from shardq_gateway.main import Gateway
from shardq_gateway.settings import GatewaySettings
from shardq_node.runtime import Node
from shardq_node.settings import NodeSettings, StorageSettings
from shardq_operator.ring import initial

from .helpers import RawClient


async def start_nodes(names: list[str], data_root: Any = None) -> list[Node]:
    nodes = []
    for name in names:
        storage = StorageSettings(data_dir=str(data_root / name) if data_root else None)
        node = Node(NodeSettings(name=name, port=0, http_port=0, storage=storage))
        await node.start()
        nodes.append(node)
    return nodes


def infos(nodes: list[Node]) -> list[NodeInfo]:
    return [NodeInfo(n.settings.name, f"127.0.0.1:{n.tcp_port}") for n in nodes]


class Direct:
    """Sends each request to the node that owns it, by a topology (no gateway)."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = {n.settings.name: n for n in nodes}
        self.conns: dict[str, Connection] = {}
        self.topology: Topology | None = None

    def add(self, node: Node) -> None:
        self.nodes[node.settings.name] = node

    async def conn(self, name: str) -> Connection:
        conn = self.conns.get(name)
        if conn is None or conn.closed:
            node = self.nodes[name]
            conn = self.conns[name] = await Connection(f"127.0.0.1:{node.tcp_port}").open()
        return conn

    def owner(self, req: dict[str, Any]) -> str:
        node = next(iter(self.nodes.values()))
        topo = node.cluster.topology
        assert topo is not None
        if "queue" in req:
            return topo.owners[slot_of(req["queue"])]
        return topo.owners[req["id"] % 1024]

    async def call(self, req: dict[str, Any]) -> dict[str, Any]:
        conn = await self.conn(self.owner(req))
        return await conn.call(req)

    async def close(self) -> None:
        for conn in self.conns.values():
            await conn.close()


async def node_call(port: int, req: dict[str, Any], token: str | None = None) -> Any:
    """One request on a fresh connection to a node (after AUTH when a token is given)."""
    client = await RawClient.connect(port)
    try:
        if token is not None:
            answer = await client.call({"cmd": "AUTH", "token": token})
            assert answer["ok"], answer
        return await client.call(req)
    finally:
        await client.close()


class Cluster:
    def __init__(self, nodes: list[Node], token: str | None) -> None:
        self.nodes = nodes
        self.token = token
        self.stopped: set[str] = set()
        self.topology = initial([
            NodeInfo(n.settings.name, f"127.0.0.1:{n.tcp_port}") for n in nodes
        ])

    @classmethod
    async def start(cls, count: int = 3, tokens: tuple[str, ...] = (),
                    cluster_token: str | None = None) -> Cluster:
        if tokens and cluster_token is None:  # client tokens never run internal commands
            cluster_token = "cluster-" + secrets.token_hex(8)
        nodes = []
        for i in range(count):
            node = Node(NodeSettings(name=f"node-{i}", port=0, http_port=0, tokens=tokens,
                                     cluster_token=cluster_token))
            await node.start()
            nodes.append(node)
        cluster = cls(nodes, cluster_token)
        await cluster.publish(cluster.topology)
        return cluster

    async def stop(self) -> None:
        for node in self.nodes:
            await self.stop_node(node.settings.name)

    async def stop_node(self, name: str) -> None:
        if name not in self.stopped:
            self.stopped.add(name)
            await self.node(name).stop()

    # -- lookups ----------------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.settings.name == name)

    def owner_of_queue(self, queue: str) -> Node:
        return self.node(self.topology.owner_of_queue(queue))

    def seeds(self) -> list[str]:
        return [f"127.0.0.1:{n.tcp_port}" for n in self.nodes]

    def queues_on(self, name: str, prefix: str = "") -> list[str]:
        """Queue names of ``prefix`` that the topology puts on node ``name``."""
        return [f"{prefix}{i}" for i in range(400)
                if self.topology.owner_of_queue(f"{prefix}{i}") == name]

    async def call(self, name: str, req: dict[str, Any]) -> Any:
        return await node_call(self.node(name).tcp_port, req, self.token)

    # -- the coordinator's part -------------------------------------------------------------------

    async def publish(self, topo: Topology, first: str | None = None) -> None:
        """SETTOPOLOGY on every running node (``first`` before the others)."""
        self.topology = topo
        names = [n.settings.name for n in self.nodes if n.settings.name not in self.stopped]
        if first is not None:
            names.sort(key=lambda name: name != first)
        for name in names:
            answer = await self.call(name, {"cmd": "SETTOPOLOGY", "topology": topo.wire()})
            assert answer["ok"], answer

    async def freeze(self, slot: int, to: str) -> None:
        """Publish ``moving[slot]``: its owner answers TRYAGAIN for it from now on."""
        topo = self.topology.copy()
        topo.moving[slot] = {"from": topo.owners[slot], "to": to}
        topo.epoch += 1
        await self.publish(topo)

    async def move_slot(self, slot: int, to: str) -> None:
        """EXPORT from the owner, IMPORT into ``to``, publish the new owner, DROPSLOTS."""
        src = self.topology.owners[slot]
        exported = await self.call(src, {"cmd": "EXPORT", "slots": [slot]})
        assert exported["ok"], exported
        imported = await self.call(to, {"cmd": "IMPORT", "slots": [slot],
                                        "records": exported["records"]})
        assert imported["ok"], imported
        topo = self.topology.copy()
        topo.owners[slot] = to
        topo.moving.pop(slot, None)
        topo.epoch += 1
        await self.publish(topo, first=to)
        dropped = await self.call(src, {"cmd": "DROPSLOTS", "slots": [slot]})
        assert dropped["ok"], dropped

    async def add_node(self) -> Node:
        """Start one more node and publish a topology that names it (it owns no slot yet)."""
        node = Node(NodeSettings(name=f"node-{len(self.nodes)}", port=0, http_port=0,
                                 tokens=self.nodes[0].settings.tokens,
                                 cluster_token=self.nodes[0].settings.cluster_token))
        await node.start()
        self.nodes.append(node)
        topo = self.topology.copy()
        topo.nodes.append(NodeInfo(node.settings.name, f"127.0.0.1:{node.tcp_port}"))
        topo.epoch += 1
        await self.publish(topo)
        return node

    def other_than(self, name: str) -> str:
        return next(n.settings.name for n in self.nodes if n.settings.name != name)


async def start_gateway(cluster: Cluster, **settings: Any) -> Gateway:
    """A gateway on a free loopback port in front of ``cluster`` (stop it with ``stop()``)."""
    settings.setdefault("seeds", cluster.seeds())
    gateway = Gateway(GatewaySettings(port=0, http_port=0, **settings))
    await gateway.start()
    return gateway


def blocked_pulls(node: Node, queue: str) -> int:
    """How many PULLs wait on ``queue`` at ``node`` now (its blocked-pull waiters)."""
    return len(node.pulls.waiters.get(queue, ()))


def subscribers(node: Node, queue: str) -> int:
    """How many connections are subscribed to ``queue``'s events at ``node`` now."""
    return len(node.events.subscribers.get(queue, ()))


def answered(node: Node, cmd: str) -> int:
    """How many ``cmd`` requests ``node`` has answered (its ``shardq_requests_total``)."""
    return node.requests.get(cmd, 0)


def slot_on(cluster: Cluster, prefix: str, name: str) -> tuple[str, int]:
    """A queue whose slot the topology puts on node ``name``, and that slot."""
    queue = cluster.queues_on(name, prefix)[0]
    return queue, slot_of(queue)
