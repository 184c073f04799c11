"""Issue 13, breaks 3 to 6: what a client could do to a node, reproduced and shown closed.

Each test does what the report did (a client token running internal commands,
running out of file descriptors, the three lease gaps, input that grew a node
without a limit) against real nodes and gateways on loopback, and checks that
the refusal is clear, that nothing was lost, and that the node keeps serving.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shardq.node.runtime import Node
from shardq.node.settings import NodeSettings
from shardq.operator.local import LocalCluster

from .cluster import node_call
from .helpers import RawClient, free_port

INTERNAL_REQUESTS: list[dict[str, Any]] = [
    {"cmd": "DROPSLOTS", "slots": [0]},
    {"cmd": "EXPORT", "slots": [0]},
    {"cmd": "IMPORT", "slots": [0], "records": []},
    {"cmd": "SETTOPOLOGY", "topology": {"epoch": 99, "nodes": [], "owners": [], "moving": {}}},
]


async def authed(port: int, token: str) -> RawClient:
    client = await RawClient.connect(port)
    assert await client.call({"cmd": "AUTH", "token": token}) == {"ok": True}
    return client


# -- break 3: cluster commands only with the cluster token -------------------------------------


async def test_a_client_token_never_runs_internal_commands(make_node: Any) -> None:
    """The report: with ``--token`` and no ``--cluster-token`` an authenticated client ran
    DROPSLOTS, EXPORT and IMPORT and wiped a slot. Now each is refused, naming why."""
    node: Node = await make_node(NodeSettings(port=0, http_port=0, tokens=("client",)))
    client = await authed(node.tcp_port, "client")
    try:
        pushed = await client.call({"cmd": "PUSH", "queue": "precious", "data": 1})
        for req in [*INTERNAL_REQUESTS, {"cmd": "DROPSLOTS", "slots": list(range(1024))}]:
            answer = await client.call(req)
            assert answer["ok"] is False, req
            assert answer["error"] == (
                f"Authentication required: {req['cmd']} is an internal command and this node "
                "has client tokens but no cluster token (--cluster-token), so it runs no "
                "internal command")
        job = await client.call({"cmd": "GETJOB", "id": pushed["id"]})
        assert job["job"]["state"] == "waiting"  # the slot was not wiped
        assert (await client.call({"cmd": "STATS"}))["queued"] == 1
    finally:
        await client.close()


async def test_with_a_cluster_token_only_it_runs_internal_commands(make_node: Any) -> None:
    node: Node = await make_node(NodeSettings(port=0, http_port=0, tokens=("client",),
                                              cluster_token="cluster"))
    client = await authed(node.tcp_port, "client")
    try:
        for req in INTERNAL_REQUESTS:
            answer = await client.call(req)
            assert answer == {"ok": False, "error": f"Authentication required: {req['cmd']} "
                              "is an internal command: AUTH with the cluster token"}
    finally:
        await client.close()
    exported = await node_call(node.tcp_port, {"cmd": "EXPORT", "slots": [0]}, "cluster")
    assert exported["ok"] is True
    # the cluster token is a client credential too (the rebalancer reads TOPOLOGY with it)
    assert (await node_call(node.tcp_port, {"cmd": "STATS"}, "cluster"))["ok"] is True


async def test_a_node_without_any_token_stays_open(make_node: Any) -> None:
    """No token of either kind: a node that trusts its network (documented)."""
    node: Node = await make_node()
    assert (await node_call(node.tcp_port, {"cmd": "EXPORT", "slots": [0]}))["ok"] is True


def _cmdlines() -> list[bytes]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    out.append(f.read())
            except OSError:
                continue
    return out


async def test_shardq_up_with_a_token_gives_the_nodes_a_cluster_token_no_client_has(
        tmp_path: Path) -> None:
    """``shardq up --token`` used to start nodes whose client token doubled as the cluster
    token. Now it generates one for the nodes and the rebalancer; the gateway and clients
    only have the client token, and no token is on a command line."""
    port = free_port()
    cluster = LocalCluster("127.0.0.1", port, 0, str(tmp_path / "data"), "never",
                           tokens=("client",))
    try:
        await cluster.start(2)
        gateway = await authed(port, "client")
        pushed = await gateway.call({"cmd": "PUSH", "queue": "q", "data": 1})
        assert pushed["ok"] is True
        for node in cluster.nodes:
            answer = await node_call(node.port, {"cmd": "DROPSLOTS", "slots": [0]}, "client")
            assert answer["error"].startswith("Authentication required: DROPSLOTS is an "
                                              "internal command: AUTH with the cluster token")
        topo = await cluster.scale(3, lambda done, total: None)  # slot moves still work
        assert len(topo.nodes) == 3 and not topo.moving
        pulled = await gateway.call({"cmd": "PULL", "queue": "q", "timeout": 1000})
        assert pulled["job"]["id"] == pushed["id"]
        await gateway.close()
        assert cluster.cluster_token not in "".join(map(repr, _cmdlines()))
        assert not any(b"client" in line.split(b"\0") for line in _cmdlines())
    finally:
        await cluster.stop()
