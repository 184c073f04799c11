"""Connections from the gateway to one node: raw request lines out, raw answer lines back.

An ``Upstream`` is one pipelined TCP connection (asyncio.Protocol). Each request
is a *call* (anything with ``line``, ``done(answer)`` and ``unavailable(text)``):
its line is appended to the connection's write buffer, the call to a FIFO, and
the node's answers pop that FIFO in order, because a node answers each
connection strictly in request order. Lines leave without their ``\\n`` and
answers come back without it; nothing is parsed or re-encoded here. Every
buffer is written once per event-loop turn (``Flusher``), so many clients'
requests to one node share a ``write``.

A ``NodeLink`` is everything the gateway holds for one node: a few shared
connections (a client session always uses the same one, so its requests to one
node run in the order it sent them), the opening of dedicated connections
(blocking pulls, subscriptions), and reconnecting with backoff. A node that
cannot be reached answers the waiting calls at once with
``Unavailable: node <name> at <host:port> is not reachable (<reason>)``, and
while it backs off new calls get that answer without waiting.

Must not: parse or re-encode what it forwards, decide where a request goes
(router.py), or import the node's code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, cast

import orjson

from shardq.connection import parse_address
from shardq.errors import Unavailable
from shardq.wire.protocol import error_answer
from shardq_server.running import Causes

from .settings import GatewaySettings

log = logging.getLogger("shardq_gateway.upstream")

CONNECTING = 0
AUTHING = 1
READY = 2
CLOSED = 3

#: Event lines (after SUBSCRIBE) start so; answers start with ``{"ok"``.
EVENT_PREFIX = b'{"event"'
#: Longest wait before a node that refused a connection is tried again.
MAX_BACKOFF = 1.0


class Call(Protocol):
    """What an upstream connection needs of a request it carries."""

    @property
    def line(self) -> bytes: ...

    def done(self, answer: bytes) -> None: ...

    def unavailable(self, text: str) -> None: ...


class Flushable(Protocol):
    dirty: bool

    def flush(self) -> None: ...


class Flusher:
    """Runs ``flush()`` of every marked object once, at the end of this event-loop turn."""

    def __init__(self) -> None:
        self.marked: list[Flushable] = []
        self.scheduled = False

    def mark(self, obj: Flushable) -> None:
        obj.dirty = True
        self.marked.append(obj)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.run)

    def run(self) -> None:
        self.scheduled = False
        marked, self.marked = self.marked, []
        for obj in marked:
            obj.flush()


class Control:
    """A call made by the gateway itself (topology queries): its answer lands in a future."""

    __slots__ = ("future", "line")

    def __init__(self, line: bytes) -> None:
        self.line = line
        self.future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def done(self, answer: bytes) -> None:
        if not self.future.done():
            self.future.set_result(answer)

    def unavailable(self, text: str) -> None:
        self.done(error_answer(text)[:-1])


class _Auth:
    """The AUTH a connection sends first when tokens are configured."""

    __slots__ = ("conn", "line")

    def __init__(self, conn: Upstream, token: str) -> None:
        self.conn = conn
        self.line = orjson.dumps({"cmd": "AUTH", "token": token})

    def done(self, answer: bytes) -> None:
        if answer.startswith(b'{"ok":true'):
            self.conn.authenticated()
            return
        error = orjson.loads(answer).get("error")
        self.conn.failed(f"authentication failed: {error}")

    def unavailable(self, text: str) -> None:
        """The connection failed before AUTH was answered; ``failed`` says why."""


class Upstream(asyncio.Protocol):
    """One pipelined connection to a node (a new object for every connection attempt)."""

    def __init__(self, link: NodeLink) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.state = CONNECTING
        self.waiting: deque[Call] = deque()
        self.out: list[bytes] = []
        #: how many of ``waiting`` (from the front) were written to the node: if the
        #: connection drops, those may have been applied; the others surely were not
        self.written = 0
        self.parts: list[bytes] = []
        self.dirty = False
        self.task: asyncio.Task[None] | None = None
        #: Set on subscription connections: where event lines go.
        self.on_event: Callable[[bytes], None] | None = None
        #: Called once when this connection is over, whatever the reason.
        self.on_close: Callable[[Upstream], None] | None = None

    # -- sending ----------------------------------------------------------------------------

    def send(self, call: Call) -> None:
        """Queue ``call``; its line leaves with this turn's write (or once connected)."""
        if self.state == CLOSED:
            call.unavailable(self.link.unreachable())
            return
        self.waiting.append(call)
        self.out.append(call.line)
        if self.state == READY and not self.dirty:
            self.link.flusher.mark(self)

    def flush(self) -> None:
        self.dirty = False
        out = self.out
        if out and self.state == READY and self.transport is not None:
            self.written += len(out)
            out.append(b"")
            self.transport.write(b"\n".join(out))
            self.out = []

    # -- connecting -------------------------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        link = self.link
        loop = asyncio.get_running_loop()
        timeout = link.settings.connect_timeout
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: self, link.host, link.port), timeout
            )
        except TimeoutError:
            self.failed(f"no connection within {timeout:g}s")
        except OSError as exc:
            self.failed(exc.strerror or str(exc) or type(exc).__name__)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.state == CLOSED:
            transport.close()
            return
        token = self.link.settings.node_token()
        if token is None:
            self.authenticated()
            return
        self.state = AUTHING
        auth = _Auth(self, token)
        self.waiting.appendleft(auth)
        # written like any request: its answer takes one off ``written`` (data_received), so
        # it must count, or every request after it would count one short and the last one
        # on a dropped connection would pass for never sent (and be sent again: issue 17)
        self.written += 1
        self.transport.write(auth.line + b"\n")

    def authenticated(self) -> None:
        self.state = READY
        self.link.connected()
        if self.out and not self.dirty:
            self.link.flusher.mark(self)

    def failed(self, reason: str) -> None:
        """Could not connect or authenticate: answer every waiting call, back off."""
        if self.state == CLOSED:
            return
        self.link.connect_failed(reason)
        self._close_now()

    # -- receiving --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if data.rfind(b"\n") < 0:
            self.parts.append(data)
            return
        if self.parts:
            self.parts.append(data)
            data = b"".join(self.parts)
            self.parts = []
        lines = data.split(b"\n")
        last = lines.pop()
        if last:
            self.parts.append(last)
        waiting = self.waiting
        on_event = self.on_event
        for line in lines:
            if on_event is not None and line.startswith(EVENT_PREFIX):
                call: Any = None
            elif waiting:
                call = waiting.popleft()
                self.written -= 1
            else:
                log.error("node %s sent an answer nobody asked for; closing", self.link.name)
                self.close()
                return
            try:
                if call is None:
                    on_event(line)  # type: ignore[misc] # checked above
                else:
                    call.done(line)
            except Exception as exc:  # a bug in one call's callback: the others go on
                self._callback_failed(call, exc)

    def _callback_failed(self, call: Call | None, exc: Exception) -> None:
        """One answer's callback raised: its request gets ``Internal: …``, the connection
        (shared by many clients) lives on."""
        error = self.link.causes.error("an answer from node " + self.link.name, exc)
        if call is not None:
            try:
                call.unavailable(error.text)
            except Exception:  # the call is broken twice: nothing more to do for it
                log.exception("answering a failed call failed too")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == CLOSED:
            return
        if self.state == READY:
            self.link.lost("connection lost" + (f": {exc}" if exc else ""))
        else:
            self.link.connect_failed("connection closed by the node")
        self._close_now()

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close on purpose (a dedicated connection whose client left, the gateway stops)."""
        if self.state != CLOSED:
            self._close_now()

    def _close_now(self) -> None:
        self.state = CLOSED
        if self.transport is not None:
            self.transport.close()
        elif self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()  # still connecting
        self.out = []
        text = self.link.unreachable()
        waiting, self.waiting = self.waiting, deque()
        written, self.written = self.written, 0
        for i, call in enumerate(waiting):
            if i < written and hasattr(call, "delivered"):
                call.delivered = True  # the node may have run it: never sent again
            call.unavailable(text)
        if self.on_close is not None:
            on_close, self.on_close = self.on_close, None
            on_close(self)


class NodeLink:
    """The gateway's connections to one node, and whether that node is reachable."""

    def __init__(
        self, name: str, address: str, settings: GatewaySettings, flusher: Flusher
    ) -> None:
        self.name = name
        self.address = address
        self.host, self.port = parse_address(address)
        self.settings = settings
        self.flusher = flusher
        self.shared: list[Upstream | None] = [None] * max(1, settings.upstream_connections)
        self.on_error: Callable[[str, str], None] = lambda node, reason: None
        self.reason = "not connected yet"
        self.backoff = 0.0
        self.retry_at = 0.0
        self.dedicated: set[Upstream] = set()
        #: Called when a connection attempt fails (the router then re-reads the topology).
        self.on_down: Callable[[NodeLink], None] | None = None
        self.closed = False
        self.causes = Causes(log, "the gateway")  # the router's, once it adopts this link

    def send(self, call: Call, index: int) -> None:
        """Send on the shared connection number ``index`` (modulo their count)."""
        shared = self.shared
        i = index % len(shared)
        conn = shared[i]
        if conn is None or conn.state == CLOSED:
            conn = self._open()
            if conn is None:
                call.unavailable(self.unreachable())
                return
            shared[i] = conn
        conn.send(call)

    def open_dedicated(
        self, on_close: Callable[[Upstream], None] | None = None
    ) -> Upstream | None:
        """A new connection of its own (None while the node is backed off)."""
        conn = self._open()
        if conn is None:
            return None
        self.dedicated.add(conn)

        def closed(c: Upstream) -> None:
            self.dedicated.discard(c)
            if on_close is not None:
                on_close(c)

        conn.on_close = closed
        return conn

    def _open(self) -> Upstream | None:
        if self.closed or (self.retry_at and time.monotonic() < self.retry_at):
            return None
        conn = Upstream(self)
        conn.start()
        return conn

    # -- reachability -------------------------------------------------------------------------

    def connected(self) -> None:
        self.backoff = 0.0
        self.retry_at = 0.0

    def lost(self, reason: str) -> None:
        """A working connection broke: the next call reconnects at once."""
        self.reason = reason
        self.on_error(self.name, "closed")
        log.warning("connection to node %s at %s lost (%s)", self.name, self.address, reason)

    def connect_failed(self, reason: str) -> None:
        self.reason = reason
        self.on_error(self.name, "timeout" if "timed out" in reason else "unreachable")
        self.backoff = min(max(self.backoff * 2, 0.05), MAX_BACKOFF)
        self.retry_at = time.monotonic() + self.backoff
        log.warning("node %s at %s is not reachable (%s); next try in %.2fs",
                    self.name, self.address, reason, self.backoff)
        if self.on_down is not None:
            self.on_down(self)

    def unreachable(self) -> str:
        return Unavailable(
            f"node {self.name} at {self.address} is not reachable ({self.reason})"
        ).text

    def holds_pulls(self) -> bool:
        """Are connections of clients' own pulls still open (drain.py waits for them)?"""
        return any(conn.state != CLOSED for conn in self.dedicated)

    def close(self) -> None:
        self.closed = True
        self.reason = "the gateway is stopping"
        for conn in [*self.shared, *self.dedicated]:
            if conn is not None:
                conn.close()
        self.shared = [None] * len(self.shared)


async def ask(link: NodeLink, req: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One control request over a shared connection; the decoded answer (errors included)."""
    call = Control(orjson.dumps(req))
    link.send(call, 0)
    answer = await asyncio.wait_for(call.future, timeout)
    decoded: dict[str, Any] = orjson.loads(answer)
    return decoded
