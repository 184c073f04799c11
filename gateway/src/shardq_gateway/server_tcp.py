"""The gateway's TCP server: one ``ClientSession`` per client connection.

A session splits the byte stream into lines, checks each just enough to route
it (commands.py), and keeps a FIFO of pending answers (inflight.py): requests to
different nodes run concurrently, answers go back strictly in request order,
written once per event-loop turn.

Like a node, a session runs a client's lines in order: while one of its PULLs
is blocked, or one of its requests waits to be retried after ``MOVED`` or
``TRYAGAIN``, the lines behind it wait (``backlog``), so no request of a client
overtakes an earlier one. Other clients are never held up: a pull that may wait
goes on a connection of this session's own to that node (never a shared one),
closed when the client leaves, and the node then hands back whatever was leased
on it. Every job a client pulled is remembered with its lease token until it
acks, fails or cancels it: a lease-less ACK/FAIL/PROGRESS/TOUCH/ACKB/RELEASE of
the client carries that token (the nodes see the gateway's shared connections,
not its clients), and when the client leaves its jobs are sent back with
``RELEASE``, each with its token, so a lease that expired meanwhile never hands
back another worker's attempt. A line over ``max_line``
is refused and the connection closed, as a node does.

Bytes are bounded as on a node (``Limits``, docs/limits.md): a session counts
its requests in flight and the answers it holds (``held``); past
``max_output`` with its write buffer, it sends no more lines and stops reading
until the client has read some; past ``max_output_hard``, or over budget with
nothing read for ``output_timeout``, the client is disconnected (logged,
``shardq_gateway_connections_dropped_total``). An exception while routing one
line becomes that line's ``Internal: …`` answer.

Must not: block, buffer without bound, answer out of order, or import the node's code.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from time import perf_counter
from typing import TYPE_CHECKING, Any, cast

import orjson
from mypy_extensions import mypyc_attr
from orjson import JSONDecodeError, loads

from shardq.errors import AuthenticationRequired, InvalidRequest, ShardqError
from shardq.wire.framing import LineSplitter
from shardq.wire.protocol import parse_line, req_id_of
from shardq_server.limits import PeerWatch, Stall, too_many_connections

from .commands import ROUTES, unknown
from .inflight import BLOCKING, FanOut, Forward, Merge, Pending, Split, error_line
from .subscriptions import Subscriptions
from .upstream import CLOSED, NodeLink, Upstream

if TYPE_CHECKING:
    from .main import Gateway

log = logging.getLogger("shardq_gateway.tcp")

#: Leases a session remembers (one PULLB's worth): the oldest are forgotten past it.
MAX_SESSION_LEASES = 100_000
#: The transport's write buffer pauses the session past this (or half ``max_output``).
WRITE_HIGH_WATER = 4 * 1024 * 1024
#: Commands whose answer may be much larger than their line (a job, a result, a list).
#: Of these, a session has at most ``max_output / hint`` in flight (between 1 and
#: ``MAX_READS``), ``hint`` being the size of its recent answers: so a client that asks
#: for many large answers gets them a few at a time, as fast as it reads them.
READS = frozenset({"GETJOB", "GETRESULT", "GETPROGRESS", "PULL", "PULLB", "DLQ", "CRONLIST",
                   "LISTQUEUES", "METRICS"})
MAX_READS = 64
#: What ``hint`` starts at: four 2 MiB answers in flight at first (8 MiB budget).
FIRST_HINT = 2 * 1024 * 1024
DROPPED = b'{"event":"dropped"'


@mypyc_attr(native_class=False)  # mypyc compiles no subclass of bytes
class _TooLong(bytes):
    """Stands in the line list for a line that was too long; holds its error answer."""


class ClientSession(asyncio.Protocol):
    """One client connection."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.router = gateway.router
        self.settings = gateway.settings
        self.flusher = gateway.flusher
        self.index = gateway.next_index()
        self.max_line = self.settings.max_line
        self.limits = limits = self.settings.limits
        self.transport: asyncio.Transport | None = None
        self.authed = not self.settings.tokens
        self.fifo: deque[Pending] = deque()
        self.out: list[bytes] = []  # event lines, written with the next answers
        self.backlog: deque[bytes] = deque()
        self.backlog_bytes = 0
        #: bytes of this session's requests in flight and of answers not yet written
        self.held = 0
        self.output_full = False  # held + write buffer passed max_output: lines wait
        self.reads = 0  # READS commands in flight (or answered, not yet written)
        self.hint = FIRST_HINT  # the size of this client's recent READS answers
        self.read_wait = False  # a READS line waits for one of those to be written
        self.stall = Stall(limits.output_timeout, self.unsent, self._stalled)
        self.peer = PeerWatch(self._peer_gone)
        self.refused = False  # over max_connections: never served
        self.splitter = LineSplitter(self.max_line)
        self.blocking = 0  # pulls in flight that may wait
        self.retrying = 0  # requests waiting to be retried
        #: Jobs pulled over shared connections and not yet settled: id -> lease token
        #: (the ``started_at`` of the attempt).
        self.leases: dict[int, int] = {}
        self.pulls: dict[NodeLink, Upstream] = {}
        self.subs: Subscriptions | None = None
        self.dirty = False
        self.closed = False
        self.refusing = False
        self.close_when_sent = False
        self.read_paused = False
        self.write_paused = False

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        limit = self.limits.max_connections
        if len(self.gateway.sessions) >= limit:
            self.refused = self.closed = True
            self.transport.write(error_line(too_many_connections(limit), None) + b"\n")
            self.transport.close()
            self.router.metrics.dropped("too_many_connections")
            return
        self.transport.set_write_buffer_limits(
            high=min(WRITE_HIGH_WATER, self.limits.max_output // 2))
        self.gateway.sessions.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.refused:
            return
        self.stall.stop()
        self.peer.stop()
        self.gateway.sessions.discard(self)
        for conn in self.pulls.values():
            conn.close()  # the node hands back what it leased on them
        self.pulls.clear()
        if self.subs is not None:
            self.subs.close()
        if self.leases:
            self._release_leases()
        self.fifo.clear()
        self.backlog.clear()
        self.backlog_bytes = self.held = 0
        self.splitter.drop()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._update_reading()
        self._drained()

    def data_received(self, data: bytes) -> None:
        if self.closed or self.refusing:
            return
        lines, too_long = self.splitter.feed(data)
        if lines or too_long:
            self._take(lines, too_long)

    # -- running lines --------------------------------------------------------------------------

    def _take(self, lines: list[bytes], too_long: int) -> None:
        """Run complete lines (or queue them behind a wait); then refuse a too-long one."""
        if too_long:
            assert self.transport is not None
            self.refusing = True
            self.splitter.drop()
            self.transport.pause_reading()
            text = InvalidRequest(f"line longer than {self.max_line} bytes ({too_long}+ received)")
            lines.append(_TooLong(error_line(text.text, None)))
        if self.backlog or self.blocking or self.retrying or self.output_full:
            self.backlog.extend(lines)
            self.backlog_bytes += sum(map(len, lines))
        else:
            self._run(lines)
        self._update_reading()

    def _run(self, lines: list[bytes]) -> None:
        """Send lines in order until one must wait or the bytes held pass ``max_output``."""
        room = self.room()
        for n, line in enumerate(lines):
            if type(line) is _TooLong:
                self.local(bytes(line))
                self.close_when_sent = True
                return
            if not self._dispatch(line):  # too many large answers on their way
                self._requeue(lines[n:])
                return
            room -= len(line)
            if self.blocking or self.retrying or room < 0:
                self._requeue(lines[n + 1 :])
                if room < 0:
                    self._stop()
                return

    def _requeue(self, rest: list[bytes]) -> None:
        self.backlog.extendleft(reversed(rest))
        self.backlog_bytes += sum(map(len, rest))

    def _dispatch(self, line: bytes) -> bool:
        """Route one line (or answer it here); False if it must wait for the reads window."""
        rid: str | int | None = None
        cmd: Any = None
        try:
            try:
                req = loads(line)
            except JSONDecodeError:
                req = None
            if type(req) is not dict:
                req = parse_line(line)  # raises the node's words for it
            got: Any = req.get("reqId")  # (compiled: checked before it is typed)
            if got is None or type(got) is str or type(got) is int:
                rid = got
            else:
                req_id_of(req)  # raises the node's words for it
            cmd = req.get("cmd")
            route = ROUTES.get(cmd) if type(cmd) is str else None
            if route is None:
                raise unknown(req)
            if not self.authed and cmd != "AUTH":
                raise AuthenticationRequired()
            reads = cmd in READS
            if reads and self.reads >= self._read_window():
                self.read_wait = True
                return False
            started = perf_counter()
            route(self, req, line, rid)
            if self.fifo:
                call = self.fifo[-1]
                call.cmd, call.started = cmd, started
                if reads:
                    self.reads += 1
        except ShardqError as exc:
            self.local(error_line(exc.text, rid))
        except Exception as exc:  # a bug: this line gets an answer, the others go on
            name = cmd if type(cmd) is str and cmd in ROUTES else "a request"
            self.local(error_line(self.router.causes.error(name, exc).text, rid))
        if self.fifo:
            self.fifo[-1].cost = len(line)
            self.held += len(line)
        return True

    def _read_window(self) -> int:
        return max(1, min(MAX_READS, self.limits.max_output // self.hint))

    def _read_done(self, size: int) -> None:
        """A READS answer was written: learn its size; a waiting line may go."""
        self.reads -= 1
        hint = self.hint
        self.hint = size if size > hint - (hint >> 3) else hint - (hint >> 3)
        if self.read_wait and self.reads < self._read_window():
            self.read_wait = False
            self._schedule_resume()

    def _resume(self) -> None:
        """What held the lines behind it back is over: run them."""
        if (self.closed or self.blocking or self.retrying or self.output_full
                or self.read_wait or not self.backlog):
            return
        lines = list(self.backlog)
        self.backlog.clear()
        self.backlog_bytes = 0
        self._run(lines)
        self._update_reading()

    # -- the output budget ----------------------------------------------------------------------

    def unsent(self) -> int:
        """Bytes in flight or not yet read: requests, answers held, the write buffer."""
        buffered = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return self.held + buffered

    def room(self) -> int:
        return self.limits.max_output - self.unsent()

    def _stop(self) -> None:
        self.output_full = True
        self.stall.start()
        self._update_reading()

    def _drained(self) -> None:
        """Answers went out or the client read: go on if the budget has room again."""
        if not self.output_full or self.closed or self.room() <= 0:
            return
        self.output_full = False
        self.stall.stop()
        self._update_reading()
        self._schedule_resume()

    def _stalled(self) -> None:
        self._cut("output_stalled", f"{self.unsent()} bytes unread and nothing read for "
                  f"{self.limits.output_timeout:g}s (output_timeout)")

    def _cut(self, reason: str, why: str) -> None:
        """Disconnect a client that does not read; what it holds is dropped at once."""
        if self.closed or self.transport is None:
            return
        log.warning("disconnecting client %s: %s",
                    self.transport.get_extra_info("peername"), why)
        self.router.metrics.dropped(reason)
        self.closed = True  # nothing more is written or counted (connection_lost cleans up)
        self.transport.abort()

    # -- what commands.py and inflight.py use ------------------------------------------------------

    def forward(self, line: bytes, slot: int, rid: str | int | None, flags: int) -> None:
        call = Forward(self, line, slot, rid, flags)
        self.fifo.append(call)
        if flags & BLOCKING:
            self.blocking += 1
        link = self.router.by_slot[slot]
        if link is None or flags:
            call.dispatch()
        else:
            link.send(call, self.index)  # the common case of Forward.dispatch

    def split(self, cmd: str, ids: list[int], fields: dict[str, list[Any]],
              rid: str | int | None, line: bytes) -> None:
        call = Split(self.router, self, cmd, rid)
        self.fifo.append(call)
        call.start(ids, fields, line)

    def fan_out(self, line: bytes, merge: Merge, rid: str | int | None) -> None:
        call = FanOut(self, merge, rid)
        self.fifo.append(call)
        call.start(line)

    def local(self, answer: bytes) -> None:
        """An answer the gateway gives itself, in its place in the order."""
        call = Pending(answer)
        self.fifo.append(call)
        self.ready(call)

    def subscriptions(self) -> Subscriptions:
        if self.subs is None:
            self.subs = Subscriptions(self)
        return self.subs

    def ready(self, call: Pending) -> None:
        """``call`` has its answer: write it (and those behind it) if it is first in line."""
        if self.closed:
            return
        self.held += len(call.answer)  # type: ignore[arg-type] # set before ready()
        if self.held > self.limits.max_output_hard:
            self._cut("output_limit", f"{self.held} bytes of answers held "
                      f"(max_output_hard {self.limits.max_output_hard})")
            return
        if not self.dirty and self.fifo and self.fifo[0] is call:
            self.flusher.mark(self)

    def pull_done(self) -> None:
        """A pull that may wait has its answer: the lines behind it may run."""
        self.blocking -= 1
        if not self.blocking:
            self._schedule_resume()

    def retry_begin(self) -> None:
        self.retrying += 1

    def retry_end(self) -> None:
        self.retrying -= 1
        if not self.retrying:
            self._schedule_resume()

    def _schedule_resume(self) -> None:
        if self.backlog and not self.closed and not self.output_full:
            asyncio.get_running_loop().call_soon(self._resume)

    def dedicated(self, link: NodeLink) -> Upstream | None:
        """This session's own connection to ``link``'s node, for pulls that may wait."""
        conn = self.pulls.get(link)
        if conn is None or conn.state == CLOSED:
            conn = link.open_dedicated()
            if conn is None:
                return None
            self.pulls[link] = conn
        return conn

    def took(self, answer: bytes) -> None:
        """A pull answered: remember the leased jobs and their tokens (at most
        ``MAX_SESSION_LEASES``: past it the oldest are forgotten, and time out instead)."""
        decoded = orjson.loads(answer)
        jobs = decoded.get("jobs")
        if jobs is None:
            job = decoded.get("job")
            jobs = [job] if job is not None else []
        leases = self.leases
        for job in jobs:
            if type(job) is dict and type(job.get("id")) is int:
                started = job.get("started_at")
                leases[job["id"]] = started if type(started) is int and started >= 0 else 0
        while len(leases) > MAX_SESSION_LEASES:
            del leases[next(iter(leases))]
        if self.closed:  # the client left before the answer came: hand the jobs back
            self._release_leases()

    def settled(self, ids: list[int]) -> list[int]:
        """ACKB or RELEASE from the client: those jobs are no longer its to hand back; the
        tokens it held them with (0 for a job it holds no lease of)."""
        pop = self.leases.pop
        return [pop(job_id, 0) for job_id in ids]

    def _release_leases(self) -> None:
        """RELEASE the jobs this client leased, each with its lease token (``leases``), so a
        lease that expired meanwhile never hands back another worker's later attempt."""
        held = sorted(self.leases.items())
        self.leases.clear()
        Split(self.router, None, "RELEASE", None).start(
            [job_id for job_id, _ in held], {"leases": [started for _, started in held]}, None)

    def event(self, line: bytes) -> None:
        """An event line from a node: relay it, unless the client is too far behind."""
        if self.closed or self.transport is None:
            return
        limit = self.limits.max_output
        if self.transport.get_write_buffer_size() > limit:
            line = orjson.dumps({
                "event": "dropped",
                "error": f"subscriber too slow: more than {limit} bytes of events "
                "unread; connection closed",
            })
        if line.startswith(DROPPED):
            self.close_when_sent = True
        self.out.append(line)
        if not self.dirty:
            self.flusher.mark(self)

    # -- writing --------------------------------------------------------------------------------

    def flush(self) -> None:
        self.dirty = False
        if self.closed or self.transport is None:
            return
        fifo = self.fifo
        out = self.out
        metrics = self.router.metrics
        written = 0
        while fifo:
            call = fifo[0]
            answer = call.answer
            if answer is None:
                break
            fifo.popleft()
            out.append(answer)
            written += call.cost + len(answer)
            if call.started:
                metrics.request(call.cmd, answer.startswith(b'{"ok":true'), call.started)
                if call.cmd in READS:
                    self._read_done(len(answer))
        self.held -= written
        if out:
            out.append(b"")
            self.transport.write(b"\n".join(out))
            self.out = []
            unsent = self.unsent()
            if unsent > self.limits.max_output_hard:
                self._cut("output_limit", f"{unsent} bytes of answers unread "
                          f"(max_output_hard {self.limits.max_output_hard})")
                return
            if unsent > self.limits.max_output and not self.output_full:
                self._stop()
        if self.close_when_sent and not fifo:
            self.close()
            return
        self._update_reading()
        if self.output_full:
            self._drained()

    def _update_reading(self) -> None:
        if self.transport is None or self.closed or self.refusing:
            return
        limits = self.limits
        want_pause = (self.write_paused or self.output_full
                      or len(self.fifo) > self.settings.max_inflight
                      or len(self.backlog) > limits.max_backlog_lines
                      or self.backlog_bytes > limits.max_backlog_bytes)
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
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abort()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()


async def start_tcp(gateway: Gateway, host: str, port: int) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: ClientSession(gateway), host, port,
                                    reuse_address=True)
