"""Issue 13, breaks 3 to 6: what a client could do to a node, reproduced and shown closed.

Each test does what the report did (a client token running internal commands,
running out of file descriptors, the three lease gaps, input that grew a node
without a limit) against real nodes and gateways on loopback, and checks that
the refusal is clear, that nothing was lost, and that the node keeps serving.
"""

from __future__ import annotations

import gc
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from shardq.wire.protocol import JobSpec
from shardq_gateway.main import Gateway
from shardq_gateway.settings import GatewaySettings
from shardq_node.engine import Engine
from shardq_node.engine_config import EngineConfig
from shardq_node.runtime import Node
from shardq_node.settings import NodeSettings
from shardq_operator.local import LocalCluster

from ..cluster import Cluster, node_call, start_gateway
from ..helpers import FakeClock, RawClient, eventually, free_port, wait_port

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
    client = await authed(node.tcp_port, "cluster")
    assert await client.call({"cmd": "AUTH", "token": "client"}) == {"ok": True}
    assert (await client.call(INTERNAL_REQUESTS[0]))["ok"] is False  # rights of the last AUTH
    await client.close()
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
    """Await ``check`` until it is true (``eventually``); the seconds that took."""
    started = time.monotonic()
    await eventually(check, timeout, interval)
    return time.monotonic() - started


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
    await poll(lambda: _true(open_fds(proc.pid) >= NOFILE), 5)  # every descriptor taken
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


# -- break 5: lease gaps ---------------------------------------------------------------------------

LEASE_MS = 200  # the jobs' timeout: their lease ends fast, and the job goes to the next worker


@pytest.fixture
async def two_nodes() -> AsyncIterator[tuple[Cluster, Gateway]]:
    """Two nodes and a gateway with one shared connection per node: every client's requests
    reach a node on the same connection, the case where a node cannot tell clients apart."""
    cluster = await Cluster.start(2)
    gateway = await start_gateway(cluster, upstream_connections=1)
    yield cluster, gateway
    await gateway.stop()
    await cluster.stop()


async def redelivered(worker: RawClient, queue: str, count: int = 1) -> list[dict[str, Any]]:
    """The jobs of ``queue`` once their lease timed out and ``worker`` pulled them."""
    got: list[dict[str, Any]] = []

    async def pulled() -> bool:
        answer = await worker.call({"cmd": "PULL", "queue": queue, "timeout": 0})
        if answer["job"] is not None:
            got.append(answer["job"])
        return len(got) == count

    await poll(pulled, 5.0)
    return got


async def test_a_lease_less_ack_settles_only_the_attempt_its_connection_holds(
        make_node: Any) -> None:
    """5a, on a node: job N timed out at worker A and went to worker B; A's ACK without a
    lease completed it with A's result, and B's ACK got ``Job N not found``."""
    node: Node = await make_node()
    a, b = await RawClient.connect(node.tcp_port), await RawClient.connect(node.tcp_port)
    try:
        job_id = (await a.call({"cmd": "PUSH", "queue": "q", "data": 1,
                                "timeout": LEASE_MS}))["id"]
        first = await a.call({"cmd": "PULL", "queue": "q", "timeout": 0})
        assert first["job"]["id"] == job_id
        (second,) = await redelivered(b, "q")
        assert second["id"] == job_id and second["attempts"] == 1
        stale = f"Lease expired for job {job_id}"
        for req in ({"cmd": "ACK", "id": job_id, "result": "A"},
                    {"cmd": "FAIL", "id": job_id, "error": "A gave up"},
                    {"cmd": "PROGRESS", "id": job_id, "progress": 5, "message": "A"},
                    {"cmd": "TOUCH", "id": job_id},
                    {"cmd": "ACK", "id": job_id, "lease": first["job"]["started_at"]}):
            assert await a.call(req) == {"ok": False, "error": stale}, req
        assert await a.call({"cmd": "ACKB", "ids": [job_id]}) == {"ok": True, "ids": [0]}
        assert (await b.call({"cmd": "PROGRESS", "id": job_id, "progress": 50}))["ok"] is True
        assert await b.call({"cmd": "ACK", "id": job_id, "result": "B"}) == {"ok": True}
        assert await a.call({"cmd": "GETRESULT", "id": job_id}) == {
            "ok": True, "id": job_id, "result": "B"}
    finally:
        await a.close()
        await b.close()


