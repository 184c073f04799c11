"""Test helpers for clusters: in-process nodes on loopback and a router by topology."""

from __future__ import annotations

from typing import Any

from shardq.connection import Connection
from shardq.node.runtime import Node
from shardq.node.settings import NodeSettings, StorageSettings
from shardq.slots import slot_of
from shardq.topology import NodeInfo, Topology


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
