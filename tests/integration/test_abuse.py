"""Issue 13, the breaks about lines, answers and HTTP: each reproduced as the issue describes
it, and shown closed (docs/limits.md).

1. Deep nesting: a value nested deeper than ``max_depth`` (128) is ``Invalid: nesting deeper
   than 128`` before anything is stored, on a node and through a gateway, where the shared
   connection to the node survives and the clients beside it lose nothing; any exception
   while running one line becomes that line's ``Internal: …`` answer.
2. Answers without a memory bound: a client that never reads costs a node (and a gateway)
   a bounded amount of memory, gets every answer in order once it reads, and is disconnected
   (log line, metric) when it reads nothing for ``output_timeout`` or passes
   ``max_output_hard``.
6. Lines behind a blocked PULL are bounded in bytes and freed when the client closes.
7. HTTP: 413 names the real size, a nested body is a 400, slow heads and bodies are cut,
   connections are capped (TCP servers too).

Memory is measured on real processes (VmRSS in /proc), the rest on in-process servers.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from shardq.wire.topology import NodeInfo
from shardq_gateway.main import Gateway
from shardq_gateway.settings import GatewaySettings
from shardq_node.runtime import Node
from shardq_node.settings import NodeSettings, StorageSettings
from shardq_operator.ring import initial
from shardq_server.limits import Limits

from ..cluster import Cluster, start_gateway
from ..helpers import RawClient, eventually, free_port, start_node_process, wait_port

MiB = 1024 * 1024
TOO_DEEP = "Invalid: nesting deeper than 128"


def deep(depth: int, leaf: Any = 1) -> bytes:
    """The JSON of a value nested ``depth`` levels deep, objects and arrays in turn (``[]`` is
    1 level). Built as text: orjson encodes no deeper than 254."""
    opens = "".join('{"k":' if i % 2 == 0 else "[" for i in range(depth))
    closes = "".join("}" if i % 2 == 0 else "]" for i in reversed(range(depth)))
    return (opens + orjson.dumps(leaf).decode() + closes).encode()


def line(req: dict[str, Any], **values: bytes) -> bytes:
    """``req`` as a line, with raw JSON ``values`` in place of its ``"@name"`` strings."""
    out = orjson.dumps(req)
    for name, raw in values.items():
        out = out.replace(b'"@' + name.encode() + b'"', raw)
    return out + b"\n"


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for pid {pid}")


async def scrape(port: int, name: str, **labels: str) -> float:
    """One sample of a Prometheus metric from a server's /metrics (0 if absent)."""
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    match = re.search(r"^" + pattern + "$", text, re.M)
    return float(match[1]) if match else 0.0


async def settles(read: Callable[[], Awaitable[float]], polls: int = 5) -> float:
    """Poll a counter until it is above 0 and the same ``polls`` times in a row."""
    last, same = -1.0, 0
    deadline = time.monotonic() + 30
    while same < polls:
        assert time.monotonic() < deadline, "the counter never settled"
        await asyncio.sleep(0.1)  # the counter must hold still across polls, not just reach a value
        value = await read()
        same = same + 1 if value == last and value > 0 else 0
        last = value
    return last


class Silent:
    """A client that sends and then reads nothing (a plain socket: an asyncio stream would read
    ahead into its own buffer). Its receive buffer is small, but not under loopback's segment
    size (64 KiB): a window smaller than one segment stalls the connection in TCP itself."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.buffer = b""

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def lines(self, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        """Now read: the next ``count`` answers."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while self.buffer.count(b"\n") < count:
            left = deadline - time.monotonic()
            assert left > 0, "answers missing"
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 20), left)
            assert data, "the server closed the connection"
            self.buffer += data
        lines = self.buffer.split(b"\n", count)
        self.buffer = lines.pop()
        return [orjson.loads(raw) for raw in lines]

    def close(self) -> None:
        self.sock.close()


def small_node(**limits: Any) -> NodeSettings:
    return NodeSettings(port=0, http_port=0, limits=Limits(**limits))


# -- 1. deep nesting --------------------------------------------------------------------------


