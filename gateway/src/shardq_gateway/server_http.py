"""The gateway's HTTP server (port 6790): the shared HTTP API, and the web dashboard at ``/``.

HTTP requests become protocol requests routed in-process by the same routes as TCP
lines (http_backend.py), so they take exactly the TCP path (routing, retries,
leases, fan-out) without a second implementation of it, and without a connection to
the gateway itself. HTTP has no connection to hold a lease: the HTTP clients of one
gateway are one holder, as on a node (docs/decisions.md). ``/metrics`` is the gateway's own
(shardq_gateway.metrics): scrape the nodes for theirs. The dashboard is static
files (``gateway/static``), no CDN; it calls this API from the browser, and
``/shards`` (shards.py), which asks the members of replicated shards for their
status.

Must not: route anything itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from shardq_server.http_api import HttpSettings, envelope, make_app
from shardq_server.http_site import start_http

from .http_backend import HttpRequests
from .metrics import exposition, registry_for
from .shards import StatusProbe

if TYPE_CHECKING:
    from .main import Gateway

STATIC = Path(__file__).parent / "static"


class GatewayBackend:
    """The HTTP API's ``Backend`` on a gateway: requests and event streams routed in-process
    (http_backend.py), the gateway's own metrics, readiness and health."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.router = gateway.router
        self.registry = registry_for(gateway)
        self.requests = HttpRequests(gateway.router, gateway.settings, gateway.next_index())
        self.probe = StatusProbe(gateway.settings.node_token(),
                                 min(1.0, gateway.settings.connect_timeout))

    async def call(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self.requests.call(req)

    def events(self, queue: str, names: frozenset[str]) -> AsyncIterator[bytes]:
        return self.requests.events(queue, names)

    def metrics_text(self) -> bytes:
        return exposition(self.registry)

    def readiness(self) -> tuple[bool, str]:
        if self.gateway.draining:  # SIGTERM: out of the Service's endpoints (drain.py)
            return False, "draining"
        epoch = self.router.epoch
        return (epoch >= 0, "ok" if epoch >= 0 else "no topology yet")

    async def health(self) -> tuple[int, bool, dict[str, Any]]:
        answer = await self.call({"cmd": "STATS"})
        if answer.get("ok") is not True:
            return 0, False, {}
        return int(answer.get("memory_bytes", 0)), not answer.get("storage_failed"), {}

    async def shards(self) -> dict[str, Any]:
        topo = self.router.topology
        rows = await self.probe.shards(topo) if topo.shards else []
        return {"epoch": topo.epoch, "shards": rows}

    async def close(self) -> None:
        self.requests.close()
        await self.probe.close()


async def dashboard(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


def shards_route(backend: GatewayBackend) -> web.AbstractRouteDef:
    """``GET /shards``: every shard with its members' roles and lag (shards.py); an empty list
    when the topology has no shards."""

    async def shards(request: web.Request) -> web.Response:
        return envelope(await backend.shards())

    return web.get("/shards", shards)


async def start(gateway: Gateway) -> tuple[web.AppRunner, int, GatewayBackend]:
    s = gateway.settings
    backend = GatewayBackend(gateway)
    extra: list[web.AbstractRouteDef] = [web.get("/", dashboard), shards_route(backend)]
    if STATIC.is_dir():
        extra.append(web.static("/static", STATIC))
    settings = HttpSettings(tokens=s.tokens, max_body=s.max_line + 64 * 1024, extra=extra,
                            limits=s.limits, server="the gateway",
                            on_drop=gateway.router.metrics.dropped)
    runner, port = await start_http(make_app(backend, settings), s.host, s.http_port)
    return runner, port, backend
