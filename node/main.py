"""Running a node as a process: event loop choice, signals, graceful stop."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable

from .runtime import Node
from .settings import NodeSettings

log = logging.getLogger("shardq.node")


def install_uvloop() -> bool:
    """Use uvloop's event loop policy when it is installed."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def serve(settings: NodeSettings, on_ready: Callable[[Node], None] | None = None) -> None:
    """Start a node and run it until SIGTERM/SIGINT."""
    node = Node(settings)
    await node.start()
    gc.freeze()  # the recovered state is long-lived: keep it out of every collection
    log.info("node %s listening on %s:%d", settings.name, settings.host, node.tcp_port)
    if on_ready is not None:
        on_ready(node)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
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
