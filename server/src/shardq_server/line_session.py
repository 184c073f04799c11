"""One client connection of a line-protocol server: what a node's and a gateway's TCP
sessions share (docs/limits.md, PROTOCOL.md).

A ``LineSession`` splits the byte stream into lines and hands them, in order, to its
server's ``_run``; lines that must wait (behind a blocked PULL, a retried request, a
full output budget) queue in ``backlog``. It keeps the connection within its byte
budgets (``Limits``):

- past ``max_connections`` a new connection gets one error line and is closed;
- a line longer than ``max_line`` is refused: the lines before it are answered,
  then its ``Invalid: line longer than …`` answer, then the connection is closed;
- reading pauses while the write buffer is full, the unsent answers passed
  ``max_output`` (``output_full``), or the backlog passed ``max_backlog_lines`` /
  ``max_backlog_bytes``; a client that left meanwhile is noticed (``PeerWatch``);
- a client over ``max_output`` that reads nothing for ``output_timeout``, or whose
  unsent answers pass ``max_output_hard``, is disconnected (logged, counted by
  ``on_drop``).

Every line gets exactly one answer, in request order: that is the subclass's to keep
(its ``_run``, its answers), this class only never drops a line it read.

Must not: interpret a line, or buffer without bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import orjson
from mypy_extensions import mypyc_attr

from shardq.errors import InvalidRequest
from shardq.wire.framing import LineSplitter
from shardq.wire.protocol import error_answer

from .limits import Limits, PeerWatch, Stall, too_many_connections

#: The transport's write buffer pauses the session past this (or half ``max_output``).
WRITE_HIGH_WATER = 4 * 1024 * 1024


@mypyc_attr(native_class=False)  # mypyc compiles no subclass of bytes
class TooLong(bytes):
    """Stands in a line list for a line that was too long: its error answer."""


def too_slow(limit: int) -> bytes:
    """The last event line of a subscriber dropped for being too far behind (no newline)."""
    return orjson.dumps({
        "event": "dropped",
        "error": f"subscriber too slow: more than {limit} bytes of events "
        "unread; connection closed",
    })


class LineSession(asyncio.Protocol):
    """One client connection: lines in, answers out, within the connection's limits.

    A subclass provides ``_run`` (run lines in order, requeueing what must wait),
    ``_waiting`` (must new lines queue?), ``_go_on`` (the budget has room again: run
    the backlog), ``_lost`` (the connection ended) and ``error_line``."""

    #: The unsent bytes, as the disconnect log names them.
    UNREAD = "bytes of answers unread"
    #: Where a disconnect is logged (the server's own logger).
    LOG = logging.getLogger("shardq_server.tcp")

    def __init__(self, limits: Limits, max_line: int, sessions: set[Any],
                 on_drop: Callable[[str], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.limits = limits
        self.max_line = max_line
        self.max_output = limits.max_output
        self.max_output_hard = limits.max_output_hard
        self.sessions = sessions
        self.on_drop = on_drop
        self.splitter = LineSplitter(max_line)
        self.backlog: deque[bytes] = deque()
        self.backlog_bytes = 0
        #: bytes of answers not yet written (on a gateway also of requests in flight)
        self.held_bytes = 0
        self.output_full = False  # unsent answers passed max_output: lines wait in backlog
        self.stall = Stall(limits.output_timeout, self.unsent, self._stalled)
        self.peer = PeerWatch(self._peer_gone)
        self.refused = False  # over max_connections: never served
        self.closing = False
        self.write_paused = False
        self.read_paused = False
        self.refusing = False  # a too-long line came: answer what came before it, then close
        self.close_when_sent = False

    # -- what a server adds -----------------------------------------------------------------------

    def _run(self, lines: list[bytes]) -> None:
        raise NotImplementedError

    def _waiting(self) -> bool:
        """Must new lines wait in the backlog (behind a line that waits)?"""
        raise NotImplementedError

    def _go_on(self) -> None:
        """The output budget has room again: run what waits."""
        raise NotImplementedError

    def _lost(self) -> None:
        """The connection ended: let go of what the server keeps for it."""
        raise NotImplementedError

    def _busy(self) -> bool:
        """More reasons to pause reading than the budgets here (a gateway's requests in
        flight)."""
        return False

    def error_line(self, text: str) -> bytes:
        """An error answer without a request id, framed as this server writes answers."""
        return error_answer(text)

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        limit = self.limits.max_connections
        if len(self.sessions) >= limit:
            self.refused = self.closing = True
            self.transport.write(error_answer(too_many_connections(limit)))
            self.transport.close()
            self.on_drop("too_many_connections")
            return
        self.transport.set_write_buffer_limits(
            high=min(WRITE_HIGH_WATER, self.limits.max_output // 2))
        self.sessions.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.refused:
            return
        self.stall.stop()
        self.peer.stop()
        self.backlog.clear()  # what the client sent and will never read: free it now
        self.backlog_bytes = 0
        self.splitter.drop()
        self._lost()

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
        lines, too_long = self.splitter.feed(data)
        if lines or too_long:
            self._take(lines, too_long)

    # -- lines ------------------------------------------------------------------------------------

    def _take(self, lines: list[bytes], too_long: int) -> None:
        """Run (or queue behind what waits) complete lines; then refuse a too-long one."""
        if too_long:
            assert self.transport is not None
            self.refusing = True
            self.splitter.drop()
            self.transport.pause_reading()
            text = InvalidRequest(f"line longer than {self.max_line} bytes ({too_long}+ received)")
            lines.append(TooLong(self.error_line(text.text)))
        if self.backlog or self._waiting():
            self.backlog.extend(lines)
            self.backlog_bytes += sum(map(len, lines))
            self._update_reading()
            return
        self._run(lines)

    def _requeue(self, rest: list[bytes]) -> None:
        """Lines not run yet go back to the front of the backlog, in order."""
        if rest:
            self.backlog.extendleft(reversed(rest))
            self.backlog_bytes += sum(map(len, rest))

    def _take_backlog(self) -> list[bytes]:
        lines = list(self.backlog)
        self.backlog.clear()
        self.backlog_bytes = 0
        return lines

    # -- the output budget ------------------------------------------------------------------------

    def unsent(self) -> int:
        """Bytes the client has not read yet (bar the kernel's socket buffers)."""
        buffered = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return buffered + self.held_bytes

    def room(self) -> int:
        return self.max_output - self.unsent() if self.transport is not None else 0

    def _stop(self) -> None:
        """The answers passed ``max_output``: run no more lines until the client reads."""
        self.output_full = True
        self.stall.start()
        self._update_reading()

    def _drained(self) -> None:
        """The client read some (or answers were let out): go on if the budget has room."""
        if not self.output_full or self.closing or self.room() <= 0:
            return
        self.output_full = False
        self.stall.stop()
        self._update_reading()
        self._go_on()

    def _over_hard_limit(self) -> bool:
        """Past ``max_output_hard``: the client is disconnected (True)."""
        unsent = self.unsent()
        if unsent <= self.max_output_hard:
            return False
        self._cut("output_limit", f"{unsent} bytes of answers unread "
                  f"(max_output_hard {self.max_output_hard})")
        return True

    def _stalled(self) -> None:
        self._cut("output_stalled", f"{self.unsent()} {self.UNREAD} and nothing read "
                  f"for {self.limits.output_timeout:g}s (output_timeout)")

    def _cut(self, reason: str, why: str) -> None:
        """Disconnect a client that does not read; what it holds is dropped at once."""
        if self.closing or self.transport is None:
            return
        self.LOG.warning("disconnecting client %s: %s",
                    self.transport.get_extra_info("peername"), why)
        self.on_drop(reason)
        self.closing = True  # nothing more is written or counted (connection_lost cleans up)
        self.transport.abort()

    # -- reading ----------------------------------------------------------------------------------

    def _update_reading(self) -> None:
        if self.transport is None or self.closing or self.refusing:
            return
        limits = self.limits
        want_pause = (self.write_paused or self.output_full
                      or len(self.backlog) > limits.max_backlog_lines
                      or self.backlog_bytes > limits.max_backlog_bytes
                      or self._busy())
        if want_pause != self.read_paused:
            self.read_paused = want_pause
            if want_pause:
                self.transport.pause_reading()
                self.peer.start(self.transport)
            else:
                self.transport.resume_reading()
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
