"""The gateway in front of three real nodes on loopback: routing, order, merges, moves, leases.

Every test starts three nodes in this event loop with a published topology
(tests/cluster.py) and a gateway on a free port, and talks to them over sockets
byte for byte, as a MagicQueue client would.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from hypothesis import given

from shardq.errors import Unavailable
from shardq_gateway.main import Gateway
from shardq_node.runtime import Node
from shardq_node.settings import NodeSettings

from ..cluster import Cluster, answered, blocked_pulls, node_call, slot_on, start_gateway
from ..helpers import RawClient, eventually
from . import test_magicqueue_client as mq
from .test_fuzz import FUZZ, LineClient, NodeThread, byte_lines, requests, tame


@pytest.fixture
async def gateway(cluster: Cluster) -> AsyncIterator[Gateway]:
    gw = await start_gateway(cluster)
    yield gw
    await gw.stop()


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[RawClient]:
    c = await RawClient.connect(gateway.port)
    yield c
    await c.close()


async def connect(gateway: Gateway) -> RawClient:
    return await RawClient.connect(gateway.port)


async def recv_many(client: RawClient, n: int, timeout: float = 5.0) -> list[Any]:
    return [await client.recv(timeout) for _ in range(n)]


async def push(client: RawClient, queue: str, data: Any = None, **opts: Any) -> int:
    answer = await client.call({"cmd": "PUSH", "queue": queue, "data": data, **opts})
    assert answer["ok"], answer
    return int(answer["id"])


async def no_answer_within(client: RawClient, seconds: float) -> None:
    with pytest.raises(TimeoutError):
        await client.recv(seconds)


# -- routing ---------------------------------------------------------------------------------------


async def test_pushes_to_many_queues_land_on_the_owner_of_each_queue(
    cluster: Cluster, client: RawClient
) -> None:
    queues = [f"land-{i}" for i in range(60)]
    await client.send(*({"cmd": "PUSH", "queue": q, "data": q} for q in queues))
    assert all(a["ok"] for a in await recv_many(client, len(queues)))
    for node in cluster.nodes:
        name = node.settings.name
        listed = await cluster.call(name, {"cmd": "LISTQUEUES"})
        held = {q["name"] for q in listed["queues"]}
        assert held == {q for q in queues if cluster.topology.owner_of_queue(q) == name}
        assert held, f"{name} got none of 60 queues"


async def test_push_pull_ack_and_result_travel_through_the_gateway(client: RawClient) -> None:
    job_id = await push(client, "work", {"n": 1})
    pulled = await client.call({"cmd": "PULL", "queue": "work", "timeout": 0})
    assert pulled["job"]["id"] == job_id and pulled["job"]["data"] == {"n": 1}
    acked = await client.call({"cmd": "ACK", "id": job_id, "result": {"sum": 3}, "reqId": "a"})
    assert acked == {"ok": True, "reqId": "a"}
    assert await client.call({"cmd": "GETRESULT", "id": job_id}) == {
        "ok": True, "id": job_id, "result": {"sum": 3},
    }
    job = await client.call({"cmd": "GETJOB", "id": job_id})
    assert job["job"]["state"] == "completed"


async def test_pipelined_mixed_requests_to_every_node_come_back_in_request_order(
    client: RawClient,
) -> None:
    lines = []
    for i in range(200):
        rid = str(i)
        kind = i % 8
        if kind == 0:
            lines.append({"cmd": "STATS", "reqId": rid})
        elif kind == 1:
            lines.append({"cmd": "GETRESULT", "id": i * 7, "reqId": rid})
        elif kind == 2:
            lines.append({"cmd": "PUSH", "reqId": rid})  # refused by the gateway itself
        elif kind == 3:
            lines.append({"cmd": "ACKB", "ids": [i, i + 1, i + 2], "reqId": rid})
        elif kind == 4:
            lines.append({"cmd": "PULL", "queue": f"mixed-{i % 13}", "timeout": 0, "reqId": rid})
        else:
            lines.append({"cmd": "PUSH", "queue": f"mixed-{i % 13}", "data": i, "reqId": rid})
    client.writer.write(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    answers = await recv_many(client, len(lines))
    assert [a["reqId"] for a in answers] == [str(i) for i in range(200)]
    assert answers[2] == {"ok": False, "error": "Invalid: missing field 'queue'", "reqId": "2"}
    assert answers[3] == {"ok": True, "ids": [0], "reqId": "3"}
    assert all(a["ok"] for i, a in enumerate(answers) if i % 8 != 2)


async def test_ackb_across_nodes_sums_the_counts_of_every_owner(
    cluster: Cluster, client: RawClient
) -> None:
    ids = []
    for node in cluster.nodes:
        for queue in cluster.queues_on(node.settings.name, "ackb-")[:2]:
            await push(client, queue, 1)
            pulled = await client.call({"cmd": "PULL", "queue": queue, "timeout": 0})
            ids.append(pulled["job"]["id"])
    assert len({i % 1024 for i in ids}) == 6
    results = [{"r": i} for i in range(len(ids))] + [None]
    answer = await client.call({"cmd": "ACKB", "ids": [*ids, 999_999], "results": results,
                                "reqId": 7})
    assert answer == {"ok": True, "ids": [6], "reqId": 7}
    assert (await client.call({"cmd": "GETRESULT", "id": ids[4]}))["result"] == {"r": 4}
    again = await client.call({"cmd": "ACKB", "ids": ids})
    assert again == {"ok": True, "ids": [0]}


async def test_stats_listqueues_metrics_and_crons_merge_every_node(
    cluster: Cluster, client: RawClient
) -> None:
    queues = [cluster.queues_on(n.settings.name, "merge-")[0] for n in cluster.nodes]
    for i, queue in enumerate(queues):
        for _ in range(i + 1):
            await push(client, queue)
        answer = await client.call({"cmd": "CRON", "name": f"cron-{2 - i}", "queue": queue,
                                    "data": i, "schedule": "*/60"})
        assert answer["ok"], answer
    await client.call({"cmd": "PULL", "queue": queues[2], "timeout": 0})

    per_node = [await cluster.call(n.settings.name, {"cmd": "STATS"}) for n in cluster.nodes]
    stats = await client.call({"cmd": "STATS", "reqId": "s"})
    assert stats["queued"] == 5 and stats["processing"] == 1 and stats["reqId"] == "s"
    for key in ("queued", "processing", "delayed", "dlq"):
        assert stats[key] == sum(s[key] for s in per_node)

    listed = await client.call({"cmd": "LISTQUEUES"})
    assert [q["name"] for q in listed["queues"]] == sorted(queues)
    assert {q["name"]: q["pending"] for q in listed["queues"]} == {
        queues[0]: 1, queues[1]: 2, queues[2]: 2,
    }

    metrics = (await client.call({"cmd": "METRICS"}))["metrics"]
    assert metrics["total_pushed"] == 6 and metrics["total_completed"] == 0
    assert type(metrics["jobs_per_second"]) is float and type(metrics["avg_latency_ms"]) is float
    assert [q["name"] for q in metrics["queues"]] == sorted(queues)

    crons = (await client.call({"cmd": "CRONLIST"}))["crons"]
    assert [c["name"] for c in crons] == ["cron-0", "cron-1", "cron-2"]
    assert {c["queue"] for c in crons} == set(queues)
    assert await client.call({"cmd": "CRONDELETE", "name": "cron-1", "reqId": "d"}) == {
        "ok": True, "reqId": "d",
    }
    assert await client.call({"cmd": "CRONDELETE", "name": "cron-1"}) == {
        "ok": False, "error": "Cron job not found",
    }


async def test_topology_answers_the_gateways_current_topology(
    cluster: Cluster, client: RawClient
) -> None:
    answer = await client.call({"cmd": "TOPOLOGY", "reqId": "t"})
    assert answer == {"ok": True, "topology": cluster.topology.wire(), "reqId": "t"}


# -- blocking pulls and leases ---------------------------------------------------------------------


async def test_a_blocking_pull_does_not_delay_another_clients_requests(
    cluster: Cluster, gateway: Gateway, client: RawClient
) -> None:
    idle = cluster.owner_of_queue("idle")
    waiters = [await connect(gateway) for _ in range(3)]
    for waiter in waiters:  # more blocked pulls than shared connections per node
        await waiter.send({"cmd": "PULL", "queue": "idle"})
    await eventually(lambda: blocked_pulls(idle, "idle") == 3, what="3 PULLs blocked at the node")
    await client.send(*({"cmd": "PUSH", "queue": f"busy-{i}", "data": i} for i in range(50)),
                      {"cmd": "STATS"}, {"cmd": "PULL", "queue": "busy-1", "timeout": 0})
    answers = await recv_many(client, 52)
    assert all(a["ok"] for a in answers)
    assert blocked_pulls(idle, "idle") == 3  # answered while all three still wait
    await push(client, "idle", "wake")
    got = await waiters[0].recv()
    assert got["job"]["data"] == "wake"
    for waiter in waiters:
        await waiter.close()


async def test_a_pull_without_timeout_waits_until_a_job_is_pushed_later(
    cluster: Cluster,
) -> None:
    gateway = await start_gateway(cluster, pull_chunk_ms=100)  # re-issued every 100 ms
    try:
        puller, pusher = await connect(gateway), await connect(gateway)
        await puller.send({"cmd": "PULL", "queue": "later", "reqId": "p"},
                          {"cmd": "PULLB", "queue": "later-b", "count": 5})
        await no_answer_within(puller, 0.5)
        job_id = await push(pusher, "later", "now")
        got = await puller.recv()
        assert got["job"]["id"] == job_id and got["reqId"] == "p"
        await pusher.send({"cmd": "PUSHB", "queue": "later-b", "jobs": [{"data": 1}, {"data": 2}]})
        assert (await pusher.recv())["ok"]
        batch = await puller.recv()
        assert [j["data"] for j in batch["jobs"]] == [1, 2]
        await puller.close()
        await pusher.close()
    finally:
        await gateway.stop()


async def test_lines_behind_a_blocked_pull_wait_for_it_like_on_a_node(
    gateway: Gateway, client: RawClient
) -> None:
    other = await connect(gateway)
    await client.send({"cmd": "PULL", "queue": "gate"}, {"cmd": "STATS", "reqId": "behind"})
    await no_answer_within(client, 0.3)
    await push(other, "gate", 1)
    assert (await client.recv())["job"]["data"] == 1
    assert (await client.recv())["reqId"] == "behind"
    await other.close()


async def test_closing_a_client_hands_its_leased_jobs_back_at_once(gateway: Gateway) -> None:
    worker, other = await connect(gateway), await connect(gateway)
    ids = [await push(other, "leased", i) for i in range(4)]
    pulled = await worker.call({"cmd": "PULLB", "queue": "leased", "count": 2, "timeout": 0})
    blocking = await worker.call({"cmd": "PULL", "queue": "leased", "timeout": 5000})
    acked = await worker.call({"cmd": "PULL", "queue": "leased", "timeout": 0})
    assert (await worker.call({"cmd": "ACK", "id": acked["job"]["id"]}))["ok"]
    held = {j["id"] for j in pulled["jobs"]} | {blocking["job"]["id"]}
    assert held | {acked["job"]["id"]} == set(ids)
    await worker.close()

    back: set[int] = set()

    async def all_back() -> bool:  # long before the 30 min lease would run out
        answer = await other.call({"cmd": "PULLB", "queue": "leased", "count": 4,
                                   "timeout": 500}, timeout=2.0)
        back.update(j["id"] for j in answer["jobs"])
        return back == held

    await eventually(all_back, 5, 0, what=f"the jobs {sorted(held)} back in the queue",
                     hint=lambda: f"back so far: {sorted(back)}")
    stats = await other.call({"cmd": "STATS"})
    assert stats["queued"] == 0 and stats["processing"] == 3
    await other.close()


async def test_a_client_leaving_during_a_blocked_pull_takes_no_job_with_it(
    cluster: Cluster, gateway: Gateway,
) -> None:
    owner = cluster.owner_of_queue("left")
    leaver, other = await connect(gateway), await connect(gateway)
    await leaver.send({"cmd": "PULL", "queue": "left"})
    await eventually(lambda: blocked_pulls(owner, "left") == 1, what="the PULL blocked at the node")
    await leaver.close()
    await eventually(lambda: blocked_pulls(owner, "left") == 0,
                     what="the node to drop the PULL of the client that left")
    job_id = await push(other, "left", 1)
    got = await other.call({"cmd": "PULL", "queue": "left", "timeout": 1000})
    assert got["job"]["id"] == job_id and got["job"]["attempts"] == 0
    await other.close()


# -- slot moves ------------------------------------------------------------------------------------


async def test_the_gateway_follows_a_slot_moved_behind_its_back(
    cluster: Cluster, gateway: Gateway, client: RawClient
) -> None:
    src = cluster.nodes[0].settings.name
    queue, slot = slot_on(cluster, "moved-", src)
    dst = cluster.other_than(src)
    job_id = await push(client, queue, "before")
    await cluster.move_slot(slot, dst)

    pulled = await client.call({"cmd": "PULL", "queue": queue, "timeout": 0, "reqId": "m"})
    assert pulled["job"]["id"] == job_id and pulled["reqId"] == "m"
    assert gateway.router.epoch == cluster.topology.epoch
    assert gateway.router.owner_of_slot(slot) == dst
    assert (await client.call({"cmd": "ACK", "id": job_id}))["ok"]
    await push(client, queue, "after")
    on_dst = await cluster.call(dst, {"cmd": "LISTQUEUES"})
    assert queue in {q["name"] for q in on_dst["queues"]}


async def test_a_blocked_pull_follows_its_queue_to_the_new_owner(
    cluster: Cluster, gateway: Gateway, client: RawClient
) -> None:
    src = cluster.nodes[0].settings.name
    queue, slot = slot_on(cluster, "follow-", src)
    dst = cluster.other_than(src)
    await client.send({"cmd": "PULL", "queue": queue, "reqId": "w"})
    await eventually(lambda: blocked_pulls(cluster.node(src), queue) == 1,
                     what="the PULL blocked at the source")
    retries = gateway.router.metrics.retries.get("TRYAGAIN", 0)
    await cluster.freeze(slot, dst)  # the source answers the waiting pull TRYAGAIN
    await eventually(lambda: gateway.router.metrics.retries.get("TRYAGAIN", 0) > retries,
                     what="the gateway to retry the PULL after TRYAGAIN")
    assert blocked_pulls(cluster.node(src), queue) == 0
    await cluster.move_slot(slot, dst)
    await eventually(lambda: blocked_pulls(cluster.node(dst), queue) == 1,
                     what="the PULL blocked at the new owner")
    other = await connect(gateway)
    job_id = await push(other, queue, 1)
    got = await client.recv(3.0)
    assert got["job"]["id"] == job_id and got["reqId"] == "w"
    on_dst = await cluster.call(dst, {"cmd": "LISTQUEUES"})
    assert {q["name"]: q["processing"] for q in on_dst["queues"]}[queue] == 1
    await other.close()


async def test_a_request_for_a_frozen_slot_waits_and_succeeds_once_the_move_is_published(
    cluster: Cluster, client: RawClient
) -> None:
    src = cluster.nodes[1].settings.name
    queue, slot = slot_on(cluster, "frozen-", src)
    dst = cluster.other_than(src)
    await cluster.freeze(slot, dst)
    await client.send({"cmd": "PUSH", "queue": queue, "data": 1, "reqId": "p"},
                      {"cmd": "STATS", "reqId": "s"})
    await no_answer_within(client, 0.3)
    await cluster.move_slot(slot, dst)
    pushed = await client.recv(3.0)
    assert pushed["ok"] and pushed["reqId"] == "p"
    assert (await client.recv())["reqId"] == "s"
    on_dst = await cluster.call(dst, {"cmd": "LISTQUEUES"})
    assert {q["name"]: q["pending"] for q in on_dst["queues"]}[queue] == 1


async def test_a_slot_that_stays_frozen_answers_unavailable_after_the_retry_budget(
    cluster: Cluster,
) -> None:
    gateway = await start_gateway(cluster, retry_budget=0.3)
    try:
        client = await connect(gateway)
        queue, slot = slot_on(cluster, "stuck-", cluster.nodes[2].settings.name)
        await cluster.freeze(slot, cluster.nodes[0].settings.name)
        started = time.monotonic()
        answer = await client.call({"cmd": "PUSH", "queue": queue, "data": 1, "reqId": 9})
        assert answer == {"ok": False, "reqId": 9,
                          "error": f"Unavailable: slot {slot} is moving, try again"}
        assert 0.3 <= time.monotonic() - started < 2.0
        other = cluster.queues_on(cluster.nodes[0].settings.name, "free-")[0]
        assert (await client.call({"cmd": "PUSH", "queue": other, "data": 1}))["ok"]
        await client.close()
    finally:
        await gateway.stop()


# -- failures --------------------------------------------------------------------------------------


async def test_a_stopped_node_gives_quick_unavailable_errors_and_other_slots_keep_working(
    cluster: Cluster, client: RawClient
) -> None:
    down = cluster.nodes[1]
    name, port = down.settings.name, down.tcp_port
    dead_queue = cluster.queues_on(name, "down-")[0]
    live_queue = cluster.queues_on(cluster.nodes[0].settings.name, "up-")[0]
    await push(client, dead_queue)
    await cluster.stop_node(name)

    expected = f"Unavailable: node {name} at 127.0.0.1:{port} is not reachable ("
    for _ in range(5):
        started = time.monotonic()
        answer = await client.call({"cmd": "PUSH", "queue": dead_queue, "data": 1}, timeout=3.0)
        assert answer["ok"] is False and answer["error"].startswith(expected), answer
        assert time.monotonic() - started < 1.0
        assert (await client.call({"cmd": "PUSH", "queue": live_queue, "data": 1}))["ok"]
    blocked = await client.call({"cmd": "PULL", "queue": dead_queue}, timeout=3.0)
    assert blocked["error"].startswith(expected)
    stats = await client.call({"cmd": "STATS"}, timeout=3.0)
    assert stats["ok"] is False and stats["error"].startswith(expected)

    back = Node(NodeSettings(name=name, port=port, http_port=0))  # restarted, memory lost
    await back.start()
    try:
        await node_call(port, {"cmd": "SETTOPOLOGY", "topology": cluster.topology.wire()})

        async def pushed() -> bool:
            answer = await client.call({"cmd": "PUSH", "queue": dead_queue, "data": 2})
            return bool(answer["ok"])

        await eventually(pushed, 10, 0.05, what="the gateway to reconnect to the node")
    finally:
        await back.stop()


async def test_a_node_back_at_a_new_address_is_followed_on_the_first_call(
    cluster: Cluster
) -> None:
    gateway = await start_gateway(cluster, topology_poll=600.0)  # no help from the poller
    client = await RawClient.connect(gateway.port)
    try:
        name = cluster.nodes[1].settings.name
        queue = cluster.queues_on(name, "moved-")[0]
        await push(client, queue)  # the gateway holds a connection to the old address
        await cluster.stop_node(name)
        # its pod comes back on another address; the coordinator publishes it
        back = Node(NodeSettings(name=name, port=0, http_port=0))
        await back.start()
        cluster.nodes[1] = back
        cluster.stopped.discard(name)
        topo = cluster.topology.copy()
        node = topo.node(name)
        assert node is not None
        node.tcp = f"127.0.0.1:{back.tcp_port}"
        topo.epoch += 1
        await cluster.publish(topo)
        answer = await client.call({"cmd": "PUSH", "queue": queue, "data": "after"}, timeout=5)
        assert answer["ok"] is True, answer  # no Unavailable first
        pulled = await node_call(back.tcp_port, {"cmd": "PULL", "queue": queue, "timeout": 0})
        assert pulled["job"]["data"] == "after"
    finally:
        await client.close()
        await gateway.stop()


async def test_two_gateways_serve_the_same_cluster_side_by_side(
    cluster: Cluster, gateway: Gateway
) -> None:
    second = await start_gateway(cluster)
    try:
        a, b = await connect(gateway), await connect(second)
        queues = [f"twin-{i}" for i in range(20)]
        ids = {await push(a, q, q) for q in queues}
        pulled = {(await b.call({"cmd": "PULL", "queue": q, "timeout": 0}))["job"]["id"]
                  for q in queues}
        assert pulled == ids
        # only the client that pulled settles the jobs (issue 13): not a's lease-less ACKB
        assert (await a.call({"cmd": "ACKB", "ids": sorted(ids)}))["ids"] == [0]
        assert (await b.call({"cmd": "ACKB", "ids": sorted(ids)}))["ids"] == [20]
        assert (await a.call({"cmd": "STATS"}))["processing"] == 0
        await a.close()
        await b.close()
    finally:
        await second.stop()


async def test_gateway_asks_for_its_own_token_and_speaks_to_nodes_with_the_cluster_token() -> None:
    cluster = await Cluster.start(3, tokens=("node-secret",))
    try:
        gateway = await start_gateway(cluster, tokens=("client-secret",),
                                      cluster_token="node-secret")
        client = await connect(gateway)
        garbage = await client.call(b"nope\n")  # a line that does not parse: Invalid first
        assert garbage["error"].startswith("Invalid: line is not valid JSON")
        assert await client.call({"cmd": "STATS"}) == {
            "ok": False, "error": "Authentication required"}
        assert await client.call({"cmd": "AUTH", "token": "node-secret"}) == {
            "ok": False, "error": "Invalid token"}
        assert await client.call({"cmd": "AUTH", "token": "client-secret"}) == {"ok": True}
        assert (await client.call({"cmd": "PUSH", "queue": "secret", "data": 1}))["ok"]
        assert (await client.call({"cmd": "STATS"}))["queued"] == 1
        await client.close()
        await gateway.stop()

        with pytest.raises(Unavailable, match="authentication failed: Invalid token"):
            await start_gateway(cluster, cluster_token="wrong", startup_timeout=0.3)
    finally:
        await cluster.stop()


async def test_a_line_longer_than_the_maximum_is_refused_and_the_connection_closed(
    cluster: Cluster,
) -> None:
    gateway = await start_gateway(cluster, max_line=1000)
    try:
        client = await connect(gateway)
        good = b"".join(orjson.dumps({"cmd": "PUSH", "queue": f"long-{i}", "data": i}) + b"\n"
                        for i in range(10))
        client.writer.write(good + b'{"cmd":"PUSH","queue":"x","data":"' + b"y" * 2000 + b'"}\n')
        answers = await recv_many(client, 11)
        assert all(a["ok"] for a in answers[:10])
        assert answers[10] == {"ok": False,
                               "error": "Invalid: line longer than 1000 bytes (2036+ received)"}
        assert await client.closed_by_server()
        await client.close()
    finally:
        await gateway.stop()


# -- events ----------------------------------------------------------------------------------------


async def test_subscribers_get_events_of_queues_on_every_node(
    cluster: Cluster, gateway: Gateway
) -> None:
    listener, worker = await connect(gateway), await connect(gateway)
    qa = cluster.queues_on(cluster.nodes[0].settings.name, "ev-")[0]
    qb = cluster.queues_on(cluster.nodes[2].settings.name, "ev-")[0]
    for queue in (qa, qb):
        answer = await listener.call({"cmd": "SUBSCRIBE", "queue": queue,
                                      "events": ["completed"], "reqId": queue})
        assert answer == {"ok": True, "reqId": queue}

    async def complete(queue: str) -> int:
        job_id = await push(worker, queue, queue)
        await worker.call({"cmd": "PULL", "queue": queue, "timeout": 0})
        assert (await worker.call({"cmd": "ACK", "id": job_id}))["ok"]
        return job_id

    done = {await complete(qa): qa, await complete(qb): qb}
    events = await recv_many(listener, 2)
    assert {e["job"]["id"]: e["queue"] for e in events} == done
    assert {e["event"] for e in events} == {"completed"}

    assert await listener.call({"cmd": "UNSUBSCRIBE", "queue": qa}) == {"ok": True}
    await complete(qa)
    job_id = await complete(qb)
    event = await listener.recv()
    assert event["job"]["id"] == job_id
    await no_answer_within(listener, 0.2)
    await listener.close()
    await worker.close()


async def test_subscribers_follow_a_queue_to_a_node_that_joined_later(
    cluster: Cluster, gateway: Gateway
) -> None:
    listener, worker = await connect(gateway), await connect(gateway)
    queue, slot = slot_on(cluster, "joined-", cluster.nodes[0].settings.name)
    assert (await listener.call({"cmd": "SUBSCRIBE", "queue": queue}))["ok"]
    new = await cluster.add_node()
    retries = gateway.router.metrics.retries.get("TRYAGAIN", 0)
    await cluster.freeze(slot, new.settings.name)
    await worker.send({"cmd": "PUSH", "queue": queue, "data": 1})
    # TRYAGAIN: the gateway reads the move's topology (which names the new node) meanwhile
    await eventually(lambda: gateway.router.metrics.retries.get("TRYAGAIN", 0) > retries
                     and gateway.router.epoch == cluster.topology.epoch,
                     what="the gateway to retry the PUSH and adopt the frozen topology")
    await cluster.move_slot(slot, new.settings.name)
    job_id = (await worker.recv(3.0))["id"]
    assert (await worker.call({"cmd": "PULL", "queue": queue, "timeout": 0}))["job"]
    assert (await worker.call({"cmd": "ACK", "id": job_id}))["ok"]
    event = await listener.recv()
    assert event["event"] == "completed" and event["job"]["id"] == job_id
    on_new = await cluster.call(new.settings.name, {"cmd": "STATS"})
    assert on_new["processing"] == 0 and gateway.router.owner_of_slot(slot) == new.settings.name
    await listener.close()
    await worker.close()


# -- the node's own words for bad lines ------------------------------------------------------------

BAD_LINES: list[Any] = [
    b"", b"nope", b"[1]", b"{", {"cmd": 5}, {"queue": "q"}, {"cmd": "NOPE"}, {"cmd": "push"},
    {"cmd": "PUSH"}, {"cmd": "PUSH", "queue": ""}, {"cmd": "PUSH", "queue": 7, "reqId": "r"},
    {"cmd": "PUSH", "queue": "q", "data": 1, "priority": "x"}, {"cmd": "PUSHB", "queue": "q"},
    {"cmd": "ACK", "id": "5"}, {"cmd": "ACK", "id": -1}, {"cmd": "GETRESULT", "id": 1.5},
    {"cmd": "PULLB", "queue": "q"}, {"cmd": "PULLB", "queue": "q", "count": 0, "timeout": -1},
    {"cmd": "PULL", "queue": "q", "timeout": -1}, {"cmd": "PULL", "queue": "q", "timeout": "1"},
    {"cmd": "ACKB", "ids": [1, 2], "results": [1]}, {"cmd": "ACKB", "ids": ["1"]},
    {"cmd": "ACKB", "ids": [], "results": 5}, {"cmd": "CRON", "queue": "q"},
    {"cmd": "CRON", "name": "n"}, {"cmd": "CRON", "name": "n", "queue": "q", "data": 1,
                                   "schedule": "never"},
    {"cmd": "CRONDELETE"}, {"cmd": "SUBSCRIBE", "queue": "q", "events": ["nope"]},
    {"cmd": "UNSUBSCRIBE"}, {"cmd": "STATS", "reqId": 1.5}, {"cmd": "STATS", "reqId": True},
    {"cmd": "AUTH"}, {"cmd": "RATELIMIT", "queue": "q", "limit": 0},
    {"cmd": "PROGRESS", "id": 3, "progress": 300}, {"cmd": "RELEASE", "ids": "x"},
]


async def test_bad_lines_get_the_very_answer_a_standalone_node_gives(
    client: RawClient, node: Node
) -> None:
    direct = await RawClient.connect(node.tcp_port)
    try:
        lines = [item if isinstance(item, bytes) else orjson.dumps(item) for item in BAD_LINES]
        payload = b"".join(line + b"\n" for line in lines)
        client.writer.write(payload)
        direct.writer.write(payload)
        from_gateway = await recv_many(client, len(lines))
        from_node = await recv_many(direct, len(lines))
        for line, gw, answer in zip(lines, from_gateway, from_node, strict=True):
            assert gw == answer, line
            assert gw["error"].startswith("Invalid: "), line
        internal = await client.call({"cmd": "SETTOPOLOGY", "topology": {}})
        assert internal["error"].startswith("Invalid: 'SETTOPOLOGY' is an internal command")
    finally:
        await direct.close()


# -- RELEASE and lease tokens ----------------------------------------------------------------------


async def test_node_release_with_an_expired_lease_token_leaves_the_next_attempt_alone(
    cluster: Cluster,
) -> None:
    queue = cluster.queues_on(cluster.nodes[0].settings.name, "stale-")[0]
    port = cluster.nodes[0].tcp_port
    first, second = await RawClient.connect(port), await RawClient.connect(port)
    try:
        job = {"cmd": "PUSH", "queue": queue, "data": 1, "timeout": 100}
        job_id = (await first.call(job))["id"]
        stale = (await first.call({"cmd": "PULL", "queue": queue, "timeout": 0}))["job"]
        again = await second.call({"cmd": "PULL", "queue": queue, "timeout": 2000})
        assert again["job"]["id"] == job_id and again["job"]["attempts"] == 1
        lease = again["job"]["started_at"]
        touch = {"cmd": "TOUCH", "id": job_id, "lease": lease, "extend": 60_000}
        assert (await second.call(touch))["ok"]
        released = await node_call(port, {"cmd": "RELEASE", "ids": [job_id],
                                          "leases": [stale["started_at"]]})
        assert released == {"ok": True, "ids": [0]}  # the lease named is the first attempt's
        ack = await second.call({"cmd": "ACK", "id": job_id, "lease": lease})
        assert ack == {"ok": True}
    finally:
        await first.close()
        await second.close()


async def test_a_client_leaving_after_its_lease_expired_leaves_the_next_attempt_alone(
    cluster: Cluster, gateway: Gateway
) -> None:
    first, second = await connect(gateway), await connect(gateway)
    job_id = await push(first, "expiring", 1, timeout=100)
    assert (await first.call({"cmd": "PULL", "queue": "expiring", "timeout": 0}))["job"]
    again = await second.call({"cmd": "PULL", "queue": "expiring", "timeout": 2000})
    assert again["job"]["id"] == job_id and again["job"]["attempts"] == 1
    lease = again["job"]["started_at"]
    touched = await second.call({"cmd": "TOUCH", "id": job_id, "lease": lease, "extend": 60_000})
    assert touched["ok"], touched
    owner = cluster.owner_of_queue("expiring")
    releases = answered(owner, "RELEASE")
    await first.close()  # the gateway RELEASEs job_id with the first, stale lease token
    await eventually(lambda: answered(owner, "RELEASE") > releases,
                     what="the node to answer the gateway's RELEASE")
    ack = await second.call({"cmd": "ACK", "id": job_id, "lease": lease})
    assert ack == {"ok": True}
    await second.close()


# -- fuzz: the gateway refuses what a node refuses, in the node's words ----------------------------


class GatewayThread:
    """Three nodes and a gateway on their own event loop thread, for hypothesis to drive."""

    def __init__(self) -> None:
        self.port = 0
        self.errors: list[str] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(lambda _loop, ctx: self.errors.append(repr(ctx)))
        self._stop = asyncio.Event()
        cluster = await Cluster.start(3)
        gateway = await start_gateway(cluster)
        self.port = gateway.port
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await gateway.stop()
            await cluster.stop()

    def __enter__(self) -> GatewayThread:
        self._thread.start()
        assert self._ready.wait(10), "the cluster did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def refused(answer: dict[str, Any]) -> bool:
    return answer["ok"] is False and str(answer["error"]).startswith("Invalid: ")


def test_fuzzed_lines_get_the_same_refusals_from_the_gateway_as_from_a_node() -> None:
    with NodeThread(NodeSettings(port=0, http_port=0)) as node, GatewayThread() as gateway:
        direct, routed = LineClient(node.port), LineClient(gateway.port)

        @FUZZ
        @given(line=byte_lines | requests.map(tame).map(orjson.dumps))
        def one_line(line: bytes) -> None:
            expected, _ = direct.answers(line)
            got, _ = routed.answers(line)
            if refused(expected) and expected["error"].startswith("Invalid: depends_on: job "):
                # a parent in another slot: a standalone node knows it is unknown; in a
                # cluster the owner of the parent's slot decides later (the WATCH answer)
                assert got == expected or got["ok"] is True, (line, got)
            elif refused(expected):
                assert got == expected, line
            elif refused(got):  # parents on other nodes are not known to the owner yet
                assert got["error"].startswith("Invalid: depends_on: job "), (line, got)

        try:
            one_line()
            assert routed.answers(b'{"cmd":"STATS"}')[0]["ok"] is True
        finally:
            direct.close()
            routed.close()
        assert node.errors == [] and gateway.errors == []


def test_a_magicqueue_client_runs_unchanged_through_the_gateway() -> None:
    scenarios = [getattr(mq, name) for name in dir(mq) if name.startswith("test_")
                 and "client" in inspect.signature(getattr(mq, name)).parameters]
    assert len(scenarios) >= 5
    with GatewayThread() as gateway:
        for scenario in scenarios:
            with mq.MagicQueueClient("127.0.0.1", gateway.port) as client:
                scenario(client)
        assert gateway.errors == []
