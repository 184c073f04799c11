"""The TCP server of a node: MagicQueue's line protocol on port 6789.

One ``Session`` per connection. It splits the byte stream into lines, runs
them in order through the runtime, and writes the answers in request order.
A blocked PULL holds back the lines behind it (they wait in ``backlog``) and
answers held for durability wait in ``held``; both keep per-connection order.

Every connection lives within byte budgets (``Limits``, docs/limits.md), kept by
the ``LineSession`` it shares with the gateway (shardq_server.line_session): lines
run one by one until the unsent answers (write buffer + held + being built)
pass ``max_output``; then the rest waits and reading pauses until the client
has read some. A client over that budget that reads nothing for
``output_timeout``, or whose unsent answers pass ``max_output_hard``, is
disconnected (logged, ``shardq_connections_dropped_total``). Lines waiting
behind a blocked PULL pause reading past ``max_backlog_bytes``; a subscriber
that falls too far behind is dropped with a final line; past
``max_connections`` a new connection gets one error line and is closed.

Must not: run engine code directly (go through ``Node.execute``), or buffer
without bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

import orjson

from shardq.wire.protocol import error_answer
from shardq_server.line_session import LineSession, TooLong, too_slow

from .replication import STANDALONE

if TYPE_CHECKING:
    from .replication import FollowerStream
    from .runtime import Node, Waiter


class Session(LineSession):
    """One client connection."""

    LOG = logging.getLogger("shardq_node.tcp")

    def __init__(self, node: Node) -> None:
        super().__init__(node.settings.limits, node.settings.max_line, node.sessions,
                         node.dropped)
        self.node = node
        self.waiter: Waiter | None = None
        self.pending_rid: str | int | None = None
        self.held: deque[tuple[int, list[bytes]]] = deque()
        self.owner = node.new_owner()
        self.authed = not node.settings.tokens
        self.cluster = False  # authenticated with the cluster token
        self.subscriptions: dict[str, frozenset[str]] = {}
        #: after FOLLOW: this connection carries the primary's log (replication.py)
        self.stream: FollowerStream | None = None

    # -- LineSession ------------------------------------------------------------------------------

    def _lost(self) -> None:
        if self.stream is not None:
            self.stream.closed = True
            repl = self.node.replication
            if repl.upstream is self.stream:
                repl.upstream = None
        self.node.closed(self)
        self.held.clear()
        self.held_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self.stream is not None and not (self.closing or self.refusing):
            self.stream.feed(data)
            return
        LineSession.data_received(self, data)

    def _waiting(self) -> bool:
        return self.waiter is not None or self.output_full

    def _go_on(self) -> None:
        self.resume()

    # -- running lines --------------------------------------------------------------------------

    def _run(self, lines: list[bytes]) -> None:
        """Run lines in order until one blocks or the answers pass the output budget; the
        rest waits in ``backlog``."""
        node = self.node
        execute = node.execute
        before = node.log.seq
        transport = self.transport
        assert transport is not None
        room = self.max_output - self.held_bytes - transport.get_write_buffer_size()
        size = 0
        out: list[bytes] = []
        for n, line in enumerate(lines, 1):
            if type(line) is TooLong:
                out.append(line)
                self.close_when_sent = True
                break
            answer = execute(line, self)
            if answer is None:
                self._requeue(lines[n:])
                break
            out.append(answer)
            size += len(answer)
            if size > room:
                self._requeue(lines[n:])
                self._stop()
                break
        tag = node.flush()
        if tag == before and node.replication.role is not STANDALONE:
            tag = 0  # nothing written: on a replicated node a read never waits for a majority
        if out:
            self.send(out, tag, size)
        node.after_batch()
        if self.close_when_sent and not self.held:
            self.close()
        self._update_reading()
        if self.output_full:
            asyncio.get_running_loop().call_soon(self._drained)

    def start_stream(self, term: int, primary: str) -> FollowerStream:
        """FOLLOW: from the next byte on, this connection carries ``primary``'s log."""
        from .replication import FollowerStream

        def write(data: bytes) -> None:
            if self.transport is not None and not self.closing:
                self.transport.write(data)

        self.stream = FollowerStream(self.node, term, primary, write, self.close)
        return self.stream

    def resume(self) -> None:
        """The blocked PULL was answered, or the client read: run what queued up behind it."""
        if self.waiter is None and self.backlog and not self.closing and not self.output_full:
            self._run(self._take_backlog())

    # -- writing --------------------------------------------------------------------------------

    def send(self, lines: list[bytes], tag: int, size: int = -1) -> None:
        if self.closing or self.transport is None:
            return
        transport = self.transport
        if not self.held and tag <= self.node.gate.durable:
            transport.write(lines[0] if len(lines) == 1 else b"".join(lines))
        else:
            self.held.append((tag, lines))
            self.held_bytes += size if size >= 0 else sum(map(len, lines))
        if transport.get_write_buffer_size() + self.held_bytes > self.max_output_hard:
            self._over_hard_limit()

    def release(self, durable: int) -> None:
        held = self.held
        out: list[bytes] = []
        while held and held[0][0] <= durable:
            out.extend(held.popleft()[1])
        if out and self.transport is not None and not self.closing:
            data = b"".join(out)
            self.held_bytes -= len(data)
            self.transport.write(data)
            if self._over_hard_limit():
                return
        if self.close_when_sent and not held:
            self.close()
        elif self.output_full:
            self._drained()

    def fail_held(self, durable: int, text: str) -> None:
        """Storage failed: answers not yet durable become errors (events are dropped)."""
        self.release(durable)
        out: list[bytes] = []
        for _, lines in self.held:
            for line in lines:
                answer = orjson.loads(line)
                if "event" in answer and "ok" not in answer:
                    continue
                out.append(error_answer(text, answer.get("reqId")))
        self.held.clear()
        self.held_bytes = 0
        if out and self.transport is not None and not self.closing:
            self.transport.write(b"".join(out))

    def push_event(self, line: bytes) -> bool:
        """Queue an event line; drop this subscriber if it is too far behind."""
        if self.closing or self.transport is None:
            return False
        limit = self.limits.max_output
        if self.unsent() > limit:
            self.transport.write(too_slow(limit) + b"\n")
            self.close()
            return False
        return True


async def start_tcp(node: Node, host: str, port: int) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: Session(node), host, port, reuse_address=True)
