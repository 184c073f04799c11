"""Fixtures of the integration tests: a cluster of three in-process nodes on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ..cluster import Cluster


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    """Three real nodes in this test's event loop (a module may define its own ``cluster``)."""
    c = await Cluster.start(3)
    yield c
    await c.stop()
