"""The failover controller and the rebalancer never wait forever on a node that accepts a
connection and says nothing (a SIGSTOPped process: the kernel completes the handshake)."""

from __future__ import annotations

import asyncio
import time

import pytest

from shardq_operator.controller import Controller, ControllerSettings
from shardq_operator.rebalance import RebalanceError, Rebalancer
from shardq_operator.store import MemoryStore

HELD: list[asyncio.StreamWriter] = []


async def _mute_server() -> tuple[asyncio.AbstractServer, str]:
    held = HELD

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never answers, never closes

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"127.0.0.1:{port}"


async def test_a_probe_of_a_mute_node_with_a_token_times_out() -> None:
    server, address = await _mute_server()
    controller = Controller(MemoryStore(), ControllerSettings(probe_timeout=0.3, token="t"))
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            await controller.call(address, {"cmd": "STATUS"})
    finally:
        await controller.close()
        server.close()
        _release()
    assert time.monotonic() - started < 2.0


async def test_the_rebalancer_gives_up_on_a_mute_node() -> None:
    server, address = await _mute_server()
    reb = Rebalancer(token="t", retry_for=0.5)
    try:
        with pytest.raises(RebalanceError):
            await asyncio.wait_for(reb.call(address, {"cmd": "TOPOLOGY"}), 30)
    finally:
        await reb.close()
        server.close()
        _release()


def _release() -> None:
    for writer in HELD:
        writer.close()
    HELD.clear()