async def test_values_nested_deeper_than_128_are_refused_before_anything_is_stored(
    node: Node, raw: RawClient
) -> None:
    await raw.send({"cmd": "PUSH", "queue": "work", "data": 1})
    held = (await raw.recv())["id"]
    job = (await raw.call({"cmd": "PULL", "queue": "work", "timeout": 0}))["job"]
    assert job["id"] == held
    for depth in (129, 200, 254, 255, 600, 1000):  # orjson decodes 1024, encodes 254
        v = deep(depth)
        lines = [
            line({"cmd": "PUSH", "queue": "q", "data": "@v"}, v=v),
            line({"cmd": "PUSHB", "queue": "q", "jobs": [{"data": 1}, {"data": "@v"}]}, v=v),
            line({"cmd": "CRON", "name": "c", "queue": "q", "schedule": "*/5", "data": "@v"},
                 v=v),
            line({"cmd": "ACK", "id": held, "result": "@v"}, v=v),
            line({"cmd": "ACKB", "ids": [held], "results": ["@v"]}, v=v),
        ]
        await raw.send(*lines)
        for sent in lines:
            answer = await raw.recv()
            assert answer == {"ok": False, "error": TOO_DEEP}, (depth, sent[:20], answer)
    for field in (line({"cmd": "FAIL", "id": held, "error": "@v"}, v=deep(300)),
                  line({"cmd": "PROGRESS", "id": held, "progress": 5, "message": "@v"},
                       v=deep(300))):
        answer = await raw.call(field)
        assert not answer["ok"] and answer["error"].startswith("Invalid: field"), answer
    stats = await raw.call({"cmd": "STATS"})
    assert (stats["jobs"], stats["queued"], stats["processing"]) == (1, 0, 1)
    assert (await raw.call({"cmd": "CRONLIST"}))["crons"] == []
    assert (await raw.call({"cmd": "GETJOB", "id": held}))["job"]["state"] == "active"
    # 128 levels are kept and given back as they came
    ok = await raw.call(line({"cmd": "PUSH", "queue": "q", "data": "@v"}, v=deep(128, "leaf")))
    got = await raw.call({"cmd": "GETJOB", "id": ok["id"]})
    assert got["job"]["data"] == orjson.loads(deep(128, "leaf"))


async def pipelining_client(port: int, client: int, failures: list[str],
                            ids: list[int]) -> None:
    """Keeps 500 pushes in flight (100 more each time 100 came back), 6,000 in all."""
    conn = await RawClient.connect(port)

    def batch(b: int) -> list[dict[str, Any]]:
        return [{"cmd": "PUSH", "queue": f"q{(client + i) % 12}",
                 "data": {"client": client, "n": b * 100 + i}} for i in range(100)]

    try:
        for b in range(5):
            await conn.send(*batch(b))
        for b in range(5, 65):
            for _ in range(100):
                answer = await conn.recv(10)
                if answer.get("ok") is True:
                    ids.append(answer["id"])
                else:
                    failures.append(str(answer))
            if b < 60:
                await conn.send(*batch(b))
    finally:
        await conn.close()


async def test_deep_lines_through_a_gateway_cost_the_clients_beside_them_nothing() -> None:
    """Before: each deep line closed the node connection it shared with the others, and the
    pushes in flight on it were answered Unavailable though stored (351 of 36,000 here)."""
    cluster = await Cluster.start(3)
    gateway = await start_gateway(cluster, upstream_connections=1)  # all share one per node
    try:
        port = gateway.port
        bad = await RawClient.connect(port)
        await bad.send(*({"cmd": "PUSH", "queue": f"q{i}", "data": i} for i in range(3)))
        for _ in range(3):
            assert (await bad.recv())["ok"]
        held = []
        for i in range(3):
            job = (await bad.call({"cmd": "PULL", "queue": f"q{i}", "timeout": 0}))["job"]
            held.append(job["id"])
        failures: list[str] = []
        ids: list[int] = []
        clients = [asyncio.create_task(pipelining_client(port, c, failures, ids))
                   for c in range(6)]
        deep_lines = [
            *(line({"cmd": "PUSH", "queue": f"q{i}", "data": "@v"}, v=deep(300))
              for i in range(3)),
            *(line({"cmd": "ACK", "id": job_id, "result": "@v"}, v=deep(600))
              for job_id in held),
            *(line({"cmd": "CRON", "name": f"c{i}", "queue": f"q{i}", "schedule": "*/1",
                    "data": "@v"}, v=deep(200)) for i in range(3)),
        ]
        answers = []
        for burst in range(3):  # three lines at a time, while the others are in full flow
            await eventually(lambda b=burst: len(ids) + len(failures) >= 9000 * (b + 1),
                        what="the others under way")
            await bad.send(*deep_lines[burst::3])
            answers += [await bad.recv(10) for _ in range(3)]
        await asyncio.gather(*clients)
        assert answers == [{"ok": False, "error": TOO_DEEP}] * 9
        assert failures == [], f"{len(failures)} failed, e.g. {failures[:2]}"
        assert len(ids) == len(set(ids)) == 36_000
        stats = await bad.call({"cmd": "STATS"})
        assert (stats["queued"], stats["processing"]) == (36_000, 3)  # nothing of the 9
        assert (await bad.call({"cmd": "CRONLIST"}))["crons"] == []
        for job_id in held:
            assert (await bad.call({"cmd": "GETJOB", "id": job_id}))["job"]["state"] == "active"
        errors = gateway.router.metrics.upstream_errors
        assert not any(count for (_, reason), count in errors.items()), errors
        await bad.close()
    finally:
        await gateway.stop()
        await cluster.stop()


