"""Requests that do not come from a TCP connection: the HTTP routes and SSE streams.

``call(node, req)`` runs one protocol request through the same path as a TCP
line (validation, cluster checks, engine, WAL) and returns its answer once it
is durable, waiting for a blocked PULL like a connection would. Jobs pulled
this way are leased to no connection (owner ``jobs.HTTP``): their lease ends at its
deadline, or with ACK/FAIL. ``EventStream`` is a subscriber that queues event
lines for a Server-Sent Events response, bounded like a TCP subscriber.

Must not: bypass ``Node.execute_request``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson

from .jobs import HTTP

if TYPE_CHECKING:
    from .pulls import Waiter
    from .runtime import Node

#: Event lines an SSE subscriber may have unread before it is dropped.
MAX_STREAM_EVENTS = 10_000


class Inline:
    """The caller of one request made in-process (duck-types a TCP Session)."""

    owner = HTTP
    authed = True
    cluster = False

    def __init__(self, node: Node) -> None:
        self.node = node
        self.subscriptions: dict[str, frozenset[str]] = {}
        self.pending_rid: str | int | None = None
        self.waiter: Waiter | None = None
        self.held: deque[tuple[int, list[bytes]]] = deque()
        self.closing = False
        self.transport = None
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def send(self, lines: list[bytes], tag: int) -> None:
        if tag <= self.node.gate.durable:
            self._deliver(lines)
        else:
            self.held.append((tag, lines))
            self.node.inline_held.add(self)

    def release(self, durable: int) -> None:
        while self.held and self.held[0][0] <= durable:
            self._deliver(self.held.popleft()[1])
        if not self.held:
            self.node.inline_held.discard(self)

    def fail_held(self, durable: int, text: str) -> None:
        self.release(durable)
        if self.held:
            self.held.clear()
            self._deliver([orjson.dumps({"ok": False, "error": text})])

    def _deliver(self, lines: list[bytes]) -> None:
        if not self.answer.done():
            self.answer.set_result(lines[0])

    def resume(self) -> None:
        """Nothing queued behind a blocked PULL here."""

    def push_event(self, line: bytes) -> bool:
        return False


async def call(node: Node, req: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """One request; the answer object once it is durable (``{"ok": false, ...}`` on refusal)."""
    caller = Inline(node)
    before = node.log.seq
    line = node.execute_request(req, caller)
    tag = node.flush()
    if tag == before and node.replication.replicated:
        tag = 0  # nothing written: on a replicated node a read never waits for a majority
    if line is not None:
        caller.send([line], tag)
    node.after_batch()
    try:
        raw = await asyncio.wait_for(asyncio.shield(caller.answer), timeout)
    except (TimeoutError, asyncio.CancelledError):
        node.pulls.drop(caller)
        raise
    answer: dict[str, Any] = orjson.loads(raw)
    return answer


class EventStream:
    """An SSE subscriber: event lines queue up here until the response sends them."""

    owner = HTTP
    authed = True
    cluster = False
    pending_rid = None
    waiter = None
    closing = False
    transport = None

    def __init__(self, node: Node) -> None:
        self.node = node
        self.subscriptions: dict[str, frozenset[str]] = {}
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.held: deque[tuple[int, list[bytes]]] = deque()
        self.dropped = False

    def push_event(self, line: bytes) -> bool:
        if self.queue.qsize() + len(self.held) > MAX_STREAM_EVENTS:
            if not self.dropped:
                self.dropped = True
                self.queue.put_nowait(None)
            return False
        return True

    def send(self, lines: list[bytes], tag: int) -> None:
        if tag <= self.node.gate.durable:
            for line in lines:
                self.queue.put_nowait(line)
        else:
            self.held.append((tag, lines))
            self.node.inline_held.add(self)

    def release(self, durable: int) -> None:
        while self.held and self.held[0][0] <= durable:
            for line in self.held.popleft()[1]:
                self.queue.put_nowait(line)
        if not self.held:
            self.node.inline_held.discard(self)

    def fail_held(self, durable: int, text: str) -> None:
        self.release(durable)
        self.held.clear()

    def resume(self) -> None:
        pass

    def close(self) -> None:
        for queue in list(self.subscriptions):
            self.node.events.unsubscribe(self, queue)
        self.node.inline_held.discard(self)
