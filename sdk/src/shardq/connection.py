"""One pipelined TCP connection to a node or gateway (the SDK's transport).

Requests are written as they come; answers arrive strictly in request order,
so each request waits on a future at the back of a FIFO. Event lines (after
SUBSCRIBE) are told apart by their ``event`` key and go to ``events``. A
lost connection fails every waiting request with ``ShardqConnectionError``: their
outcome is unknown, and they are never sent again here.

A draining gateway (docs/protocol.md) answers ``GatewayDraining`` to the first request
it did not run, or unasked when nothing is in flight, and runs nothing sent after it on
that connection: that request and every one still waiting behind it fail with
``GatewayDraining`` (safe to send again, on a new connection) and the connection closes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import orjson

from shardq.errors import GatewayDraining, NotSent, ShardqConnectionError, error_from_text

DEFAULT_ADDRESS = "127.0.0.1:6789"
DRAINING_TEXT = GatewayDraining().text


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``shardq://host:port`` (port defaults to 6789)."""
    addr = address.removeprefix("shardq://").removeprefix("tcp://").rstrip("/")
    host, sep, port = addr.rpartition(":")
    if not sep:
        return addr or "127.0.0.1", 6789
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "127.0.0.1", int(port)


class _Protocol(asyncio.Protocol):
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.parts: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        end = data.rfind(b"\n")
        if end < 0:
            self.parts.append(data)
            return
        head = data[:end]
        if self.parts:
            head = b"".join(self.parts) + head
            self.parts = []
        tail = data[end + 1 :]
        if tail:
            self.parts.append(tail)
        for line in head.split(b"\n"):
            self.conn._answer(orjson.loads(line))

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn._lost(exc)

    def pause_writing(self) -> None:
        self.conn._writable.clear()

    def resume_writing(self) -> None:
        self.conn._writable.set()


class Connection:
    """A pipelined connection. ``await call(req)`` returns the answer dict or raises."""

    def __init__(self, address: str = DEFAULT_ADDRESS, token: str | None = None) -> None:
        self.address = address
        self.token = token
        self.transport: asyncio.Transport | None = None
        self.pending: deque[asyncio.Future[dict[str, Any]]] = deque()
        self.events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.closed = False
        self.error: Exception | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    async def open(self, timeout: float = 10.0) -> Connection:
        host, port = parse_address(self.address)
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(self), host, port), timeout
            )
        except (TimeoutError, OSError) as exc:
            raise NotSent(f"cannot connect to {self.address}: {exc}") from None
        self.transport = transport  # uvloop's transports are not asyncio.Transport subclasses
        if self.token is not None:
            await self.call({"cmd": "AUTH", "token": self.token})
        return self

    def send(self, req: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """Write one request now; the future resolves with its answer."""
        if self.closed or self.transport is None:
            raise NotSent(f"connection to {self.address} is closed")
        line = orjson.dumps(req) + b"\n"  # a request that cannot be encoded leaves no trace
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        self.transport.write(line)
        return fut

    async def call(self, req: dict[str, Any]) -> dict[str, Any]:
        if not self._writable.is_set():
            await self._writable.wait()
        answer = await self.send(req)
        if answer.get("ok") is False:
            raise error_from_text(str(answer.get("error")))
        return answer

    def _answer(self, obj: Any) -> None:
        if type(obj) is dict and "event" in obj and "ok" not in obj:
            self.events.put_nowait(obj)
            return
        if type(obj) is dict and obj.get("ok") is False and str(obj.get("error")).startswith(
                DRAINING_TEXT):
            self._drained()
            return
        if self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_result(obj)

    def _drained(self) -> None:
        """A draining gateway ran none of the requests still waiting: they fail with
        ``GatewayDraining`` (the caller sends them again elsewhere); no more are sent here."""
        self.closed = True
        self.error = GatewayDraining()
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(GatewayDraining())
        if self.transport is not None:
            self.transport.close()

    def _lost(self, exc: Exception | None) -> None:
        self.closed = True
        if isinstance(self.error, GatewayDraining):
            self.events.put_nowait(None)
            self._writable.set()
            return
        self.error = ShardqConnectionError(
            f"connection to {self.address} lost" + (f": {exc}" if exc else "")
        )
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(self.error)
        self.events.put_nowait(None)
        self._writable.set()

    async def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
            self.closed = True
        await asyncio.sleep(0)
