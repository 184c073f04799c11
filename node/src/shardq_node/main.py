"""Running a node as a process: event loop choice, signals, graceful stop."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable

from shardq import native
from shardq_server.running import install_uvloop, until_signalled

from .runtime import Node
from .settings import NodeSettings

log = logging.getLogger("shardq_node")



async def serve(settings: NodeSettings, on_ready: Callable[[Node], None] | None = None) -> None:
    """Start a node and run it until SIGTERM/SIGINT."""
    node = Node(settings)
    await node.start()
    gc.freeze()  # the recovered state is long-lived: keep it out of every collection
    log.info("node %s listening on %s:%d", settings.name, settings.host, node.tcp_port)
    log.info("node %s runs %s", settings.name, native.status().describe())
    if on_ready is not None:
        on_ready(node)
    try:
        await until_signalled()
    finally:
        log.info("node %s stopping", settings.name)
        await node.stop()


def tune_gc() -> None:
    """Fewer, cheaper collections: a node holds millions of long-lived objects (its jobs).

    The default thresholds collect every 700 allocations and, at a million waiting
    jobs, a full collection pauses the node for ~300 ms; garbage collection took a
    quarter of the node's CPU under PUSHB (BENCHMARKS.md, profile). Young
    collections are rarer here, and what exists at start (code, recovered state) is
    frozen out of every later collection.
    """
    gc.set_threshold(100_000, 50, 100)


def run(settings: NodeSettings, on_ready: Callable[[Node], None] | None = None) -> None:
    install_uvloop()
    tune_gc()
    asyncio.run(serve(settings, on_ready))
