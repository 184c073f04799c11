"""The gateway's HTTP API in front of three real nodes: routed in-process by the TCP routes,
with HTTP's own lease holder, and never through a connection of the gateway to itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from shardq_gateway.main import Gateway
from shardq_gateway.settings import GatewaySettings

from ..cluster import Cluster
from ..helpers import RawClient, eventually, free_port


@pytest.fixture
async def gateway(cluster: Cluster) -> AsyncIterator[Gateway]:
    gw = Gateway(GatewaySettings(port=0, http_port=free_port(), seeds=cluster.seeds()))
    await gw.start()
    yield gw
    await gw.stop()


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{gateway.http_port}",
                                     timeout=aiohttp.ClientTimeout(total=15)) as s:
        yield s


async def ok(http: aiohttp.ClientSession, method: str, path: str, **kw: Any) -> Any:
    async with http.request(method, path, **kw) as resp:
        body = await resp.json()
        assert resp.status == 200 and body["ok"] is True, (resp.status, body)
        return body["data"]


async def test_http_jobs_reach_every_owner_and_the_gateway_never_connects_to_itself(
    cluster: Cluster, gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    queues = [f"hq-{i}" for i in range(12)]
    ids = {q: (await ok(http, "POST", f"/queues/{q}/jobs", json={"data": q}))["id"]
           for q in queues}
    holders = {n.settings.name for n in cluster.nodes for q in queues
               if n.engine.has_job(ids[q])}
    assert len(holders) > 1  # the pushes went to more than one owner
    for q in queues:
        jobs = await ok(http, "GET", f"/queues/{q}/jobs", params={"timeout": "2000"})
        assert [j["id"] for j in jobs] == [ids[q]] and jobs[0]["data"] == q
        await ok(http, "POST", f"/jobs/{ids[q]}/ack", json={"result": q})  # no lease given
        assert await ok(http, "GET", f"/jobs/{ids[q]}/result") == q
    assert not gateway.sessions  # not one TCP session: HTTP ran in-process
    stats = await ok(http, "GET", "/stats")
    assert stats is not None


async def test_a_lease_less_http_ack_settles_only_what_http_pulled(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    tcp = await RawClient.connect(gateway.port)
    try:
        answer = await tcp.call({"cmd": "PUSH", "queue": "held", "data": 1})
        pulled = await tcp.call({"cmd": "PULL", "queue": "held", "timeout": 0})
        assert pulled["job"]["id"] == answer["id"]
        async with http.post(f"/jobs/{answer['id']}/ack", json={}) as resp:
            body = await resp.json()
        assert resp.status == 409 and body["ok"] is False, body  # TCP's attempt, not HTTP's
        assert (await tcp.call({"cmd": "ACK", "id": answer["id"]}))["ok"] is True
    finally:
        await tcp.close()


async def test_http_events_through_the_gateway_come_from_every_node(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    async with http.get("/events", params={"events": "completed"}) as resp:
        assert resp.status == 200
        assert await asyncio.wait_for(resp.content.readline(), 5) == b": subscribed\n"
        queues = [f"ev-{i}" for i in range(6)]
        for q in queues:
            job = await ok(http, "POST", f"/queues/{q}/jobs", json={"data": q})
            await ok(http, "GET", f"/queues/{q}/jobs", params={"timeout": "0"})
            await ok(http, "POST", f"/jobs/{job['id']}/ack", json={"result": 1})
        seen: list[str] = []

        async def all_seen() -> bool:
            line = await asyncio.wait_for(resp.content.readline(), 5)
            if line.startswith(b"data: "):
                event = orjson.loads(line[6:])
                assert event["event"] == "completed"
                seen.append(event["queue"])
            return sorted(seen) == sorted(queues)

        await eventually(all_seen, what="a completed event of every queue")
    assert not gateway.sessions
