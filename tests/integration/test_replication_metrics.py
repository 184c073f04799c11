"""Replication in /metrics and /health (DESIGN §9, issue 15 item 7), scraped from real nodes.

A shard of three real nodes on loopback, each with its HTTP port, and the failover
controller (as in test_replication.py). Every check reads ``/metrics`` over HTTP and parses
it with prometheus_client's parser, as Prometheus would: the roles, terms and log positions,
the primary's per-follower lag and in-sync series, and how they move when a follower stops,
when the primary loses its quorum, and when the controller promotes a follower. Then a
replicated ``LocalCluster`` (node processes) for what only a process can do: a follower
paused with SIGSTOP, whose link stays up while it falls behind.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardq import AsyncClient
from shardq.connection import Connection
from shardq.errors import Unavailable
from shardq_node.runtime import Node
from shardq_node.settings import NodeSettings, StorageSettings
from shardq_operator.local import LocalCluster

from ..helpers import eventually, free_port
from .test_replication import Shard3

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class HttpShard3(Shard3):
    """Shard3 whose nodes serve HTTP (/metrics, /health), each on a port of its own."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.http_ports: dict[str, int] = {}
        self.http: aiohttp.ClientSession | None = None

    async def start_node(self, name: str) -> Node:
        port = self.http_ports.setdefault(name, free_port())
        settings = NodeSettings(
            name=name, port=self.ports.get(name, 0), http_port=port, failure_timeout=1.0,
            storage=StorageSettings(data_dir=str(self.root / name)))
        node = Node(settings)
        await node.start()
        self.nodes[name] = node
        self.ports[name] = node.tcp_port
        return node


@pytest.fixture
async def shard(tmp_path: Path) -> AsyncIterator[HttpShard3]:
    s = HttpShard3(tmp_path)
    await s.start()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        s.http = http
        yield s
    await s.close()


async def get(s: HttpShard3, name: str, path: str) -> tuple[int, str]:
    assert s.http is not None
    async with s.http.get(f"http://127.0.0.1:{s.http_ports[name]}{path}") as res:
        return res.status, await res.text()


async def scrape(s: HttpShard3, name: str) -> Samples:
    """The node's replication samples: (name, sorted labels) -> value."""
    status, text = await get(s, name, "/metrics")
    assert status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name.startswith("shardq_replication_")}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted({"shard": "s0", **labels}.items()))))


def roles(samples: Samples) -> dict[str, float]:
    return {dict(k[1])["role"]: v for k, v in samples.items() if k[0] == "shardq_replication_role"}


async def push(s: HttpShard3, primary: str, n: int) -> None:
    c = await Connection(f"127.0.0.1:{s.ports[primary]}").open()
    try:
        for i in range(n):
            assert (await c.call({"cmd": "PUSH", "queue": "q", "data": {"i": i}}))["ok"]
    finally:
        await c.close()