def failing(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Fault injection: the command fails with an unexpected exception every other time."""
    calls = [0]

    def run(req: dict[str, Any], caller: Any) -> Any:
        calls[0] += 1
        if calls[0] % 2:
            raise RuntimeError("injected fault")
        return handler(req, caller)

    return run


async def test_an_exception_in_one_line_is_its_internal_answer_and_the_connection_lives(
    node: Node, raw: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    node.handlers["STATS"] = failing(node.handlers["STATS"])
    lines = [{"cmd": "PUSH", "queue": "q", "data": 1}, {"cmd": "STATS", "reqId": "a"},
             {"cmd": "STATS"}, {"cmd": "STATS", "reqId": "b"}, {"cmd": "PUSH", "queue": "q",
                                                                 "data": 2}]
    with caplog.at_level(logging.ERROR, "shardq_node"):
        await raw.send(*lines)
        answers = [await raw.recv() for _ in lines]
    assert answers[0]["ok"] and answers[2]["ok"] and answers[4]["ok"]
    for answer, rid in ((answers[1], "a"), (answers[3], "b")):
        assert answer["ok"] is False and answer["reqId"] == rid
        assert answer["error"].startswith("Internal: STATS failed (RuntimeError); the cause "
                                          "is in the log of node"), answer
    logged = [r for r in caplog.records if "STATS failed" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None  # the cause, once
    assert (await raw.call({"cmd": "GETJOB", "id": answers[4]["id"]}))["job"]["data"] == 2


async def test_an_exception_on_a_node_spares_the_gateways_shared_connection() -> None:
    cluster = await Cluster.start(1)
    gateway = await start_gateway(cluster, upstream_connections=1)
    try:
        victim = cluster.nodes[0]
        victim.handlers["GETJOB"] = failing(victim.handlers["GETJOB"])
        a, b = await RawClient.connect(gateway.port), await RawClient.connect(gateway.port)
        pushed = await a.call({"cmd": "PUSH", "queue": "q", "data": "x"})
        await a.send(*({"cmd": "GETJOB", "id": pushed["id"]} for _ in range(4)))
        await b.send(*({"cmd": "PUSH", "queue": "q", "data": i} for i in range(50)))
        got = [await a.recv() for _ in range(4)]
        assert [g["ok"] for g in got] == [False, True, False, True]
        assert got[0]["error"].startswith("Internal: GETJOB failed (RuntimeError)")
        assert all([(await b.recv())["ok"] for _ in range(50)])
        assert not any(gateway.router.metrics.upstream_errors.values())
        await a.close()
        await b.close()
    finally:
        await gateway.stop()
        await cluster.stop()


# -- 1 and 7 over HTTP --------------------------------------------------------------------------


@pytest.fixture
async def http_servers() -> AsyncIterator[dict[str, str]]:
    """A node and a gateway in front of it, both with HTTP; their base URLs."""
    node = Node(NodeSettings(name="node-0", port=0, http_port=free_port(),
                             storage=StorageSettings(max_payload=MiB)))
    await node.start()
    cluster = Cluster([node], None)
    await cluster.publish(cluster.topology)
    gateway = Gateway(GatewaySettings(port=0, http_port=free_port(), seeds=cluster.seeds(),
                                      max_line=MiB))
    await gateway.start()
    try:
        yield {"node": f"http://127.0.0.1:{node.http_port}",
               "gateway": f"http://127.0.0.1:{gateway.http_port}"}
    finally:
        await gateway.stop()
        await node.stop()


@pytest.mark.parametrize("server", ["node", "gateway"])
async def test_http_nested_bodies_are_400_and_nothing_is_stored(
    http_servers: dict[str, str], server: str
) -> None:
    base = http_servers[server]
    async with aiohttp.ClientSession() as http:
        async def post(path: str, body: bytes) -> tuple[int, Any]:
            async with http.post(base + path, data=body) as resp:
                return resp.status, await resp.json()

        status, pushed = await post("/queues/h/jobs", b'{"data":1}')
        assert status == 200
        job_id = pushed["data"]["id"]
        async with http.get(base + "/queues/h/jobs?timeout=0") as resp:
            assert (await resp.json())["data"][0]["id"] == job_id
        for depth in (129, 300, 1000):
            v = deep(depth)
            for path, body in (
                ("/queues/h/jobs", b'{"data":' + v + b"}"),
                ("/publish?queue=h", v),
                (f"/jobs/{job_id}/ack", b'{"result":' + v + b"}"),
                ("/crons/c", b'{"queue":"h","schedule":"*/5","data":' + v + b"}"),
            ):
                status, answer = await post(path, body)
                assert (status, answer) == (400, {"ok": False, "error": TOO_DEEP}), (path, depth)
        status, kept = await post("/publish?queue=h", deep(128))
        assert status == 200
        status, kept = await post("/queues/h/jobs", b'{"data":' + deep(128) + b"}")
        assert status == 200 and kept["data"]["data"] == orjson.loads(deep(128))
        async with http.get(base + "/stats") as resp:
            stats = await resp.json()
        assert (stats["data"]["queued"], stats["data"]["processing"]) == (2, 1)
        async with http.get(base + "/crons") as resp:
            assert (await resp.json())["data"] == []


@pytest.mark.parametrize("server", ["node", "gateway"])
async def test_http_413_names_the_real_size(http_servers: dict[str, str], server: str) -> None:
    base = http_servers[server]
    limit = MiB + 64 * 1024
    body = orjson.dumps({"data": "x" * (3 * MiB)})
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/queues/big/jobs", data=io.BytesIO(body)) as resp:
            assert resp.request_info.headers["Content-Length"] == str(len(body))
            assert resp.status == 413
            assert await resp.json() == {
                "ok": False, "error": f"Payload too large: {len(body)} bytes (max {limit})"}

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: what came is named
            for i in range(0, len(body), 256 * 1024):
                yield body[i : i + 256 * 1024]

        async with http.post(base + "/queues/big/jobs", data=chunks()) as resp:
            assert resp.status == 413
            text = (await resp.json())["error"]
            match = re.fullmatch(rf"Payload too large: (\d+) bytes \(max {limit}\)", text)
            assert match and limit < int(match[1]) <= len(body), text


async def test_an_exception_in_an_http_route_is_a_500_internal_answer() -> None:
    node = Node(NodeSettings(port=0, http_port=free_port()))
    await node.start()
    try:
        node.handlers["STATS"] = failing(node.handlers["STATS"])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{node.http_port}/stats") as resp:
                assert resp.status == 500
                error = (await resp.json())["error"]
                assert error.startswith("Internal: STATS failed (RuntimeError)"), error
            async with http.get(f"http://127.0.0.1:{node.http_port}/stats") as resp:
                assert resp.status == 200
    finally:
        await node.stop()


async def closed_within(sock: socket.socket, seconds: float) -> bytes:
    """Read until the server closes; what it sent (fails if it stays open ``seconds``)."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    got = b""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"still open after {seconds}s"
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), left)
        except ConnectionResetError:
            return got
        if not data:
            return got
        got += data


