"""A stand-in for a Kubernetes Service in front of gateways, on loopback (tests only).

Like kube-proxy, it spreads new connections round-robin over the backends that are
*ready*, and learns readiness late: it polls each backend's ``/ready`` every ``period``
seconds, as the kubelet's probes and the endpoint controller do. A connection is relayed
byte for byte both ways, half-closes included, and stays on its backend until one side
closes it. It stands in for Kubernetes, not for a shardq component.

Must not: look into the bytes it relays.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import aiohttp

CHUNK = 64 * 1024


@dataclass
class Backend:
    port: int
    http_port: int
    ready: bool = False


class Balancer:
    def __init__(self, period: float = 0.5) -> None:
        self.period = period
        self.backends: list[Backend] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self._next = 0
        self._poller: asyncio.Task[None] | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        #: connections it could not place (no ready backend, or the connect failed)
        self.refused = 0

    async def start(self) -> Balancer:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self._poller = asyncio.create_task(self._poll())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, port: int, http_port: int) -> Backend:
        backend = Backend(port, http_port)
        self.backends.append(backend)
        return backend

    def ready_ports(self) -> list[int]:
        return [b.port for b in self.backends if b.ready]

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self._pipes):
            task.cancel()

    # -- readiness --------------------------------------------------------------------------

    async def _poll(self) -> None:
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                for backend in list(self.backends):
                    backend.ready = await self._probe(http, backend)
                await asyncio.sleep(self.period)  # the probe period, not a wait for a state

    @staticmethod
    async def _probe(http: aiohttp.ClientSession, backend: Backend) -> bool:
        try:
            async with http.get(f"http://127.0.0.1:{backend.http_port}/ready") as answer:
                return answer.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    # -- relaying ---------------------------------------------------------------------------

    def _pick(self) -> Backend | None:
        ready = [b for b in self.backends if b.ready]
        if not ready:
            return None
        self._next += 1
        return ready[self._next % len(ready)]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend = self._pick()
        try:
            if backend is None:
                raise OSError("no ready backend")
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", backend.port)
        except OSError:
            self.refused += 1
            writer.close()
            return
        both = [asyncio.create_task(self._pipe(reader, up_writer)),
                asyncio.create_task(self._pipe(up_reader, writer))]
        self._pipes.update(both)
        try:
            await asyncio.gather(*both, return_exceptions=True)
        finally:
            self._pipes.difference_update(both)
            for w in (writer, up_writer):
                w.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy until EOF, then pass the half-close on (a FIN for a FIN)."""
        try:
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            with contextlib.suppress(Exception):
                writer.transport.abort()