async def test_through_a_gateway_a_lease_less_ack_settles_only_its_clients_attempt(
        two_nodes: tuple[Cluster, Gateway]) -> None:
    """5a through a gateway: A and B reach the node on one shared connection, so the node
    alone cannot tell them apart; the gateway sends the lease token it recorded for each."""
    _, gateway = two_nodes
    a, b = await RawClient.connect(gateway.port), await RawClient.connect(gateway.port)
    try:
        job_id = (await a.call({"cmd": "PUSH", "queue": "q", "data": 1,
                                "timeout": LEASE_MS}))["id"]
        assert (await a.call({"cmd": "PULL", "queue": "q", "timeout": 0}))["job"]["id"] == job_id
        (second,) = await redelivered(b, "q")
        assert second["id"] == job_id
        stale = {"ok": False, "error": f"Lease expired for job {job_id}"}
        assert await a.call({"cmd": "PROGRESS", "id": job_id, "progress": 9}) == stale
        assert await a.call({"cmd": "TOUCH", "id": job_id}) == stale
        assert await a.call({"cmd": "ACK", "id": job_id, "result": "A"}) == stale
        c = await RawClient.connect(gateway.port)  # never pulled it at all
        assert await c.call({"cmd": "FAIL", "id": job_id}) == stale
        await c.close()
        assert await b.call({"cmd": "ACK", "id": job_id, "result": "B"}) == {"ok": True}
        assert (await a.call({"cmd": "GETRESULT", "id": job_id}))["result"] == "B"
        # a blocking PULL (the gateway's own connection to the node) is recorded too
        job_id = (await a.call({"cmd": "PUSH", "queue": "q", "data": 2}))["id"]
        assert (await a.call({"cmd": "PULL", "queue": "q"}))["job"]["id"] == job_id
        assert (await b.call({"cmd": "ACK", "id": job_id}))["ok"] is False
        assert await a.call({"cmd": "ACK", "id": job_id}) == {"ok": True}
    finally:
        await a.close()
        await b.close()


async def test_over_http_a_lease_less_ack_settles_what_http_pulled(
        two_nodes: tuple[Cluster, Gateway], make_node: Any) -> None:
    """HTTP has no connection: HTTP clients of one node (or one gateway) are one holder
    (docs/decisions.md). They settle what HTTP pulled, never a TCP worker's attempt."""
    import aiohttp

    cluster, _ = two_nodes
    gateway = Gateway(GatewaySettings(port=0, http_port=free_port(), seeds=cluster.seeds()))
    await gateway.start()
    node: Node = await make_node(NodeSettings(port=0, http_port=free_port()))
    try:
        async with aiohttp.ClientSession() as http:
            for tcp_port, http_port in ((node.tcp_port, node.http_port),
                                        (gateway.port, gateway.http_port)):
                base = f"http://127.0.0.1:{http_port}"
                tcp = await RawClient.connect(tcp_port)
                ids = [(await tcp.call({"cmd": "PUSH", "queue": "h", "data": n}))["id"]
                       for n in range(2)]
                async with http.get(f"{base}/queues/h/jobs", params={"timeout": 1000}) as r:
                    assert [j["id"] for j in (await r.json())["data"]] == ids[:1]
                assert (await tcp.call({"cmd": "PULL", "queue": "h"}))["job"]["id"] == ids[1]
                async with http.post(f"{base}/jobs/{ids[1]}/ack") as r:
                    assert r.status == 409  # a TCP worker holds it
                async with http.post(f"{base}/jobs/{ids[0]}/ack", json={"result": 7}) as r:
                    assert r.status == 200, await r.text()
                assert (await tcp.call({"cmd": "ACK", "id": ids[1]}))["ok"] is True
                await tcp.close()
    finally:
        await gateway.stop()