async def test_http_slow_heads_and_bodies_are_cut() -> None:
    limits = Limits(http_header_timeout=0.5, http_body_timeout=0.5)
    node = Node(NodeSettings(port=0, http_port=free_port(), limits=limits))
    await node.start()
    try:
        port = node.http_port
        idle = socket.create_connection(("127.0.0.1", port))
        partial = socket.create_connection(("127.0.0.1", port))
        partial.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /queues/q/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                     b'{"data":')
        assert await closed_within(idle, 5) == b""
        assert await closed_within(partial, 5) == b""
        answer = await closed_within(slow, 5)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert (b'"error":"Invalid: request body not received within 0.5s '
                b'(http_body_timeout)"') in answer
        assert node.drops == {"http_body_timeout": 1}
        for sock in (idle, partial, slow):
            sock.close()
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{port}/stats") as resp:
            assert resp.status == 200
    finally:
        await node.stop()


async def test_connections_past_the_cap_are_refused_with_the_reason() -> None:
    limits = Limits(max_connections=2, http_max_connections=2)
    cluster = await Cluster.start(1)
    node = Node(NodeSettings(name="capped", port=0, http_port=free_port(), limits=limits))
    await node.start()
    gateway = await start_gateway(cluster, limits=limits)
    try:
        for port in (node.tcp_port, gateway.port):
            first, second = await RawClient.connect(port), await RawClient.connect(port)
            assert (await first.call({"cmd": "STATS"}))["ok"]
            third = await RawClient.connect(port)
            assert await third.recv() == {
                "ok": False, "error": "Unavailable: too many connections (max 2)"}
            assert await third.closed_by_server()
            await second.close()
            await third.close()
            sessions = node.sessions if port == node.tcp_port else gateway.sessions
            await eventually(lambda s=sessions: len(s) == 1, what="a place free again")
            fourth = await RawClient.connect(port)
            assert (await fourth.call({"cmd": "STATS"}))["ok"]
            await first.close()
            await fourth.close()
        held = [socket.create_connection(("127.0.0.1", node.http_port)) for _ in range(2)]
        await eventually(lambda: len(node._http.server.connections) == 2, what="2 HTTP conns")
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{node.http_port}/stats") as resp:
            assert resp.status == 503
            assert await resp.json() == {
                "ok": False, "error": "Unavailable: too many connections (max 2)"}
        for sock in held:
            sock.close()
        assert node.drops == {"too_many_connections": 1, "http_too_many_connections": 1}
        assert gateway.router.metrics.drops == {"too_many_connections": 1}
    finally:
        await gateway.stop()
        await node.stop()
        await cluster.stop()