async def test_roles_log_positions_and_follower_lag_in_metrics(shard: HttpShard3) -> None:
    await push(shard, "a", 20)
    primary = shard.nodes["a"]

    async def settled() -> Samples | None:
        m = await scrape(shard, "a")
        followers = [await scrape(shard, n) for n in ("b", "c")]
        lsn = value(m, "shardq_replication_lsn")
        ok = (lsn == primary.log.seq and value(m, "shardq_replication_commit_lsn") == lsn
              and all(value(f, "shardq_replication_lsn") == lsn
                      and value(f, "shardq_replication_commit_lsn") == lsn for f in followers)
              and all(value(m, "shardq_replication_follower_lag_records", follower=n) == 0
                      for n in ("b", "c")))
        return m if ok else None

    m = await eventually(settled, 10, what="every member holds and knows the commit LSN")
    assert roles(m) == {"primary": 1, "follower": 0, "learner": 0, "none": 0, "standalone": 0}
    assert value(m, "shardq_replication_term") == 1
    assert value(m, "shardq_replication_members") == 3
    assert value(m, "shardq_replication_learners") == 0
    assert value(m, "shardq_replication_members_in_sync") == 3
    assert value(m, "shardq_replication_no_quorum_seconds") == 0
    for n in ("b", "c"):
        assert value(m, "shardq_replication_follower_in_sync", follower=n) == 1
        assert value(m, "shardq_replication_follower_lag_seconds", follower=n) == 0
    assert value(m, "shardq_replication_failovers_total") == 0
    assert value(m, "shardq_replication_fence_refusals_total") == 0
    f = await scrape(shard, "b")
    assert roles(f) == {"primary": 0, "follower": 1, "learner": 0, "none": 0, "standalone": 0}
    assert value(f, "shardq_replication_term") == 1
    # only the primary speaks for the shard and its followers
    assert not [k for k in f if k[0] in ("shardq_replication_members",
                                         "shardq_replication_follower_lag_records")]

    # a follower stops: the primary counts it out of sync, and its lag grows with every write
    await shard.stop_node("c")
    await push(shard, "a", 10)  # b and a are a majority: every push is confirmed

    async def c_behind() -> Samples | None:
        m = await scrape(shard, "a")
        ok = (value(m, "shardq_replication_follower_in_sync", follower="c") == 0
              and value(m, "shardq_replication_members_in_sync") == 2
              and (value(m, "shardq_replication_follower_lag_records", follower="c") or 0) >= 10
              and (value(m, "shardq_replication_follower_lag_seconds", follower="c") or 0) > 0)
        return m if ok else None

    m = await eventually(c_behind, 10, what="c out of sync and behind in the primary's metrics")
    first = value(m, "shardq_replication_follower_lag_seconds", follower="c")
    assert value(m, "shardq_replication_follower_in_sync", follower="b") == 1
    assert value(m, "shardq_replication_no_quorum_seconds") == 0, "a and b are a majority"

    async def lag_grows() -> bool:
        m = await scrape(shard, "a")
        later = value(m, "shardq_replication_follower_lag_seconds", follower="c")
        return later is not None and first is not None and later > first + 0.2

    await eventually(lag_grows, 5, what="c's lag in seconds keeps growing")
    await eventually(lambda: _b_caught_up(shard), 5, what="b has everything")
    m = await scrape(shard, "a")
    assert value(m, "shardq_replication_follower_lag_records", follower="b") == 0
    assert value(m, "shardq_replication_follower_lag_seconds", follower="b") == 0

    # c comes back: in sync again, nothing behind
    await shard.start_node("c")

    async def c_back() -> bool:
        m = await scrape(shard, "a")
        return (value(m, "shardq_replication_follower_in_sync", follower="c") == 1
                and value(m, "shardq_replication_follower_lag_records", follower="c") == 0
                and value(m, "shardq_replication_members_in_sync") == 3)

    await eventually(c_back, 10, what="c in sync again")


def _b_caught_up(s: HttpShard3) -> bool:
    return s.nodes["b"].log.durable == s.nodes["a"].log.seq


async def test_a_primary_without_quorum_says_so_in_metrics_and_health(shard: HttpShard3) -> None:
    status, body = await get(shard, "b", "/health")
    assert status == 200
    health: dict[str, Any] = orjson.loads(body)
    assert {k: health[k] for k in ("status", "memoryOk", "queueOk", "role", "shard", "term")} \
        == {"status": "healthy", "memoryOk": True, "queueOk": True, "role": "follower",
            "shard": "s0", "term": 1}
    await shard.stop_node("b")
    await shard.stop_node("c")
    c = await Connection(f"127.0.0.1:{shard.ports['a']}").open()
    held = asyncio.ensure_future(c.call({"cmd": "PUSH", "queue": "q", "data": "held"}))
    try:
        async def no_quorum() -> Samples | None:
            m = await scrape(shard, "a")
            lost = value(m, "shardq_replication_no_quorum_seconds") or 0
            return m if lost > shard.nodes["a"].settings.failure_timeout else None

        m = await eventually(no_quorum, 10, what="no quorum past failure_timeout in metrics")
        assert value(m, "shardq_replication_members_in_sync") == 1
        commit, lsn = (value(m, "shardq_replication_commit_lsn"),
                       value(m, "shardq_replication_lsn"))
        assert commit is not None and lsn is not None and commit < lsn, "the held push"
        # what waited for a majority is told it may or may not have happened
        with pytest.raises(Unavailable, match=r"has no quorum \(the write may have been"):
            await asyncio.wait_for(held, 5)
        # /health answers at once (the liveness probe)
        started = time.monotonic()
        status, body = await get(shard, "a", "/health")
        assert time.monotonic() - started < 1.0
        health = orjson.loads(body)
        assert status == 200
        assert {k: health[k] for k in ("status", "queueOk", "role", "shard", "term")} == {
            "status": "warning", "queueOk": False, "role": "primary", "shard": "s0", "term": 1}
    finally:
        held.cancel()
        await c.close()


