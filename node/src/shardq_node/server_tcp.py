"""The TCP server of a node: MagicQueue's line protocol on port 6789.

One ``Session`` per connection. It splits the byte stream into lines, runs
them in order through the runtime, and writes the answers in request order.
A blocked PULL holds back the lines behind it (they wait in ``backlog``) and
answers held for durability wait in ``held``; both keep per-connection order.

Every connection lives within byte budgets (``Limits``, docs/limits.md): lines
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
from typing import TYPE_CHECKING, cast

import orjson
from mypy_extensions import mypyc_attr

from shardq.errors import InvalidRequest
from shardq.wire.framing import LineSplitter
from shardq.wire.protocol import error_answer
from shardq_server.limits import PeerWatch, Stall, too_many_connections

from .replication import STANDALONE

if TYPE_CHECKING:
    from .replication import FollowerStream
    from .runtime import Node, Waiter

log = logging.getLogger("shardq_node.tcp")

#: The transport's write buffer pauses the session past this (or half ``max_output``).
WRITE_HIGH_WATER = 4 * 1024 * 1024


@mypyc_attr(native_class=False)  # mypyc compiles no subclass of bytes
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
        self.limits = limits = node.settings.limits
        self.max_output = limits.max_output
        self.max_output_hard = limits.max_output_hard
        self.backlog: deque[bytes] = deque()
        self.backlog_bytes = 0
        self.waiter: Waiter | None = None
        self.pending_rid: str | int | None = None
        self.held: deque[tuple[int, list[bytes]]] = deque()
        self.held_bytes = 0
        self.output_full = False  # unsent answers passed max_output: lines wait in backlog
        self.stall = Stall(limits.output_timeout, self.unsent, self._stalled)
        self.peer = PeerWatch(self._peer_gone)
        self.refused = False  # over max_connections: never served
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
        limit = self.limits.max_connections
        if len(self.node.sessions) >= limit:
            self.refused = self.closing = True
            self.transport.write(error_answer(too_many_connections(limit)))
            self.transport.close()
            self.node.dropped("too_many_connections")
            return
        self.transport.set_write_buffer_limits(
            high=min(WRITE_HIGH_WATER, self.limits.max_output // 2))
        self.node.sessions.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.refused:
            return
        self.stall.stop()
        self.peer.stop()
        self.backlog.clear()  # what the client sent and will never read: free it now
        self.backlog_bytes = 0
        self.splitter.drop()
        if self.stream is not None:
            self.stream.closed = True
            repl = self.node.replication
            if repl.upstream is self.stream:
                repl.upstream = None
        self.node.closed(self)
        self.held.clear()
        self.held_bytes = 0

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._update_reading()
        self._drained()

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
        if self.waiter is not None or self.backlog or self.output_full:
            self.backlog.extend(lines)
            self.backlog_bytes += sum(map(len, lines))
            self._update_reading()
            return
        self._run(lines)

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
        out = []
        for n, line in enumerate(lines, 1):
            if type(line) is _TooLong:
                out.append(line.answer)
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

    def _requeue(self, rest: list[bytes]) -> None:
        if rest:
            self.backlog.extendleft(reversed(rest))
            self.backlog_bytes += sum(map(len, rest))

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
            lines = list(self.backlog)
            self.backlog.clear()
            self.backlog_bytes = 0
            self._run(lines)

    # -- the output budget ----------------------------------------------------------------------

    def unsent(self) -> int:
        """Bytes of answers the client has not read yet (bar the kernel's socket buffers)."""
        assert self.transport is not None
        return self.transport.get_write_buffer_size() + self.held_bytes

    def room(self) -> int:
        return self.max_output - self.unsent() if self.transport is not None else 0

    def _stop(self) -> None:
        """The answers passed ``max_output``: run no more lines until the client reads."""
        self.output_full = True
        self.stall.start()

    def _drained(self) -> None:
        """The client read some (or answers were let out): go on if the budget has room."""
        if not self.output_full or self.closing or self.room() <= 0:
            return
        self.output_full = False
        self.stall.stop()
        self._update_reading()
        self.resume()

    def _over_hard_limit(self) -> bool:
        unsent = self.unsent()
        if unsent <= self.max_output_hard:
            return False
        self._cut("output_limit", f"{unsent} bytes of answers unread "
                  f"(max_output_hard {self.limits.max_output_hard})")
        return True

    def _stalled(self) -> None:
        self._cut("output_stalled", f"{self.unsent()} bytes of answers unread and nothing read "
                  f"for {self.limits.output_timeout:g}s (output_timeout)")

    def _cut(self, reason: str, why: str) -> None:
        """Disconnect a client that does not read; its unsent answers are dropped at once."""
        if self.closing or self.transport is None:
            return
        log.warning("disconnecting client %s: %s",
                    self.transport.get_extra_info("peername"), why)
        self.node.dropped(reason)
        self.closing = True
        self.transport.abort()

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
            final = {
                "event": "dropped",
                "error": f"subscriber too slow: more than {limit} bytes of events "
                "unread; connection closed",
            }
            self.transport.write(orjson.dumps(final) + b"\n")
            self.close()
            return False
        return True

    def _update_reading(self) -> None:
        if self.transport is None or self.closing or self.refusing:
            return
        limits = self.limits
        want_pause = (self.write_paused or self.output_full
                      or len(self.backlog) > limits.max_backlog_lines
                      or self.backlog_bytes > limits.max_backlog_bytes)
        if want_pause and not self.read_paused:
            self.transport.pause_reading()
            self.read_paused = True
            self.peer.start(self.transport)
        elif not want_pause and self.read_paused:
            self.transport.resume_reading()
            self.read_paused = False
            self.peer.stop()

    def _peer_gone(self) -> None:
        """The client left while reading was paused: drop what it left behind now."""
        if self.transport is not None and not self.closing:
            self.closing = True
            self.transport.abort()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.transport is not None:
            self.transport.close()


async def start_tcp(node: Node, host: str, port: int) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: Session(node), host, port, reuse_address=True)