# -- 2. answers within a byte budget ------------------------------------------------------------


async def test_answers_past_the_budget_wait_for_the_reader_and_all_come_in_order(
    make_node: Callable[..., Awaitable[Node]],
) -> None:
    node = await make_node(small_node(max_output=MiB))
    pusher = await RawClient.connect(node.tcp_port)
    job = await pusher.call({"cmd": "PUSH", "queue": "q", "data": "x" * (256 * 1024)})
    await pusher.close()
    client = Silent(node.tcp_port)
    lines = [{"cmd": "GETJOB", "id": job["id"], "reqId": i} for i in range(64)]
    await client.send(b"".join(orjson.dumps(line) + b"\n" for line in lines))  # one write

    async def getjobs() -> float:
        return node.requests.get("GETJOB", 0)

    ran = await settles(getjobs)
    assert ran < 64  # it stopped at the budget (the rest waits for the reader)
    got = await client.lines(64)
    assert [g["reqId"] for g in got] == list(range(64))
    assert all(g["ok"] and len(g["job"]["data"]) == 256 * 1024 for g in got)
    assert node.requests["GETJOB"] == 64
    client.close()


async def test_a_client_that_reads_nothing_is_disconnected_with_a_log_line_and_a_metric(
    make_node: Callable[..., Awaitable[Node]], caplog: pytest.LogCaptureFixture
) -> None:
    node = await make_node(small_node(max_output=MiB, output_timeout=1.0))
    pusher = await RawClient.connect(node.tcp_port)
    job = await pusher.call({"cmd": "PUSH", "queue": "q", "data": "x" * (512 * 1024)})
    await pusher.close()
    await eventually(lambda: not node.sessions)
    client = Silent(node.tcp_port)
    await client.send(b'{"cmd":"GETJOB","id":%d}\n' % job["id"] * 256)
    with caplog.at_level(logging.WARNING, "shardq_node.tcp"):
        await eventually(lambda: node.drops.get("output_stalled") == 1,
                         what="the stalled client cut")
    assert any("disconnecting client" in r.getMessage() and "output_timeout" in r.getMessage()
               for r in caplog.records)
    assert node.requests["GETJOB"] < 256
    await eventually(lambda: not node.sessions, what="the session gone")
    client.close()