async def test_release_is_only_for_the_holder(make_node: Any) -> None:
    """5b: a third connection released a job A held, B pulled it, and two workers held it.
    RELEASE now hands back only the caller's attempts (its connection's, or the ones its
    lease tokens name); the cluster token may release any."""
    node: Node = await make_node(NodeSettings(port=0, http_port=0, tokens=("client",),
                                              cluster_token="cluster"))
    a, b, c = [await authed(node.tcp_port, "client") for _ in range(3)]
    try:
        job_id = (await a.call({"cmd": "PUSH", "queue": "q", "data": 1}))["id"]
        job = (await a.call({"cmd": "PULL", "queue": "q", "timeout": 0}))["job"]
        assert await c.call({"cmd": "RELEASE", "ids": [job_id]}) == {"ok": True, "ids": [0]}
        assert await c.call({"cmd": "RELEASE", "ids": [job_id], "leases": [job["started_at"] + 1]}
                            ) == {"ok": True, "ids": [0]}
        assert (await c.call({"cmd": "GETJOB", "id": job_id}))["job"]["state"] == "active"
        assert (await b.call({"cmd": "PULL", "queue": "q", "timeout": 0}))["job"] is None
        assert await a.call({"cmd": "RELEASE", "ids": [job_id]}) == {"ok": True, "ids": [1]}
        again = (await b.call({"cmd": "PULL", "queue": "q", "timeout": 0}))["job"]
        assert again["id"] == job_id  # handed back by its holder: now B's, and only B's
        assert await a.call({"cmd": "ACK", "id": job_id}) == {
            "ok": False, "error": f"Lease expired for job {job_id}"}
        admin = await authed(node.tcp_port, "cluster")
        assert await admin.call({"cmd": "RELEASE", "ids": [job_id]}) == {"ok": True, "ids": [1]}
        await admin.close()
    finally:
        for client in (a, b, c):
            await client.close()


async def test_through_a_gateway_release_is_only_for_the_holder_and_leaving_still_releases(
        two_nodes: tuple[Cluster, Gateway]) -> None:
    _, gateway = two_nodes
    a, c = await RawClient.connect(gateway.port), await RawClient.connect(gateway.port)
    job_id = (await a.call({"cmd": "PUSH", "queue": "q", "data": 1}))["id"]
    assert (await a.call({"cmd": "PULL", "queue": "q", "timeout": 0}))["job"]["id"] == job_id
    assert await c.call({"cmd": "RELEASE", "ids": [job_id]}) == {"ok": True, "ids": [0]}
    assert (await c.call({"cmd": "STATS"}))["processing"] == 1
    await a.close()  # the gateway releases what A held on A's behalf

    async def waiting_again() -> bool:
        return bool((await c.call({"cmd": "STATS"}))["queued"] == 1)

    await poll(waiting_again, 5.0)
    assert (await c.call({"cmd": "PULL", "queue": "q", "timeout": 0}))["job"]["id"] == job_id
    await c.close()


async def test_split_ackb_and_release_carry_their_leases_to_every_node(
        two_nodes: tuple[Cluster, Gateway]) -> None:
    """5c: ACKB through the gateway across two nodes dropped ``leases``: a stale ACKB was
    honoured there and the valid one refused. Each node now gets its ids' tokens (and
    results)."""
    cluster, gateway = two_nodes
    queues = [cluster.queues_on(n.settings.name, "split-")[0] for n in cluster.nodes]
    a, b = await RawClient.connect(gateway.port), await RawClient.connect(gateway.port)
    try:
        ids = [(await a.call({"cmd": "PUSH", "queue": q, "data": q, "timeout": LEASE_MS}))["id"]
               for q in queues]
        stale = [(await a.call({"cmd": "PULL", "queue": q, "timeout": 0}))["job"]["started_at"]
                 for q in queues]
        current = [(await redelivered(b, q))[0]["started_at"] for q in queues]
        assert await a.call({"cmd": "ACKB", "ids": ids, "leases": stale,
                             "results": ["A", "A"]}) == {"ok": True, "ids": [0]}
        assert await a.call({"cmd": "RELEASE", "ids": ids, "leases": stale}) == {
            "ok": True, "ids": [0]}
        assert await b.call({"cmd": "ACKB", "ids": ids, "leases": current,
                             "results": ["B0", "B1"]}) == {"ok": True, "ids": [2]}
        results = [(await a.call({"cmd": "GETRESULT", "id": i}))["result"] for i in ids]
        assert results == ["B0", "B1"]
        # RELEASE split across the nodes with the current tokens hands both back
        ids = [(await a.call({"cmd": "PUSH", "queue": q, "data": q}))["id"] for q in queues]
        tokens = [(await a.call({"cmd": "PULL", "queue": q, "timeout": 0}))["job"]["started_at"]
                  for q in queues]
        assert await b.call({"cmd": "RELEASE", "ids": ids, "leases": tokens}) == {
            "ok": True, "ids": [2]}
        assert (await b.call({"cmd": "STATS"}))["queued"] == 2
    finally:
        await a.close()
        await b.close()


