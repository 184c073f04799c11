"""Issue 13, breaks 3 to 6: what a client could do to a node, reproduced and shown closed.

Each test does what the report did (a client token running internal commands,
running out of file descriptors, the three lease gaps, input that grew a node
without a limit) against real nodes and gateways on loopback, and checks that
the refusal is clear, that nothing was lost, and that the node keeps serving.
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shardq.node.runtime import Node
from shardq.node.settings import NodeSettings
from shardq.operator.local import LocalCluster

from .cluster import node_call
from .helpers import RawClient, free_port, wait_port

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


# -- break 4: storage failures, running out of file descriptors ---------------------------------

NOFILE = 64
BLOB = "b" * 100_000  # above the 64 KiB blob threshold: written to the blob store


async def poll(check: Callable[[], Awaitable[bool]], timeout: float,
               interval: float = 0.05) -> float:
    """Await ``check`` until it is true; the seconds that took (TimeoutError past ``timeout``)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not await check():
        if loop.time() - started > timeout:
            raise TimeoutError(f"not true after {timeout} s")
        await asyncio.sleep(interval)
    return loop.time() - started


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _low_nofile() -> None:  # in the child, before exec
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, hard))


@pytest.fixture
def low_fd_node(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """``shardq node`` as a process whose soft limit is NOFILE descriptors."""
    port = free_port()
    cmd = [sys.executable, "-m", "shardq.cli", "node", "--port", str(port), "--http-port", "0",
           "--data-dir", str(tmp_path / "data"), "--fsync", "always"]
    with open(tmp_path / "node.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_low_nofile)
    try:
        wait_port(port, proc=proc)
        yield port, proc
    finally:
        proc.kill()
        proc.wait()


async def test_after_emfile_ends_writes_are_accepted_again_within_5_s(
        low_fd_node: tuple[int, subprocess.Popen[bytes]]) -> None:
    """The report: under ``--nofile 256`` a blob push failed with EMFILE, the job was counted
    anyway, and the node stayed read-only after the descriptors were free (the reload after
    the failure failed with EMFILE too, before the retry was scheduled)."""
    port, proc = low_fd_node
    pusher = await RawClient.connect(port)
    first = await pusher.call({"cmd": "PUSH", "queue": "q", "data": BLOB})
    assert first["ok"] is True
    idle = []
    for _ in range(NOFILE + 16):  # more than the node can accept: it runs out of descriptors
        idle.append(await RawClient.connect(port))
    await poll(lambda: _true(open_fds(proc.pid) >= NOFILE - 1), 5)
    failed = await pusher.call({"cmd": "PUSH", "queue": "q", "data": BLOB})
    assert failed == {"ok": False, "error": "Storage failed: write to blob store failed: "
                      "Too many open files"}
    stats = await pusher.call({"cmd": "STATS"})  # reads are served meanwhile
    assert stats["storage_failed"] is True and stats["jobs"] == 1
    metrics = await pusher.call({"cmd": "METRICS"})
    assert metrics["metrics"]["total_pushed"] == 1  # the job whose blob failed never counted
    for client in idle:
        await client.close()

    async def accepted() -> bool:
        answer = await pusher.call({"cmd": "PUSH", "queue": "q", "data": BLOB})
        if answer["ok"]:
            accepted.id = answer["id"]  # type: ignore[attr-defined]
            return True
        assert answer["error"].startswith("Storage failed: "), answer
        return False

    took = await poll(accepted, 5.0, interval=0.1)
    print(f"\nwrites accepted again {took:.2f} s after the descriptors were free")
    stats = await pusher.call({"cmd": "STATS"})
    assert stats["storage_failed"] is False and stats["jobs"] == 2 and stats["blobs"] == 2
    metrics = await pusher.call({"cmd": "METRICS"})
    assert metrics["metrics"]["total_pushed"] == 2
    pulled = await pusher.call({"cmd": "PULLB", "queue": "q", "count": 10, "timeout": 0})
    assert [j["id"] for j in pulled["jobs"]] == [first["id"], accepted.id]  # type: ignore
    assert all(j["data"] == BLOB for j in pulled["jobs"])
    await pusher.close()


async def _true(value: bool) -> bool:
    return value
