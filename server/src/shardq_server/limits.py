"""The limits a server's connections live within, shared by nodes and gateways (docs/limits.md).

``Limits`` is a settings group, documented field by field and built from CLI
flags that are also ``SHARDQ_…`` environment variables. What both TCP servers
share beyond it: ``Stall`` watches a connection that has stopped for its output
budget and closes it when its client reads nothing; ``PeerWatch`` notices that
a client whose reading is paused has gone (a paused socket is not read, so its
end would go unseen, and what it left behind would be kept).

Must not: read the environment, or touch a socket beyond polling it.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable
from dataclasses import dataclass

from shardq.wire.protocol import MAX_DEPTH

MiB = 1024 * 1024
#: Why a server closed or refused a connection for a limit: the ``reason`` label of
#: ``shardq_connections_dropped_total`` (node) and ``shardq_gateway_connections_dropped_total``.
DROP_REASONS = ("output_limit", "output_stalled", "too_many_connections",
                "http_too_many_connections", "http_body_timeout")


@dataclass
class Limits:
    """Per-connection and per-server bounds; each refusal names the limit it hit."""

    #: Unsent answers of one connection, in bytes (its write buffer, answers held until
    #: they are durable, answers being built; on a gateway also requests in flight), past
    #: which it stops executing lines and reading from the client until the client has
    #: read some. PULLB and DLQ answers stop adding jobs past it too, and a subscriber
    #: with more than this many bytes of events unread is dropped.
    max_output: int = 8 * MiB
    #: Unsent answers past which a connection is closed at once (a client that does not
    #: read what it asked for). Keep it well above ``max_output`` plus one answer.
    max_output_hard: int = 64 * MiB
    #: A connection over ``max_output`` whose client reads nothing for this many seconds
    #: is closed (0 = never).
    output_timeout: float = 60.0
    #: Bytes of request lines waiting behind a blocked PULL/PULLB (or, on a gateway, a
    #: retried request) past which reading from that client pauses.
    max_backlog_bytes: int = 8 * MiB
    #: Request lines waiting likewise.
    max_backlog_lines: int = 10_000
    #: Open TCP connections of the server; one more gets
    #: ``Unavailable: too many connections (max N)`` and is closed.
    max_connections: int = 10_000
    #: Open HTTP connections of the server; one more gets a 503 with that text and is closed.
    http_max_connections: int = 1_000
    #: Seconds an HTTP connection may take to send a request's head (request line and
    #: headers); also how long an idle keep-alive connection stays open.
    http_header_timeout: float = 15.0
    #: Seconds a request's body may take to arrive once its head came (408 after).
    http_body_timeout: float = 60.0
    #: Levels of arrays and objects a value the server keeps (``data``, ``result``) may
    #: nest; deeper is ``Invalid: nesting deeper than N``. At most 200: answers wrap
    #: values in a few more levels and the JSON encoder stops at 254.
    max_depth: int = MAX_DEPTH

    def __post_init__(self) -> None:
        if not 1 <= self.max_depth <= 200:
            raise ValueError(f"max_depth must be between 1 and 200, got {self.max_depth}")
        if self.max_output_hard < self.max_output:
            raise ValueError("max_output_hard must not be below max_output")


def too_many_connections(limit: int) -> str:
    return f"Unavailable: too many connections (max {limit})"


class Stall:
    """Closes a connection stopped for its output budget when its client reads nothing.

    ``start`` when the connection stops, ``stop`` when it runs again. Every
    ``timeout`` seconds the unsent bytes are looked at: fewer than last time is
    progress (a slow reader); the same or more means the client reads nothing, and
    ``cut`` is called.
    """

    __slots__ = ("cut", "handle", "last", "timeout", "unsent")

    def __init__(self, timeout: float, unsent: Callable[[], int],
                 cut: Callable[[], None]) -> None:
        self.timeout = timeout
        self.unsent = unsent
        self.cut = cut
        self.handle: asyncio.TimerHandle | None = None
        self.last = 0

    def start(self) -> None:
        if self.handle is None and self.timeout > 0:
            self.last = self.unsent()
            self.handle = asyncio.get_running_loop().call_later(self.timeout, self._look)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _look(self) -> None:
        self.handle = None
        now = self.unsent()
        if now >= self.last:
            self.cut()
            return
        self.start()


#: How often a connection whose reading is paused is checked for its client having left.
PEER_CHECK_SECONDS = 1.0
_GONE = getattr(select, "POLLRDHUP", 0x2000) | select.POLLHUP | select.POLLERR


def peer_gone(transport: asyncio.BaseTransport) -> bool:
    """Has the client closed (or reset) this connection? Answered without reading from it:
    the data it sent before closing may still wait unread."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), _GONE)
    return bool(poller.poll(0))


class PeerWatch:
    """While a connection's reading is paused, look every ``PEER_CHECK_SECONDS`` whether its
    client left; ``gone`` is called once if it did."""

    __slots__ = ("gone", "handle", "transport")

    def __init__(self, gone: Callable[[], None]) -> None:
        self.gone = gone
        self.transport: asyncio.BaseTransport | None = None
        self.handle: asyncio.TimerHandle | None = None

    def start(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.handle is None:
            self.handle = asyncio.get_running_loop().call_later(PEER_CHECK_SECONDS, self._look)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _look(self) -> None:
        self.handle = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if peer_gone(transport):
            self.gone()
            return
        self.start(transport)
