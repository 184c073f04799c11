"""The gateway's HTTP server (port 6790): the shared HTTP API, and the web dashboard at ``/``.

HTTP requests become protocol requests sent to the gateway's own TCP server on
loopback, so they take exactly the TCP path (routing, retries, leases, fan-out)
without a second implementation of it. HTTP has no connection to hold a lease:
the HTTP clients of one gateway are one holder, as on a node (``HttpLeases``,
docs/decisions.md). A pull that may wait gets a connection
of its own; ``/events`` subscribes on one. ``/metrics`` is the gateway's own
(shardq_gateway.metrics): scrape the nodes for theirs. The dashboard is static
files (``gateway/static``), no CDN; it calls this API from the browser, and
``/shards`` (shards.py), which asks the members of replicated shards for their
status.

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
from shardq_server.http_api import HttpSettings, envelope, make_app
from shardq_server.http_site import start_http

from .metrics import exposition, registry_for
from .shards import StatusProbe

if TYPE_CHECKING:
    from .main import Gateway

STATIC = Path(__file__).parent / "static"
WAITING_PULLS = frozenset({"PULL", "PULLB"})
LEASED = frozenset({"ACK", "FAIL", "PROGRESS", "TOUCH"})
SETTLING = frozenset({"ACK", "FAIL"})


class HttpLeases:
    """The lease tokens of the jobs pulled over this gateway's HTTP API (the newest
    ``limit``): a lease-less ACK, FAIL, PROGRESS or TOUCH over HTTP gets its job's token, so
    HTTP settles what HTTP pulled and never an attempt a TCP client holds."""

    def __init__(self, limit: int = 100_000) -> None:
        self.tokens: dict[int, int] = {}
        self.limit = limit

    def took(self, answer: dict[str, Any]) -> None:
        jobs = answer.get("jobs")
        if jobs is None:
            jobs = [answer["job"]] if answer.get("job") else []
        for job in jobs:
            if type(job) is dict and type(job.get("id")) is int:
                self.tokens[job["id"]] = job.get("started_at") or 0
        while len(self.tokens) > self.limit:
            del self.tokens[next(iter(self.tokens))]

    def attach(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd, job_id = req.get("cmd"), req.get("id")
        if cmd not in LEASED or type(job_id) is not int or req.get("lease") is not None:
            return req
        token = (self.tokens.pop if cmd in SETTLING else self.tokens.get)(job_id, None)
        return req if token is None else {**req, "lease": token}


class GatewayBackend:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.registry = registry_for(gateway)
        self._shared: Connection | None = None
        self._idle: list[Connection] = []
        self._lock = asyncio.Lock()
        self.probe = StatusProbe(gateway.settings.node_token(),
                                 min(1.0, gateway.settings.connect_timeout))
        self.leases = HttpLeases()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    def _token(self) -> str | None:
        tokens = self.gateway.settings.tokens
        return tokens[0] if tokens else None

    async def _open(self) -> Connection:
        return await Connection(self.address, self._token()).open(5)

    async def call(self, req: dict[str, Any]) -> dict[str, Any]:
        req = self.leases.attach(req)
        if req.get("cmd") in WAITING_PULLS and req.get("timeout") != 0:
            answer = await self._own_connection(req)
        else:
            async with self._lock:
                if self._shared is None or self._shared.closed:
                    self._shared = await self._open()
                conn = self._shared
            answer = await conn.send(req)
        if req.get("cmd") in WAITING_PULLS and answer.get("ok"):
            self.leases.took(answer)
        return answer

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

    async def health(self) -> tuple[int, bool, dict[str, Any]]:
        answer = await self.call({"cmd": "STATS"})
        if answer.get("ok") is not True:
            return 0, False, {}
        return int(answer.get("memory_bytes", 0)), not answer.get("storage_failed"), {}

    async def shards(self) -> dict[str, Any]:
        topo = self.gateway.router.topology
        rows = await self.probe.shards(topo) if topo.shards else []
        return {"epoch": topo.epoch, "shards": rows}

    async def close(self) -> None:
        for conn in [*self._idle, *([self._shared] if self._shared else [])]:
            await conn.close()
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
