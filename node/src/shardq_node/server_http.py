"""The node's HTTP server (port 6790): the shared HTTP API (shardq_server.http_api) over this node.

Each route becomes one protocol request run in-process (http_backend.py), so HTTP
and TCP share every rule. Also: /metrics from the node's collector, /ready
(false while recovering, or while the node is in a cluster and owns no slot),
/health read straight from the node (with its role in its shard), and /events as
Server-Sent Events.

Must not: change engine state except through ``Node.execute_request``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from shardq import native
from shardq_server.http_api import HttpSettings, make_app
from shardq_server.http_site import start_http

from .http_backend import EventStream, call
from .metrics import exposition, registry_for
from .replication import PRIMARY

if TYPE_CHECKING:
    from .runtime import Node


class NodeBackend:
    def __init__(self, node: Node, max_queue_labels: int) -> None:
        self.node = node
        self.registry = registry_for(node, max_queue_labels)

    async def call(self, req: dict[str, Any]) -> dict[str, Any]:
        return await call(self.node, req)

    async def events(self, queue: str, names: frozenset[str]) -> AsyncIterator[bytes]:
        stream = EventStream(self.node)
        self.node.events.subscribe(stream, queue, names)
        try:
            while True:
                line = await stream.queue.get()
                if line is None:
                    yield (b'{"event":"dropped","error":"subscriber too slow: more than '
                           b'10000 events unread"}')
                    return
                yield line
        finally:
            stream.close()

    def metrics_text(self) -> bytes:
        return exposition(self.registry)

    def readiness(self) -> tuple[bool, str]:
        node = self.node
        if not node.ready:
            return False, "recovering"
        if not node.cluster.standalone and not any(node.cluster.state):
            return False, "owns no slots yet"
        if node.log.failed is not None:
            return False, f"storage failed: {node.log.failed}"
        return True, "ok"

    async def health(self) -> tuple[int, bool, dict[str, Any]]:
        """Read from the node at once: a STATS through ``call`` would wait for the log, and a
        primary without quorum holds every answer until it has one again."""
        node = self.node
        repl = node.replication
        refusing = (repl.role == PRIMARY and repl.no_quorum_since is not None
                    and repl.quorum_lost_for() > node.settings.failure_timeout)
        role = {"role": repl.role, "shard": repl.shard_name, "term": repl.term,
                "compiled": native.status().compiled}
        return node.engine.payload_bytes, node.log.failed is None and not refusing, role


async def start(node: Node) -> tuple[web.AppRunner, int]:
    s = node.settings
    settings = HttpSettings(
        tokens=s.tokens, max_body=s.storage.max_payload + 64 * 1024,
        memory_budget=s.storage.memory_budget, max_pull_wait_ms=s.http_max_pull_wait_ms,
        limits=s.limits, server=f"node {s.name}", on_drop=node.dropped,
    )
    app = make_app(NodeBackend(node, s.max_queue_labels), settings)
    return await start_http(app, s.host, s.http_port)
