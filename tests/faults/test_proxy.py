"""The fault proxy against a real echo server on loopback: pass, cut, black-hole, delay, heal,
per source IP, and a close that leaves no task or connection behind."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from ..helpers import eventually
from .proxy import Proxy

NODE_IP = "127.0.0.31"
PROXY_IP = "127.0.0.32"
ALICE = "127.0.0.41"
BOB = "127.0.0.42"


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    server = await asyncio.start_server(_echo, NODE_IP, 0)
    port = server.sockets[0].getsockname()[1]
    p = await Proxy("echo", PROXY_IP, (NODE_IP, port)).start()
    yield p
    await p.close()
    assert not p.links and not p.tasks
    server.close()
    await server.wait_closed()


async def _connect(proxy: Proxy, source: str) -> tuple[asyncio.StreamReader,
                                                       asyncio.StreamWriter]:
    return await asyncio.open_connection(PROXY_IP, proxy.port, local_addr=(source, 0))


async def _roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     line: bytes, timeout: float = 2.0) -> bytes:
    writer.write(line + b"\n")
    return await asyncio.wait_for(reader.readline(), timeout)


async def test_passes_bytes_both_ways(proxy: Proxy) -> None:
    reader, writer = await _connect(proxy, ALICE)
    for i in range(50):
        assert await _roundtrip(reader, writer, b"x" * i) == b"x" * i + b"\n"
    writer.close()
    await eventually(lambda: not proxy.links, timeout=5, what="the link closed after the client")
    assert proxy.stats.accepted == 1 and proxy.stats.bytes[0] == proxy.stats.bytes[1] > 1000


async def test_cut_aborts_one_source_and_refuses_it_while_others_pass(proxy: Proxy) -> None:
    a_reader, a_writer = await _connect(proxy, ALICE)
    b_reader, b_writer = await _connect(proxy, BOB)
    assert await _roundtrip(a_reader, a_writer, b"a") == b"a\n"
    assert await _roundtrip(b_reader, b_writer, b"b") == b"b\n"
    proxy.cut(ALICE)
    assert await asyncio.wait_for(a_reader.read(), 2) == b""  # existing connection: gone
    assert await _roundtrip(b_reader, b_writer, b"b2") == b"b2\n"  # Bob is not concerned
    refused_reader, refused_writer = await _connect(proxy, ALICE)  # accepted, aborted at once
    try:
        got = await _roundtrip(refused_reader, refused_writer, b"again")
    except ConnectionError:
        got = b""
    assert got == b""
    assert proxy.stats.aborted >= 2
    proxy.heal(ALICE)
    reader, writer = await _connect(proxy, ALICE)
    assert await _roundtrip(reader, writer, b"back") == b"back\n"
    for w in (writer, b_writer, a_writer, refused_writer):
        w.close()


async def test_blackhole_holds_everything_until_healed_then_delivers_in_order(
        proxy: Proxy) -> None:
    reader, writer = await _connect(proxy, ALICE)
    assert await _roundtrip(reader, writer, b"before") == b"before\n"
    proxy.blackhole()  # every source
    for i in range(20):
        writer.write(b"held-%d\n" % i)
    new_reader, new_writer = await _connect(proxy, BOB)  # accepted, never forwarded
    new_writer.write(b"new\n")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readline(), 0.5)  # the fault's length: silence for 0.5 s
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(new_reader.readline(), 0.1)
    proxy.heal()
    for i in range(20):
        assert await asyncio.wait_for(reader.readline(), 2) == b"held-%d\n" % i
    assert await asyncio.wait_for(new_reader.readline(), 2) == b"new\n"
    writer.close()
    new_writer.close()


async def test_delay_adds_latency_to_each_direction_and_keeps_order(proxy: Proxy) -> None:
    reader, writer = await _connect(proxy, ALICE)
    started = time.monotonic()
    await _roundtrip(reader, writer, b"fast")
    fast = time.monotonic() - started
    proxy.delay(0.15, ALICE)
    started = time.monotonic()
    for i in range(10):
        writer.write(b"%d\n" % i)
    got = [await asyncio.wait_for(reader.readline(), 2) for _ in range(10)]
    slow = time.monotonic() - started
    assert got == [b"%d\n" % i for i in range(10)]
    assert slow >= 0.3 > fast  # 0.15 s to the node and 0.15 s back
    proxy.heal()
    writer.close()


async def test_close_aborts_every_connection_and_connects_in_flight(proxy: Proxy) -> None:
    writers = []
    for source in (ALICE, BOB):
        reader, writer = await _connect(proxy, source)
        assert await _roundtrip(reader, writer, b"hi") == b"hi\n"
        writers.append((reader, writer))
    proxy.blackhole(BOB)
    writers.append(await _connect(proxy, BOB))  # a link that never connected to the node
    await eventually(lambda: len(proxy.links) == 3, timeout=2, what="three links")
    await proxy.close()
    assert not proxy.links and not proxy.tasks
    for reader, writer in writers:
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
