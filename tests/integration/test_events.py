"""Events over real sockets: SUBSCRIBE lines, slow subscribers, the SDK's iterator."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from shardq import AsyncClient
from shardq_node.engine_config import EngineConfig
from shardq_node.runtime import Node
from shardq_node.settings import NodeSettings

from ..cluster import subscribers
from ..helpers import RawClient, eventually


async def next_event(sub: RawClient) -> dict[str, Any]:
    line: dict[str, Any] = await sub.recv(timeout=5)
    assert "event" in line, line
    return line


async def test_a_subscriber_sees_every_event_of_a_jobs_life_in_order(make_node: Any) -> None:
    node: Node = await make_node(NodeSettings(port=0, http_port=0,
                                              engine=EngineConfig(default_lease_ms=300)))
    sub = await RawClient.connect(node.tcp_port)
    assert await sub.call({"cmd": "SUBSCRIBE", "queue": "life"}) == {"ok": True}
    w = await RawClient.connect(node.tcp_port)
    job_id = (await w.call({"cmd": "PUSH", "queue": "life", "data": 1, "max_attempts": 3}))["id"]
    job = (await w.call({"cmd": "PULL", "queue": "life"}))["job"]
    await w.call({"cmd": "PROGRESS", "id": job_id, "progress": 40, "message": "m"})
    await w.call({"cmd": "FAIL", "id": job_id, "error": "first"})
    await w.call({"cmd": "PULL", "queue": "life"})  # second attempt: its lease runs out
    # a blocking PULL: answered once the node has timed out the second attempt
    job = (await w.call({"cmd": "PULL", "queue": "life", "timeout": 3000}, timeout=5))["job"]
    assert job["attempts"] == 2
    await w.call({"cmd": "ACK", "id": job_id, "result": {"done": True}})
    dead = (await w.call({"cmd": "PUSH", "queue": "life", "data": 2, "max_attempts": 1}))["id"]
    await w.call({"cmd": "PULL", "queue": "life"})
    await w.call({"cmd": "FAIL", "id": dead})
    expired = (await w.call({"cmd": "PUSH", "queue": "life", "data": 3, "ttl": 50}))["id"]
    seen = [await next_event(sub) for _ in range(10)]
    assert [(e["event"], e["job"]["id"]) for e in seen] == [
        ("progress", job_id), ("failed", job_id), ("retrying", job_id),
        ("timeout", job_id), ("failed", job_id), ("retrying", job_id),
        ("completed", job_id), ("failed", dead), ("dead", dead), ("expired", expired),
    ]
    assert all(e["queue"] == "life" for e in seen)
    assert seen[0]["job"]["progress"] == 40 and seen[0]["job"]["progress_msg"] == "m"
    assert seen[6]["job"]["state"] == "completed"
    await sub.close()
    await w.close()


async def test_subscription_filters_by_event_name(node: Node) -> None:
    sub = await RawClient.connect(node.tcp_port)
    await sub.call({"cmd": "SUBSCRIBE", "queue": "f", "events": ["completed"]})
    c = await RawClient.connect(node.tcp_port)
    for _ in range(2):
        await c.call({"cmd": "PUSH", "queue": "f", "data": 1})
        job = (await c.call({"cmd": "PULL", "queue": "f"}))["job"]
        await c.call({"cmd": "FAIL", "id": job["id"]})
        job = (await c.call({"cmd": "PULL", "queue": "f"}))["job"]
        await c.call({"cmd": "ACK", "id": job["id"]})
    events = [await next_event(sub) for _ in range(2)]
    assert [e["event"] for e in events] == ["completed", "completed"]
    await c.call({"cmd": "UNSUBSCRIBE", "queue": "f"})
    await sub.close()
    await c.close()


async def test_a_slow_subscriber_is_dropped_with_a_final_line(node: Node) -> None:
    sub = await RawClient.connect(node.tcp_port)
    await sub.call({"cmd": "SUBSCRIBE", "queue": "big", "events": ["completed"]})
    sub.writer.transport.pause_reading()  # a subscriber that stops reading
    c = await RawClient.connect(node.tcp_port)
    payload = "p" * 50_000
    for _ in range(20):
        await c.send(*({"cmd": "PUSH", "queue": "big", "data": payload} for _ in range(40)))
        for _ in range(40):
            await c.recv()
        jobs = (await c.call({"cmd": "PULLB", "queue": "big", "count": 40}))["jobs"]
        await c.call({"cmd": "ACKB", "ids": [j["id"] for j in jobs]})
    assert (await c.call({"cmd": "STATS"}))["ok"] is True  # the node kept serving
    sub.writer.transport.resume_reading()
    last = None
    while True:
        try:
            line = await asyncio.wait_for(sub.reader.readline(), 10)
        except (ConnectionError, asyncio.LimitOverrunError):
            break
        if not line:
            break
        last = orjson.loads(line)
    assert last is not None and last["event"] == "dropped"
    assert "subscriber too slow" in last["error"]
    assert not any(s.subscriptions for s in node.sessions)  # its subscription is gone
    await sub.close()
    await c.close()


async def test_sdk_iterates_over_events(node: Node) -> None:
    async with AsyncClient(f"127.0.0.1:{node.tcp_port}") as client:
        got: list[dict[str, Any]] = []

        async def listen() -> None:
            async for event in client.events("sdk", ["completed"]):
                got.append(event)
                if len(got) == 3:
                    return

        listener = asyncio.create_task(listen())
        await eventually(lambda: subscribers(node, "sdk") == 1, what="the SDK subscribed")
        for i in range(3):
            job_id = await client.push("sdk", {"i": i})
            job = await client.pull("sdk", timeout=1000)
            assert job is not None and job.id == job_id
            await client.ack(job, i * 10)
        await asyncio.wait_for(listener, 5)
        assert [e["job"]["data"]["i"] for e in got] == [0, 1, 2]
