"""The TCP server of a node: MagicQueue's line protocol on port 6789.

One ``Session`` per connection. It splits the byte stream into lines, runs
them in order through the runtime, and writes the answers in request order.
A blocked PULL holds back the lines behind it (they wait in ``backlog``) and
answers held for durability wait in ``held``; both keep per-connection order.
Slow readers are pushed back on (reading pauses while the write buffer is
full) and a subscriber that falls too far behind is dropped with a final line.

Must not: run engine code directly (go through ``Node.execute``), or buffer
without bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, cast

import orjson

from shardq.errors import InvalidRequest
from shardq.wire.framing import LineSplitter
from shardq.wire.protocol import error_answer

from .replication import STANDALONE

if TYPE_CHECKING:
    from .replication import FollowerStream
    from .runtime import Node, Waiter

log = logging.getLogger("shardq_node.tcp")

#: A subscriber whose unsent events pass this many bytes is dropped.
MAX_EVENT_BACKLOG = 8 * 1024 * 1024
#: Lines queued behind a blocked PULL before reading from that client pauses.
MAX_BACKLOG_LINES = 10_000


class _TooLong(bytes):
    """Stands in a line list for a line that was too long; holds its error answer."""

    @property
    def answer(self) -> bytes:
        return bytes(self)


class Session(asyncio.Protocol):
    """One client connection."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.transport: asyncio.Transport | None = None
        self.splitter = LineSplitter(node.settings.max_line)
        self.backlog: deque[bytes] = deque()
        self.waiter: Waiter | None = None
        self.pending_rid: str | int | None = None
        self.held: deque[tuple[int, list[bytes]]] = deque()
        self.owner = node.new_owner()
        self.authed = not node.settings.tokens
        self.cluster = False  # authenticated with the cluster token
        self.subscriptions: dict[str, frozenset[str]] = {}
        self.closing = False
        self.write_paused = False
        self.read_paused = False
        self.max_line = node.settings.max_line
        self.refusing = False  # a too-long line came: answer what came before it, then close
        self.close_when_sent = False
        #: after FOLLOW: this connection carries the primary's log (replication.py)
        self.stream: FollowerStream | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        transport.set_write_buffer_limits(high=4 * 1024 * 1024)
        self.node.sessions.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.stream is not None:
            self.stream.closed = True
            repl = self.node.replication
            if repl.upstream is self.stream:
                repl.upstream = None
        self.node.closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing or self.refusing:
            return
        if self.stream is not None:
            self.stream.feed(data)
            return
        lines, too_long = self.splitter.feed(data)
        if lines or too_long:
            self._take(lines, too_long)

    def _take(self, lines: list[bytes], too_long: int) -> None:
        """Run (or queue behind a blocked PULL) complete lines; then refuse a too-long one."""
        if too_long:
            assert self.transport is not None
            self.refusing = True
            self.splitter.drop()
            self.transport.pause_reading()
            text = InvalidRequest(f"line longer than {self.max_line} bytes ({too_long}+ received)")
            lines.append(_TooLong(error_answer(text.text)))
        if self.waiter is not None or self.backlog:
            self.backlog.extend(lines)
            self._update_reading()
            return
        self._run(lines)

    # -- running lines --------------------------------------------------------------------------

    def _run(self, lines: list[bytes] | deque[bytes]) -> None:
        node = self.node
        execute = node.execute
        before = node.log.seq
        out = []
        for n, line in enumerate(lines, 1):
            if type(line) is _TooLong:
                out.append(line.answer)
                self.close_when_sent = True
                break
            answer = execute(line, self)
            if answer is None:
                rest = list(lines)[n:] if isinstance(lines, deque) else lines[n:]
                if rest:
                    self.backlog.extendleft(reversed(rest))
                break
            out.append(answer)
        tag = node.flush()
        if tag == before and node.replication.role is not STANDALONE:
            tag = 0  # nothing written: on a replicated node a read never waits for a majority
        if out:
            self.send(out, tag)
        node.after_batch()
        if self.close_when_sent and not self.held:
            self.close()
        self._update_reading()

    def start_stream(self, term: int, primary: str) -> FollowerStream:
        """FOLLOW: from the next byte on, this connection carries ``primary``'s log."""
        from .replication import FollowerStream

        def write(data: bytes) -> None:
            if self.transport is not None and not self.closing:
                self.transport.write(data)

        self.stream = FollowerStream(self.node, term, primary, write, self.close)
        return self.stream

    def resume(self) -> None:
        """The blocked PULL was answered: run what queued up behind it."""
        if self.waiter is None and self.backlog and not self.closing:
            lines = self.backlog
            self.backlog = deque()
            self._run(lines)

    # -- writing --------------------------------------------------------------------------------

    def send(self, lines: list[bytes], tag: int) -> None:
        if self.closing or self.transport is None:
            return
        if not self.held and tag <= self.node.gate.durable:
            self.transport.write(lines[0] if len(lines) == 1 else b"".join(lines))
        else:
            self.held.append((tag, lines))

    def release(self, durable: int) -> None:
        held = self.held
        out: list[bytes] = []
        while held and held[0][0] <= durable:
            out.extend(held.popleft()[1])
        if out and self.transport is not None and not self.closing:
            self.transport.write(b"".join(out))
        if self.close_when_sent and not held:
            self.close()

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
        if out and self.transport is not None and not self.closing:
            self.transport.write(b"".join(out))

    def push_event(self, line: bytes) -> bool:
        """Queue an event line; drop this subscriber if it is too far behind."""
        if self.closing or self.transport is None:
            return False
        backlog = self.transport.get_write_buffer_size() + sum(
            len(line) for _, lines in self.held for line in lines
        )
        if backlog > MAX_EVENT_BACKLOG:
            final = {
                "event": "dropped",
                "error": f"subscriber too slow: more than {MAX_EVENT_BACKLOG} bytes of events "
                "unread; connection closed",
            }
            self.transport.write(orjson.dumps(final) + b"\n")
            self.close()
            return False
        return True

    def _update_reading(self) -> None:
        if self.transport is None or self.closing or self.refusing:
            return
        want_pause = self.write_paused or len(self.backlog) > MAX_BACKLOG_LINES
        if want_pause and not self.read_paused:
            self.transport.pause_reading()
            self.read_paused = True
        elif not want_pause and self.read_paused:
            self.transport.resume_reading()
            self.read_paused = False

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.transport is not None:
            self.transport.close()


async def start_tcp(node: Node, host: str, port: int) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: Session(node), host, port, reuse_address=True)
