"""Running a gateway: the ``Gateway`` object (router and TCP server), ``serve`` and ``run``.

A gateway holds no state a client could lose: the topology comes from the
nodes, and everything else lives as long as a client connection. Several can
run side by side in front of the same nodes.

Must not: import the node's code (an import-linter contract checks it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from shardq import native
from shardq_server.auth import Auth
from shardq_server.running import install_uvloop, until_signalled

from .drain import drain
from .router import Router
from .server_tcp import ClientSession, start_tcp
from .settings import GatewaySettings
from .upstream import Flusher

log = logging.getLogger("shardq_gateway")


class Gateway:
    """One gateway: load the topology, then serve the line protocol."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.auth = Auth(settings.tokens)
        self.flusher = Flusher()
        self.router = Router(settings, self.flusher)
        self.sessions: set[ClientSession] = set()
        self.server: asyncio.AbstractServer | None = None
        self._sessions_opened = 0
        self._http: Any = None
        self._http_backend: Any = None
        self.http_port = 0
        #: SIGTERM came: /ready fails (drain.py); still serving as usual
        self.draining = False
        #: the drain closes connections: a new one is drained as soon as it is made
        self.closing = False

    async def start(self) -> None:
        """Read the topology from the seeds (retrying), then listen."""
        await self.router.load()
        s = self.settings
        if s.topology_poll > 0:
            self.router._poller = asyncio.get_running_loop().create_task(
                self.router.poll(s.topology_poll))
        self.server = await start_tcp(self, s.host, s.port)
        if s.http_port:
            from . import server_http

            self._http, self.http_port, self._http_backend = await server_http.start(self)

    @property
    def port(self) -> int:
        """The TCP port it listens on (useful with ``port=0``)."""
        assert self.server is not None, "the gateway is not started"
        sock = self.server.sockets[0]  # type: ignore[attr-defined]
        port: int = sock.getsockname()[1]
        return port

    def next_index(self) -> int:
        """A number per session: which shared connection to each node it uses."""
        self._sessions_opened += 1
        return self._sessions_opened

    async def stop(self) -> None:
        if self._http is not None:
            await self._http_backend.close()
            await self._http.cleanup()
            self._http = None
        if self.server is not None:
            self.server.close()
        for session in list(self.sessions):
            session.close()
            if session.transport is not None:
                session.transport.close()  # one half-closed by the drain, too
        if self.server is not None:
            await self.server.wait_closed()
        await self.router.close()
        await asyncio.sleep(0)  # let the closed connections' callbacks run



async def serve(
    settings: GatewaySettings, on_ready: Callable[[Gateway], None] | None = None
) -> None:
    """Start a gateway and run it until SIGTERM/SIGINT, then drain it (drain.py) and stop."""
    gateway = Gateway(settings)
    await gateway.start()
    log.info("gateway listening on %s:%d (topology epoch %d, %d nodes)", settings.host,
             gateway.port, gateway.router.epoch, len(gateway.router.members))
    log.info("gateway runs %s", native.status().describe())
    if on_ready is not None:
        on_ready(gateway)
    try:
        await until_signalled()
        await drain(gateway)
    finally:
        log.info("gateway stopping")
        await gateway.stop()


def run(settings: GatewaySettings, on_ready: Callable[[Gateway], None] | None = None) -> None:
    install_uvloop()
    asyncio.run(serve(settings, on_ready))