# -- break 6: growth without a limit from client input ---------------------------------------------


async def one_off_queues(client: RawClient, prefix: str, count: int, batch: int = 5000) -> int:
    """Push one job to each of ``count`` new queues; then pull and ack each (pipelined).
    How many queues the node held once every job was pushed."""
    names = [f"{prefix}-{i:06d}".encode() for i in range(count)]
    for start in range(0, count, batch):
        chunk = names[start:start + batch]
        client.writer.write(b"".join(b'{"cmd":"PUSH","queue":"%s","data":1}\n' % q
                                     for q in chunk))
        for _ in chunk:
            assert (await client.recv())["ok"] is True
    held = int((await client.call({"cmd": "STATS"}))["queues"])
    for start in range(0, count, batch):
        chunk = names[start:start + batch]
        client.writer.write(b"".join(b'{"cmd":"PULL","queue":"%s","timeout":0}\n' % q
                                     for q in chunk))
        ids = [(await client.recv())["job"]["id"] for _ in chunk]
        client.writer.write(b"".join(b'{"cmd":"ACK","id":%d}\n' % i for i in ids))
        for _ in chunk:
            assert await client.recv() == {"ok": True}
    return held


async def test_a_node_forgets_empty_queues_and_keeps_the_ones_with_settings(
        make_node: Any) -> None:
    """Empty queues were never forgotten. Now one empty and without settings for
    ``queue_idle_ms`` is; a paused, limited or non-empty queue is kept."""
    node: Node = await make_node(NodeSettings(port=0, http_port=0,
                                              engine=EngineConfig(queue_idle_ms=200)))
    client = await RawClient.connect(node.tcp_port)
    try:
        for req in ({"cmd": "PAUSE", "queue": "paused"},
                    {"cmd": "RATELIMIT", "queue": "limited", "limit": 5},
                    {"cmd": "PUSH", "queue": "busy", "data": 1}):
            assert (await client.call(req))["ok"] is True
        held = await one_off_queues(client, "gone", 20_000)
        assert held == 20_003

        async def forgotten() -> bool:
            return bool((await client.call({"cmd": "STATS"}))["queues"] == 3)

        await poll(forgotten, 5.0)
        listed = await client.call({"cmd": "LISTQUEUES"})
        assert [q["name"] for q in listed["queues"]] == ["busy", "limited", "paused"]
        # a name comes back as a new queue; clearing settings of an unknown one creates none
        assert (await client.call({"cmd": "PUSH", "queue": "gone-000001", "data": 2}))["ok"]
        assert (await client.call({"cmd": "RESUME", "queue": "never-seen"}))["ok"]
        assert (await client.call({"cmd": "STATS"}))["queues"] == 4
    finally:
        await client.close()


