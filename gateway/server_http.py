"""The gateway's HTTP server (port 6790): the shared HTTP API, and the web dashboard at ``/``.

HTTP requests become protocol requests sent to the gateway's own TCP server on
loopback, so they take exactly the TCP path (routing, retries, leases, fan-out)
without a second implementation of it. A pull that may wait gets a connection
of its own; ``/events`` subscribes on one. ``/metrics`` is the gateway's own
(gateway/metrics.py): scrape the nodes for theirs. The dashboard is static
files (``gateway/static``), no CDN; it calls this API from the browser.

Must not: route anything itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from shardq.connection import Connection
from shardq.http_api import HttpSettings, make_app, start_http

from .metrics import exposition, registry_for

if TYPE_CHECKING:
    from .main import Gateway

STATIC = Path(__file__).parent / "static"
WAITING_PULLS = frozenset({"PULL", "PULLB"})


class GatewayBackend:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.registry = registry_for(gateway)
        self._shared: Connection | None = None
        self._idle: list[Connection] = []
        self._lock = asyncio.Lock()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    def _token(self) -> str | None:
        tokens = self.gateway.settings.tokens
        return tokens[0] if tokens else None

    async def _open(self) -> Connection:
        return await Connection(self.address, self._token()).open(5)

    async def call(self, req: dict[str, Any]) -> dict[str, Any]:
        if req.get("cmd") in WAITING_PULLS and req.get("timeout") != 0:
            return await self._own_connection(req)
        async with self._lock:
            if self._shared is None or self._shared.closed:
                self._shared = await self._open()
            conn = self._shared
        return await conn.send(req)

    async def _own_connection(self, req: dict[str, Any]) -> dict[str, Any]:
        conn = self._idle.pop() if self._idle else await self._open()
        try:
            answer = await conn.send(req)
        except BaseException:
            await conn.close()
            raise
        if not conn.closed and len(self._idle) < 16:
            self._idle.append(conn)
        else:
            await conn.close()
        return answer

    async def events(self, queue: str, names: frozenset[str]) -> AsyncIterator[bytes]:
        conn = await self._open()
        try:
            answer = await conn.send({"cmd": "SUBSCRIBE", "queue": queue, "events": sorted(names)})
            if not answer.get("ok"):
                yield orjson.dumps({"event": "error", "error": answer.get("error")})
                return
            while True:
                event = await conn.events.get()
                if event is None:
                    return
                yield orjson.dumps(event)
        finally:
            await conn.close()

    def metrics_text(self) -> bytes:
        return exposition(self.registry)

    def readiness(self) -> tuple[bool, str]:
        epoch = self.gateway.router.epoch
        return (epoch >= 0, "ok" if epoch >= 0 else "no topology yet")

    async def close(self) -> None:
        for conn in [*self._idle, *([self._shared] if self._shared else [])]:
            await conn.close()


async def dashboard(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def start(gateway: Gateway) -> tuple[web.AppRunner, int, GatewayBackend]:
    s = gateway.settings
    backend = GatewayBackend(gateway)
    extra: list[web.AbstractRouteDef] = [web.get("/", dashboard)]
    if STATIC.is_dir():
        extra.append(web.static("/static", STATIC))
    settings = HttpSettings(tokens=s.tokens, max_body=s.max_line + 64 * 1024, extra=extra,
                            limits=s.limits, server="the gateway",
                            on_drop=gateway.router.metrics.dropped)
    runner, port = await start_http(make_app(backend, settings), s.host, s.http_port)
    return runner, port, backend
