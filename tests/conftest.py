"""Shared fixtures: real nodes on 127.0.0.1, raw clients, a fake clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from shardq_node.runtime import Node
from shardq_node.settings import NodeSettings

from .helpers import FakeClock, RawClient


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    """A real node in this test's event loop, listening on a free loopback port."""
    n = Node(NodeSettings(port=0, http_port=0))
    await n.start()
    yield n
    await n.stop()


@pytest.fixture
async def make_node() -> AsyncIterator[Callable[..., object]]:
    started: list[Node] = []

    async def make(settings: NodeSettings | None = None, **kw: object) -> Node:
        s = settings or NodeSettings(port=0, http_port=0)
        n = Node(s, **kw)  # type: ignore[arg-type]
        await n.start()
        started.append(n)
        return n

    yield make
    for n in started:
        await n.stop()


@pytest.fixture
async def raw(node: Node) -> AsyncIterator[RawClient]:
    client = await RawClient.connect(node.tcp_port)
    yield client
    await client.close()