async def test_a_promoted_follower_counts_its_failover(shard: HttpShard3) -> None:
    await push(shard, "a", 5)
    await shard.stop_node("a")

    async def promoted() -> tuple[str, Samples] | None:
        for name in ("b", "c"):
            m = await scrape(shard, name)
            if roles(m).get("primary") == 1 and value(m, "shardq_replication_term") == 2:
                return name, m
        return None

    name, m = await eventually(promoted, 15, what="b or c primary in term 2 in its metrics")
    assert value(m, "shardq_replication_failovers_total") == 1
    other = "c" if name == "b" else "b"

    async def other_follows() -> Samples | None:
        m = await scrape(shard, name)
        ok = (value(m, "shardq_replication_follower_in_sync", follower=other) == 1
              and value(m, "shardq_replication_members_in_sync") == 2)
        return m if ok else None

    m = await eventually(other_follows, 10, what=f"{other} follows the new primary {name}")
    assert value(m, "shardq_replication_follower_in_sync", follower="a") == 0
    follower = await scrape(shard, other)
    assert roles(follower)["follower"] == 1
    assert value(follower, "shardq_replication_failovers_total") == 0
    status, body = await get(shard, name, "/health")
    assert status == 200 and '"role":"primary"' in body and '"term":2' in body


# -- a paused follower (SIGSTOP): processes, as ``shardq up --replicas 3`` runs them --------------


class Local:
    """One replicated shard of ``shardq up --replicas 3``, and the processes it paused."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.paused: list[subprocess.Popen[bytes]] = []

    def proc(self, name: str) -> subprocess.Popen[bytes]:
        node = next(n for n in self.cluster.nodes if n.name == name)
        assert node.proc is not None
        return node.proc

    def pause(self, name: str) -> None:
        self.paused.append(self.proc(name))
        self.proc(name).send_signal(signal.SIGSTOP)


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[Local]:
    cluster = LocalCluster("127.0.0.1", free_port(), free_port(), str(tmp_path / "data"),
                           "always", replicas=3, failure_timeout=1.0)
    await cluster.start(1)
    it = Local(cluster)
    try:
        yield it
    finally:
        for proc in it.paused:  # SIGCONT first: a stopped process would not end on SIGTERM
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        await cluster.stop()


async def scrape_port(port: int) -> Samples:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, \
            http.get(f"http://127.0.0.1:{port}/metrics") as res:
        text = await res.text()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name.startswith("shardq_replication_")}


def shard_value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted({"shard": "shard-0", **labels}.items()))))


async def test_a_paused_follower_drops_out_of_sync_while_its_lag_grows(local: Local) -> None:
    """A follower that stops acknowledging but keeps its connection (SIGSTOP, a stuck disk)
    counts for the quorum no longer once it was silent for the failure timeout (1 s here),
    and its lag in records and seconds grows. SIGCONT: it catches up and is in sync again."""
    topo = await local.cluster.current()
    assert topo is not None
    shard = topo.shards["shard-0"]
    primary = next(n for n in local.cluster.nodes if n.name == shard.primary)
    follower = next(m for m in shard.members if m != shard.primary)
    local.pause(follower)
    async with AsyncClient(f"127.0.0.1:{local.cluster.port}") as client:
        for i in range(3):
            await asyncio.wait_for(client.push("paused", {"i": i}), 5)  # a majority: answered

    async def behind() -> Samples | None:
        m = await scrape_port(primary.http_port)
        lag = shard_value(m, "shardq_replication_follower_lag_seconds", follower=follower) or 0
        return m if lag > 1.5 else None

    m = await eventually(behind, 10, what=f"{follower} more than 1.5 s behind")
    assert shard_value(m, "shardq_replication_follower_in_sync", follower=follower) == 0
    assert (shard_value(m, "shardq_replication_follower_lag_records", follower=follower)
            or 0) >= 3
    assert shard_value(m, "shardq_replication_members_in_sync") == 2
    assert shard_value(m, "shardq_replication_no_quorum_seconds") == 0  # 2 of 3: a majority

    local.proc(follower).send_signal(signal.SIGCONT)

    async def caught_up() -> bool:
        m = await scrape_port(primary.http_port)
        return (shard_value(m, "shardq_replication_follower_lag_records", follower=follower) == 0
                and shard_value(m, "shardq_replication_follower_lag_seconds",
                                follower=follower) == 0
                and shard_value(m, "shardq_replication_follower_in_sync",
                                follower=follower) == 1)

    await eventually(caught_up, 10, what=f"{follower} caught up after SIGCONT")


async def test_a_primary_whose_followers_are_paused_refuses_writes(local: Local) -> None:
    topo = await local.cluster.current()
    assert topo is not None
    shard = topo.shards["shard-0"]
    for member in shard.members:
        if member != shard.primary:
            local.pause(member)
    primary = next(n for n in local.cluster.nodes if n.name == shard.primary)
    conn = await Connection(f"127.0.0.1:{primary.port}").open()
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="has no quorum"):
            # failure_timeout is 1 s: refused well within 5 s, as when the followers are dead
            await asyncio.wait_for(conn.call({"cmd": "PUSH", "queue": "q", "data": 1}), 5)
        assert time.monotonic() - started < 5
    finally:
        await conn.close()