async def test_an_answer_past_the_hard_limit_disconnects_at_once(
    make_node: Callable[..., Awaitable[Node]],
) -> None:
    node = await make_node(small_node(max_output=512 * 1024, max_output_hard=MiB))
    other = await RawClient.connect(node.tcp_port)
    big = await other.call({"cmd": "PUSH", "queue": "q", "data": "x" * (7 * MiB)})
    client = Silent(node.tcp_port)  # the kernels hold at most ~4.2 MiB of the 7 MiB answer
    await client.send(b'{"cmd":"GETJOB","id":%d}\n' % big["id"])
    await eventually(lambda: node.drops.get("output_limit") == 1, what="the hard limit")
    await eventually(lambda: len(node.sessions) == 1, what="only the other client left")
    assert (await other.call({"cmd": "STATS"}))["ok"]
    client.close()
    await other.close()


async def test_the_gateway_disconnects_a_client_that_reads_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster = await Cluster.start(1)
    gateway = await start_gateway(cluster, limits=Limits(max_output=MiB, output_timeout=1.0))
    try:
        pusher = await RawClient.connect(gateway.port)
        job = await pusher.call({"cmd": "PUSH", "queue": "q", "data": "x" * (512 * 1024)})
        client = Silent(gateway.port)
        await client.send(b'{"cmd":"GETJOB","id":%d}\n' % job["id"] * 256)
        drops = gateway.router.metrics.drops
        with caplog.at_level(logging.WARNING, "shardq_gateway.tcp"):
            await eventually(lambda: drops.get("output_stalled") == 1,
                             what="the stalled client cut")
        assert any("disconnecting client" in r.getMessage() for r in caplog.records)
        answered = gateway.router.metrics.requests.get(("GETJOB", "ok"), 0)
        assert answered < 256
        assert (await pusher.call({"cmd": "STATS"}))["ok"]  # the others go on
        client.close()
        await pusher.close()
    finally:
        await gateway.stop()
        await cluster.stop()


