"""Serving the HTTP API: the listening socket and the bounds of a connection (docs/limits.md,
"HTTP").

``start_http`` serves an app of http_api.py on a ``LimitedSite``: past
``http_max_connections`` a new connection gets one 503 naming the limit and is closed
(counted by ``on_drop``); a connection that sends no complete request head within
``http_header_timeout`` (or idles that long) is closed; a handler whose client left is
cancelled.

Must not: know a route; those are http_api.py's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import orjson
from aiohttp import web

from .http_api import SETTINGS
from .limits import too_many_connections

#: After an answer that left a body unread, the rest is read and dropped this long at most.
LINGER_SECONDS = 10.0


class _Refuse(asyncio.Protocol):
    """A connection past ``http_max_connections``: one 503, then closed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        body = orjson.dumps({"ok": False, "error": too_many_connections(self.limit)})
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
        cast(asyncio.Transport, transport).write(head.encode() + body)
        transport.close()


class LimitedSite(web.BaseSite):
    """A TCP site that serves at most ``limit`` connections at once; more get a 503."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, limit: int,
                 on_drop: Callable[[str], None]) -> None:
        super().__init__(runner)
        self.host = host
        self.port = port
        self.limit = limit
        self.on_drop = on_drop

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None

        def connection() -> asyncio.BaseProtocol:
            if len(server.connections) >= self.limit:
                self.on_drop("http_too_many_connections")
                return _Refuse(self.limit)
            return server()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(connection, self.host, self.port,
                                                reuse_address=True)

    @property
    def port_bound(self) -> int:
        sockets = getattr(self._server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else self.port


async def start_http(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve ``app``; returns the runner (for cleanup) and the bound port."""
    limits = app[SETTINGS].limits
    # a handler whose client left is cancelled (SSE streams and waiting pulls end at once);
    # a connection with no complete request head after header_timeout is closed (aiohttp's
    # keep-alive timer runs from the connection's start and after each response); after an
    # answer that left a body unread (413, 408), the rest is drained for at most 10 s
    # (aiohttp's default), or body_timeout if shorter
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                           keepalive_timeout=limits.http_header_timeout,
                           lingering_time=min(LINGER_SECONDS, limits.http_body_timeout))
    await runner.setup()
    site = LimitedSite(runner, host, port, limits.http_max_connections, app[SETTINGS].on_drop)
    await site.start()
    return runner, site.port_bound