def test_100000_one_off_queues_leave_an_engines_memory_where_it_was() -> None:
    """The memory test of issue 13: 100,000 queue names pushed to and drained once cost a
    node ~70 MB for good (a node process that never forgets a queue, as before: +76 MB RSS,
    and +64 MB more for the next 100,000). Now they are forgotten once idle, and the memory
    comes back.

    Measured with tracemalloc, the bytes of live Python objects of a real engine, because
    that is what a node holds: a process's RSS does not fall when Python frees objects
    (partly used allocator arenas stay mapped), so it would measure the allocator. The
    engine holds 10,000 waiting jobs, and has seen 20,000 one-off queues before the baseline
    is taken, so that its bounded caches (a results window of 1,000, its dicts' tables) are
    at their steady size. The clock stands still while the 100,000 go through, so all of
    them are held at once; then it moves past ``queue_idle_ms``."""
    clock = FakeClock()
    tracemalloc.start()
    try:
        engine = Engine(clock, EngineConfig(queue_idle_ms=1000, results_max=1000,
                                            max_queues=1_000_000))
        for i in range(10_000):
            engine.push("steady", [JobSpec(i)], [b"%d" % i])
        _drain_one_off(engine, "warm", 20_000)
        clock.advance(1000)
        engine.reclaim_queues()
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        _drain_one_off(engine, "once", 100_000)
        held, peak = len(engine.queues), tracemalloc.get_traced_memory()[0]
        clock.advance(1000)
        forgotten = engine.reclaim_queues()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    print(f"\nengine memory {before / 2**20:.2f} MiB; with {held} queues held "
          f"{peak / 2**20:.2f} MiB; once {forgotten} were forgotten {after / 2**20:.2f} MiB "
          f"({100 * (after - before) / before:+.1f}%)")
    assert held == 100_001 and forgotten == 100_000
    assert peak > 10 * before  # the queues were really there
    assert after <= before * 1.10


def _drain_one_off(engine: Engine, prefix: str, count: int) -> None:
    """Push, pull and ack one job in each of ``count`` new queues, draining what the runtime
    drains after each command (journal, wakeups)."""
    for i in range(count):
        queue = f"{prefix}-{i:06d}"
        engine.push(queue, [JobSpec(1)], [b"1"])
        (job,) = engine.pull(queue, 1, 1)
        engine.ack(job.id, None, None, 1)
        engine.journal.clear()
        engine.wakeups.clear()


async def test_queues_per_node_are_limited_with_a_clear_error(make_node: Any) -> None:
    """50,000 PAUSE on distinct 512-character names cost +65 MB, kept forever. The number
    of queues is now a setting (``--max-queues``, 100,000 by default; 1,000 here)."""
    node: Node = await make_node(NodeSettings(
        port=0, http_port=0, engine=EngineConfig(max_queues=1000, queue_idle_ms=100)))
    client = await RawClient.connect(node.tcp_port)
    try:
        names = [f"{i:05d}" + "x" * 507 for i in range(1500)]
        await client.send(*({"cmd": "PAUSE", "queue": q} for q in names))
        answers = [await client.recv() for _ in names]
        limit = {"ok": False, "error": "Limit reached: this node holds 1000 queues "
                 "(max_queues, --max-queues)"}
        assert answers[:1000] == [{"ok": True}] * 1000
        assert answers[1000:] == [limit] * 500
        assert await client.call({"cmd": "PUSH", "queue": "new", "data": 1}) == limit
        assert (await client.call({"cmd": "PUSH", "queue": names[0], "data": 1}))["ok"] is True
        assert (await client.call({"cmd": "STATS"}))["queues"] == 1000
        # settings cleared, the queues are empty again: forgotten once idle, room again
        await client.send(*({"cmd": "RESUME", "queue": q} for q in names[1:1000]))
        assert [await client.recv() for _ in names[1:1000]] == [{"ok": True}] * 999

        async def room_again() -> bool:
            return bool((await client.call({"cmd": "PUSH", "queue": "new", "data": 1}))["ok"])

        await poll(room_again, 5.0)
    finally:
        await client.close()