# -- memory, measured on processes --------------------------------------------------------------


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_gateway_process(port: int, http_port: int, seed: int,
                          *args: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "shardq.cli", "gateway", "--port", str(port),
           "--http-port", str(http_port), "--seed", f"127.0.0.1:{seed}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_port(port, proc=proc)
    wait_port(http_port, proc=proc)
    return proc


async def test_a_never_reading_client_with_4_mib_answers_costs_the_node_at_most_64_mib(
    procs: list[subprocess.Popen[bytes]], tmp_path: Path,
) -> None:
    port, http_port = free_port(), free_port()
    node = start_node_process(port, "--http-port", str(http_port), "--data-dir",
                              str(tmp_path / "data"), "--fsync", "always")
    procs.append(node)
    wait_port(http_port, proc=node)
    client = await RawClient.connect(port)
    job = await client.call({"cmd": "PUSH", "queue": "q", "data": "x" * (4 * MiB)})
    await scrape(http_port, "shardq_jobs")  # the HTTP side warmed up before measuring
    before = rss_mib(node.pid)
    silent = Silent(port)
    await silent.send(b'{"cmd":"GETJOB","id":%d}\n' % job["id"] * 256)  # one write
    ran = await settles(lambda: scrape(http_port, "shardq_requests_total", command="GETJOB"))
    grown, peak = rss_mib(node.pid) - before, rss_mib(node.pid, "VmHWM") - before
    print(f"\nnode: {ran:.0f} of 256 GETJOBs ran; RSS {before:.0f} MiB, +{grown:.1f} MiB "
          f"(peak +{peak:.1f} MiB)")
    assert ran < 256
    assert grown <= 64, f"the node grew {grown:.1f} MiB"
    assert (await client.call({"cmd": "STATS"}))["ok"]  # others are served meanwhile
    silent.close()
    await client.close()


async def test_a_never_reading_client_costs_the_gateway_a_bounded_amount_and_readers_lose_nothing(
    procs: list[subprocess.Popen[bytes]],
) -> None:
    node_port, gw_port, gw_http = free_port(), free_port(), free_port()
    node = start_node_process(node_port)
    procs.append(node)
    control = await RawClient.connect(node_port)
    topo = initial([NodeInfo("node-0", f"127.0.0.1:{node_port}")])
    assert (await control.call({"cmd": "SETTOPOLOGY", "topology": topo.wire()}))["ok"]
    gateway = start_gateway_process(gw_port, gw_http, node_port)
    procs.append(gateway)
    client = await RawClient.connect(gw_port)
    job = await client.call({"cmd": "PUSH", "queue": "q", "data": "x" * MiB})
    await scrape(gw_http, "shardq_gateway_connections")
    before = rss_mib(gateway.pid)
    silent = Silent(gw_port)
    await silent.send(b'{"cmd":"GETJOB","id":%d}\n' % job["id"] * 400)
    ran = await settles(lambda: scrape(gw_http, "shardq_gateway_requests_total",
                                       command="GETJOB", outcome="ok"))
    grown = rss_mib(gateway.pid) - before
    print(f"\ngateway: {ran:.0f} of 400 GETJOBs answered to a client that reads nothing; "
          f"RSS {before:.0f} MiB, +{grown:.1f} MiB")
    assert ran < 400
    assert grown <= 64, f"the gateway grew {grown:.1f} MiB"
    reader = await RawClient.connect(gw_port)  # one that reads gets all 400, in order
    reader.writer.write(b"".join(b'{"cmd":"GETJOB","id":%d,"reqId":%d}\n' % (job["id"], i)
                                 for i in range(400)))
    got = [await reader.recv(10) for _ in range(400)]
    assert [g.get("reqId") for g in got] == list(range(400))
    assert all(g["ok"] and len(g["job"]["data"]) == MiB for g in got)
    silent.close()
    for c in (reader, client, control):
        await c.close()


async def test_lines_behind_a_blocked_pull_are_bounded_in_bytes_and_freed_on_close(
    procs: list[subprocess.Popen[bytes]],
) -> None:
    port, http_port = free_port(), free_port()
    node = start_node_process(port, "--http-port", str(http_port))
    procs.append(node)
    wait_port(http_port, proc=node)
    await scrape(http_port, "shardq_jobs")
    before = rss_mib(node.pid)
    client = await RawClient.connect(port)
    await client.send({"cmd": "PULL", "queue": "empty"})  # blocks: the lines behind it wait
    line = b'{"cmd":"PUSH","queue":"q","data":"' + b"x" * MiB + b'"}\n'

    async def write_all() -> None:
        for _ in range(300):
            client.writer.write(line)
            await client.writer.drain()

    writing = asyncio.create_task(write_all())
    buffered = await settles(lambda: scrape(http_port, "shardq_connection_buffered_bytes"))
    grown = rss_mib(node.pid) - before
    print(f"\nbacklog: {buffered / MiB:.1f} MiB held behind the PULL; node +{grown:.1f} MiB")
    assert not writing.done()  # the node stopped reading: the client's writes wait
    assert buffered <= 8 * MiB + 2 * MiB  # max_backlog_bytes, plus what one read brings
    assert grown <= 32
    writing.cancel()
    # The client goes with lines still unsent: its FIN would wait behind them (the node reads
    # nothing), so its kernel resets the connection, as it does when it gives up.
    sock = client.writer.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.writer.transport.abort()
    await eventually(lambda: _zero(http_port), 20, what="the backlog freed after a reset")
    # A client that sent all it had and closed (FIN) is noticed while its reading is paused
    # (paused here by max_backlog_lines: small lines, all of them in the node's buffers)
    second = await RawClient.connect(port)
    await second.send({"cmd": "PULL", "queue": "empty"})
    second.writer.write(b'{"cmd":"STATS"}\n' * 10_050)
    await asyncio.wait_for(second.writer.drain(), 10)
    await eventually(lambda: _paused(http_port), 20, what="reading paused")
    await second.close()
    await eventually(lambda: _zero(http_port), 20, what="the backlog freed after a close")
    stats = await RawClient.connect(port)
    assert (await stats.call({"cmd": "STATS"}))["jobs"] == 0  # none of them ran
    await stats.close()


async def _paused(http_port: int) -> bool:
    return await scrape(http_port, "shardq_connection_buffered_bytes") >= 10_000 * 15


async def _zero(http_port: int) -> bool:
    return await scrape(http_port, "shardq_connection_buffered_bytes") == 0 and \
        await scrape(http_port, "shardq_connections") == 0
