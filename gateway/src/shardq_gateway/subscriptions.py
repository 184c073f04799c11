"""One client's SUBSCRIBEs: a connection of its own to every node, events relayed as they come.

Events of a queue come from whichever node owns it, also after a move, so a
subscribing client gets one dedicated connection per node and every node gets
its SUBSCRIBE lines. The answer ``{"ok":true}`` is sent once every reachable
node has answered, so events that happen after it are delivered. A node that
joins the topology, or whose connection broke and comes back, gets every
SUBSCRIBE line of the client again. Event lines are relayed to the client byte
for byte, between its answers.

Must not: share these connections with other clients or with requests, or
keep anything once the client has left.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import orjson

from .inflight import Pending, answer_line, local
from .upstream import CLOSED, Upstream

if TYPE_CHECKING:
    from .clients import Client
    from .upstream import NodeLink


class _Group(Pending):
    """The answer to one SUBSCRIBE/UNSUBSCRIBE: ok once every node it went to answered."""

    __slots__ = ("client", "left", "rid")

    def __init__(self, client: Client, rid: str | int | None) -> None:
        self.answer = None
        self.client = client
        self.rid = rid
        self.left = 1

    def one_done(self) -> None:
        self.left -= 1
        if not self.left:
            self.answer = answer_line({"ok": True}, self.rid)
            self.client.ready(self)


class _Sub:
    """One node's share of a _Group (or a replay nobody waits for, when ``group`` is None)."""

    __slots__ = ("group", "line")

    def __init__(self, group: _Group | None, line: bytes) -> None:
        self.group = group
        self.line = line

    def done(self, answer: bytes) -> None:
        if self.group is not None:
            self.group.one_done()

    def unavailable(self, text: str) -> None:
        """The node went away: it gets the line again when it is back."""
        self.done(b"")


class Subscriptions:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.router = client.router
        #: queue -> the client's SUBSCRIBE line, sent again to nodes that (re)connect.
        self.lines: dict[str, bytes] = {}
        self.conns: dict[NodeLink, Upstream] = {}
        self.closed = False
        self._reopening: set[NodeLink] = set()
        self.router.listeners.add(self.follow)

    def subscribe(self, queue: str, line: bytes, rid: str | int | None) -> None:
        self._to_all(line, rid)
        self.lines[queue] = line

    def unsubscribe(self, queue: str, rid: str | int | None) -> None:
        if self.lines.pop(queue, None) is None:
            local(self.client, answer_line({"ok": True}, rid))
            return
        self._to_all(orjson.dumps({"cmd": "UNSUBSCRIBE", "queue": queue}), rid)

    def _to_all(self, line: bytes, rid: str | int | None) -> None:
        group = _Group(self.client, rid)
        self.client.add(group)
        for link in self.router.members:
            conn = self._conn(link)
            if conn is not None:
                group.left += 1
                conn.send(_Sub(group, line))
        group.one_done()

    def _conn(self, link: NodeLink) -> Upstream | None:
        """This client's event connection to ``link``; a new one replays every SUBSCRIBE."""
        conn = self.conns.get(link)
        if conn is not None and conn.state != CLOSED:
            return conn
        conn = link.open_dedicated(lambda c: self._lost(link, c))
        if conn is None:
            self._reopen_later(link)
            return None
        conn.on_event = self.client.event
        self.conns[link] = conn
        for line in self.lines.values():
            conn.send(_Sub(None, line))
        return conn

    def follow(self) -> None:
        """The topology changed: connect to new nodes, let go of removed ones."""
        members = set(self.router.members)
        for link in list(self.conns):
            if link not in members:
                self.conns.pop(link).close()
        if self.lines:
            for link in members:
                self._conn(link)

    def _lost(self, link: NodeLink, conn: Upstream) -> None:
        if self.conns.get(link) is conn:
            del self.conns[link]
            self._reopen_later(link)

    def _reopen_later(self, link: NodeLink) -> None:
        if self.closed or not self.lines or link in self._reopening:
            return
        self._reopening.add(link)
        delay = max(link.backoff, 0.05)
        asyncio.get_running_loop().call_later(delay, self._reopen, link)

    def _reopen(self, link: NodeLink) -> None:
        self._reopening.discard(link)
        if not self.closed and self.lines and link in self.router.members:
            self._conn(link)

    def close(self) -> None:
        self.closed = True
        self.router.listeners.discard(self.follow)
        conns, self.conns = self.conns, {}
        for conn in conns.values():
            conn.close()