async def test_listqueues_answers_a_bounded_page(make_node: Any) -> None:
    """A 32.5 MiB LISTQUEUES answer: now at most ``--max-list-queues`` (10,000) queues by
    name, with ``next`` to ask for the rest (``after``)."""
    node: Node = await make_node()
    client = await RawClient.connect(node.tcp_port)
    try:
        names = sorted(f"{i:05d}" + "q" * 507 for i in range(12_000))
        await client.send(*({"cmd": "PAUSE", "queue": q} for q in names))
        for _ in names:
            assert await client.recv() == {"ok": True}
        await client.send({"cmd": "LISTQUEUES"})
        line = await client.reader.readline()
        first = orjson.loads(line)
        assert len(first["queues"]) == 10_000 and first["next"] == names[9_999]
        assert len(line) < 8 * 2**20, len(line)
        rest = await client.call({"cmd": "LISTQUEUES", "after": first["next"]})
        assert "next" not in rest
        assert [q["name"] for q in first["queues"] + rest["queues"]] == names
        page = await client.call({"cmd": "LISTQUEUES", "count": 3, "after": names[5]})
        assert [q["name"] for q in page["queues"]] == names[6:9] and page["next"] == names[8]
        metrics = await client.call({"cmd": "METRICS"})
        assert len(metrics["metrics"]["queues"]) == 10_000
    finally:
        await client.close()


async def test_through_a_gateway_listqueues_pages_cover_every_queue_once(
        two_nodes: tuple[Cluster, Gateway]) -> None:
    _, gateway = two_nodes
    client = await RawClient.connect(gateway.port)
    try:
        names = sorted(f"page-{i:04d}" for i in range(250))
        for name in names:
            assert (await client.call({"cmd": "PAUSE", "queue": name}))["ok"] is True
        seen: list[str] = []
        after = None
        while True:
            req: dict[str, Any] = {"cmd": "LISTQUEUES", "count": 40}
            if after is not None:
                req["after"] = after
            page = await client.call(req)
            seen += [q["name"] for q in page["queues"]]
            after = page.get("next")
            if after is None:
                break
        assert seen == names
    finally:
        await client.close()


async def test_results_messages_and_errors_are_limited_like_payloads(make_node: Any) -> None:
    """A 12 MiB ACK result was accepted although ``max_payload`` is 8 MiB, and 10 MiB
    PROGRESS messages and FAIL errors too. Each now has a limit (``--max-result``,
    ``--max-message``; the payload limit unless set); the job is untouched by a refusal."""
    node: Node = await make_node()
    client = await RawClient.connect(node.tcp_port)
    try:
        job_id = (await client.call({"cmd": "PUSH", "queue": "q", "data": 1}))["id"]
        assert (await client.call({"cmd": "PULL", "queue": "q"}))["job"]["id"] == job_id
        big = "r" * (12 * 2**20)
        too_big = f"too large: {len(big) + 2} bytes (max {8 * 2**20})"
        assert await client.call({"cmd": "ACK", "id": job_id, "result": big}) == {
            "ok": False, "error": f"Result {too_big}"}
        assert await client.call({"cmd": "ACKB", "ids": [job_id], "results": [big]}) == {
            "ok": False, "error": f"Result {too_big}"}
        message = "m" * (10 * 2**20)
        assert await client.call({"cmd": "PROGRESS", "id": job_id, "progress": 5,
                                  "message": message}) == {
            "ok": False, "error": f"Message too large: {len(message)} bytes (max {8 * 2**20})"}
        assert await client.call({"cmd": "FAIL", "id": job_id, "error": message}) == {
            "ok": False, "error": f"Error too large: {len(message)} bytes (max {8 * 2**20})"}
        job = (await client.call({"cmd": "GETJOB", "id": job_id}))["job"]
        assert job["state"] == "active" and job["progress"] == 0
        assert await client.call({"cmd": "ACK", "id": job_id, "result": "ok"}) == {"ok": True}
    finally:
        await client.close()


async def test_kept_results_are_bounded_in_bytes(make_node: Any) -> None:
    """11 results of 12 MiB held +185 MB for the retention window (24 h). Kept results now
    also have a byte budget (``--results-max-bytes``, 256 MiB; 1 MiB here): the oldest go."""
    node: Node = await make_node(NodeSettings(
        port=0, http_port=0, engine=EngineConfig(results_max_bytes=2**20)))
    client = await RawClient.connect(node.tcp_port)
    try:
        ids = []
        for i in range(11):
            job_id = (await client.call({"cmd": "PUSH", "queue": "q", "data": i}))["id"]
            await client.call({"cmd": "PULL", "queue": "q"})
            assert await client.call({"cmd": "ACK", "id": job_id, "result": "r" * 200_000}) \
                == {"ok": True}
            ids.append(job_id)
        results = [(await client.call({"cmd": "GETRESULT", "id": i}))["result"] for i in ids]
        kept = [r is not None for r in results]
        assert kept == [False] * 6 + [True] * 5  # 5 x 200 KB fit in 1 MiB
        assert node.engine.result_bytes <= 2**20
    finally:
        await client.close()


async def test_crons_are_limited_per_node(make_node: Any) -> None:
    """2,000 every-second crons made 10,000 jobs in 5 s. A node now holds at most
    ``--max-crons`` (1,000) crons, and a cron's data at most ``--max-cron-payload``
    (64 KiB): crons fire at most 1,000 jobs a second per node."""
    node: Node = await make_node()
    client = await RawClient.connect(node.tcp_port)
    try:
        crons = [{"cmd": "CRON", "name": f"c{i}", "queue": "tick", "data": i,
                  "schedule": "*/3600"} for i in range(1001)]
        await client.send(*crons)
        answers = [await client.recv() for _ in crons]
        assert answers[:1000] == [{"ok": True}] * 1000
        assert answers[1000] == {"ok": False, "error": "Limit reached: this node holds 1000 "
                                 "crons (max_crons, --max-crons)"}
        assert (await client.call({**crons[5], "schedule": "*/1"}))["ok"] is True  # replaced
        assert (await client.call({"cmd": "CRONDELETE", "name": "c0"}))["ok"] is True
        assert (await client.call(crons[1000]))["ok"] is True
        big = {**crons[1], "data": "d" * 70_000}
        assert await client.call(big) == {
            "ok": False, "error": "Payload too large: 70002 bytes (max 65536)"}
        assert (await client.call({"cmd": "STATS"}))["crons"] == 1000
    finally:
        await client.close()


def test_a_cron_tick_pushes_nothing_past_the_memory_budget() -> None:
    """A cron's jobs bypassed the memory budget (they cannot spill to disk as a client's
    pushes do): 1,000 crons could fill memory. Past the budget a tick pushes nothing and is
    counted; the cron's next run still moves on."""
    clock = FakeClock()
    engine = Engine(clock)
    engine.memory_budget = 2500
    engine.crons.add("c", "q", b'"' + b"x" * 998 + b'"', "*/1", 0)
    for _ in range(5):
        clock.advance(1000)
        engine.tick()
    assert engine.queues["q"].n_waiting == 2  # 2 x 1,000 bytes fit in 2,500
    assert engine.crons.skipped == 3
    assert engine.crons.entries["c"]["next_run"] == clock.now + 1000
    (job,) = engine.pull("q", 1, 1)
    engine.ack(job.id)
    clock.advance(1000)
    engine.tick()
    assert engine.queues["q"].n_waiting == 2  # room again: the tick pushed


def test_every_limit_is_a_flag_and_an_environment_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from shardq.cli import build_parser
    from shardq_node.cli import node_settings

    defaults = node_settings(build_parser().parse_args(["node"]))
    assert (defaults.engine.max_queues, defaults.engine.queue_idle_ms,
            defaults.engine.max_crons, defaults.engine.results_max_bytes) == (
        100_000, 60_000, 1_000, 256 * 2**20)
    assert (defaults.request_limits.max_result, defaults.request_limits.max_message,
            defaults.request_limits.max_cron_payload, defaults.request_limits.max_list_queues) == (
        None, None, 64 * 2**10, 10_000)
    assert defaults.storage.retry_seconds == 2.0
    monkeypatch.setenv("SHARDQ_MAX_QUEUES", "7")
    monkeypatch.setenv("SHARDQ_MAX_RESULT", "1024")
    args = build_parser().parse_args(["node", "--max-crons", "3", "--max-message", "99",
                                      "--storage-retry-seconds", "0.5"])
    s = node_settings(args)
    assert (s.engine.max_queues, s.engine.max_crons, s.request_limits.max_result,
            s.request_limits.max_message, s.storage.retry_seconds) == (7, 3, 1024, 99, 0.5)
