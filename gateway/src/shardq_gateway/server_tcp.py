"""The gateway's TCP server: one ``ClientSession`` per client connection.

A session splits the byte stream into lines, checks each just enough to route
it (routes.py), and keeps a FIFO of pending answers (inflight.py): requests to
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
its requests in flight and the answers it holds (``held_bytes``); past
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
from typing import TYPE_CHECKING, Any

from orjson import JSONDecodeError, loads

from shardq.errors import AuthenticationRequired, ShardqError
from shardq.wire.protocol import parse_line, req_id_of
from shardq_server.line_session import LineSession, TooLong, too_slow

from .inflight import BLOCKING, DRAINING, Forward, Pending, Split, error_line, local
from .leases import Leases
from .routes import ROUTES, command_name, unknown
from .subscriptions import Subscriptions
from .upstream import CLOSED, NodeLink, Upstream

if TYPE_CHECKING:
    from shardq_server.auth import Auth

    from .main import Gateway
    from .router import Router
    from .settings import GatewaySettings
    from .upstream import Flusher

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
#: What a client holding jobs may still send to a draining gateway: it settles them.
SETTLES = frozenset({"ACK", "ACKB", "FAIL", "TOUCH", "PROGRESS", "RELEASE", "AUTH"})


class ClientSession(LineSession):
    """One client connection (a ``Client`` of routing, clients.py)."""

    LOG = logging.getLogger("shardq_gateway.tcp")
    UNREAD = "bytes unread"

    def __init__(self, *, router: Router, settings: GatewaySettings, auth: Auth,
                 flusher: Flusher, sessions: set[Any], index: int) -> None:
        super().__init__(settings.limits, settings.max_line, sessions, router.metrics.dropped)
        self.router = router
        self.settings = settings
        self.auth = auth
        self.flusher = flusher
        self.index = index
        self.authed = not auth.required
        self.fifo: deque[Pending] = deque()
        self.out: list[bytes] = []  # event lines, written with the next answers
        self.reads = 0  # READS commands in flight (or answered, not yet written)
        self.hint = FIRST_HINT  # the size of this client's recent READS answers
        self.read_wait = False  # a READS line waits for one of those to be written
        self.blocking = 0  # pulls in flight that may wait
        self.retrying = 0  # requests waiting to be retried
        #: Jobs pulled over shared connections and not yet settled, with their tokens.
        self.leases = Leases()
        self.pulls: dict[NodeLink, Upstream] = {}
        self.subs: Subscriptions | None = None
        self.dirty = False
        self.draining = False  # the gateway drains: see ``drain``
        self.farewell_said = False  # the DRAINING answer is queued: nothing more runs
        self.late = False  # opened after the drain began: drains as soon as it is made

    # -- LineSession ------------------------------------------------------------------------------

    def error_line(self, text: str) -> bytes:
        return error_line(text, None)  # answers are joined with newlines when written

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.late and not self.closing:
            self.drain()

    def _lost(self) -> None:
        self.sessions.discard(self)
        if not self.farewell_said:  # (a drained client's stay open until the gateway exits)
            for conn in self.pulls.values():
                conn.close()  # the node hands back what it leased on them
        self.pulls.clear()
        if self.subs is not None:
            self.subs.close()
        if self.leases and not self.farewell_said:
            # (a drained client still holds its jobs: it settles them through another
            # gateway with their tokens; the node hands back the rest when this one exits)
            self._release_leases()
        self.fifo.clear()
        self.held_bytes = 0

    def _waiting(self) -> bool:
        return bool(self.blocking or self.retrying or self.output_full)

    def _go_on(self) -> None:
        self._schedule_resume()

    def _busy(self) -> bool:
        return len(self.fifo) > self.settings.max_inflight

    # -- running lines --------------------------------------------------------------------------

    def _run(self, lines: list[bytes]) -> None:
        self._send_lines(lines)
        self._update_reading()

    def _send_lines(self, lines: list[bytes]) -> None:
        """Send lines in order until one must wait or the bytes held pass ``max_output``."""
        room = self.room()
        for n, line in enumerate(lines):
            if type(line) is TooLong:
                local(self, bytes(line))
                self.close_when_sent = True
                return
            if not self._dispatch(line):  # too many large answers on their way
                self._requeue(lines[n:])
                return
            if self.farewell_said:  # the lines after it are not run (docs/protocol.md)
                return
            room -= len(line)
            if self.blocking or self.retrying or room < 0:
                self._requeue(lines[n + 1 :])
                if room < 0:
                    self._stop()
                return

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
            if self.draining and not (self.leases and cmd in SETTLES):
                local(self, error_line(DRAINING, rid))
                self.farewell()
                return True
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
            local(self, error_line(exc.text, rid))
        except Exception as exc:  # a bug: this line gets an answer, the others go on
            local(self, error_line(self.router.causes.error(command_name(cmd), exc).text, rid))
        if self.fifo:
            self.fifo[-1].cost = len(line)
            self.held_bytes += len(line)
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
        if (self.closing or self.blocking or self.retrying or self.output_full
                or self.read_wait or not self.backlog):
            return
        self._run(self._take_backlog())

    def _schedule_resume(self) -> None:
        if self.backlog and not self.closing and not self.output_full:
            asyncio.get_running_loop().call_soon(self._resume)

    # -- draining (drain.py) ----------------------------------------------------------------

    def drain(self) -> None:
        """The gateway stops: from now on a line runs only if it settles a job this client
        holds; any other is answered ``GatewayDraining`` and nothing after it runs. A pull
        that waits is cut short the same way (``Forward.cut_short``). The connection ends
        with that answer, or with an unasked one once nothing of the client's is in flight
        and it holds no jobs."""
        self.draining = True
        for call in list(self.fifo):
            if type(call) is Forward and call.flags & BLOCKING and call.answer is None:
                call.cut_short()
                break  # the lines behind a waiting pull have not run: they are dropped
        self._farewell_if_idle()

    def farewell(self) -> None:
        """A ``GatewayDraining`` answer is queued: what the client sent after it is dropped
        unread (it was not run); the connection half-closes once that answer is written."""
        self.farewell_said = True
        self.refusing = True  # LineSession: nothing more is read into lines
        self.backlog.clear()
        self.backlog_bytes = 0

    def _farewell_if_idle(self) -> None:
        if (self.draining and not self.farewell_said and not self.closing and not self.fifo
                and not self.backlog and not self.leases):
            local(self, error_line(DRAINING, None))
            self.farewell()

    def _half_close(self) -> None:
        """The DRAINING answer is written: send FIN, and read (and drop) what the client still
        sends until it closes, so its unread bytes never turn into a reset that could lose
        that answer on the way. ``Gateway.stop`` closes what is left at the drain's bound."""
        transport = self.transport
        self.closing = True
        if transport is None:
            return
        if transport.can_write_eof():
            transport.write_eof()
            if self.read_paused:
                transport.resume_reading()
        else:
            transport.close()

    # -- Client: what routing and the calls in flight use -------------------------------------

    def add(self, call: Pending) -> None:
        self.fifo.append(call)

    def subscriptions(self) -> Subscriptions:
        if self.subs is None:
            self.subs = Subscriptions(self)
        return self.subs

    def ready(self, call: Pending) -> None:
        """``call`` has its answer: write it (and those behind it) if it is first in line."""
        if self.closing:
            return
        self.held_bytes += len(call.answer)  # type: ignore[arg-type] # set before ready()
        if self.held_bytes > self.max_output_hard:
            self._cut("output_limit", f"{self.held_bytes} bytes of answers held "
                      f"(max_output_hard {self.max_output_hard})")
            return
        if not self.dirty and self.fifo and self.fifo[0] is call:
            self.flusher.mark(self)

    def pull_begin(self) -> None:
        self.blocking += 1

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
        """A pull answered: remember the leased jobs and their tokens."""
        self.leases.took(answer)
        if self.closing:  # the client left before the answer came: hand the jobs back
            self._release_leases()

    def _release_leases(self) -> None:
        """RELEASE the jobs this client leased, each with its lease token, so a lease that
        expired meanwhile never hands back another worker's later attempt."""
        held = self.leases.take_all()
        Split(self.router, None, "RELEASE", None).start(
            [job_id for job_id, _ in held], {"leases": [started for _, started in held]}, None)

    def event(self, line: bytes) -> None:
        """An event line from a node: relay it, unless the client is too far behind."""
        if self.closing or self.transport is None:
            return
        limit = self.limits.max_output
        if self.transport.get_write_buffer_size() > limit:
            line = too_slow(limit)
        if line.startswith(DROPPED):
            self.close_when_sent = True
        self.out.append(line)
        if not self.dirty:
            self.flusher.mark(self)

    # -- writing --------------------------------------------------------------------------------

    def flush(self) -> None:
        self.dirty = False
        if self.closing or self.transport is None:
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
        self.held_bytes -= written
        if out:
            out.append(b"")
            self.transport.write(b"\n".join(out))
            self.out = []
            if self._over_hard_limit():
                return
            if self.unsent() > self.max_output and not self.output_full:
                self._stop()
        if self.close_when_sent and not fifo:
            self.close()
            return
        if self.draining and not fifo:
            if self.farewell_said:
                self._half_close()
                return
            self._farewell_if_idle()
        self._update_reading()
        if self.output_full:
            self._drained()


async def start_tcp(gateway: Gateway, host: str, port: int) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()

    def session() -> ClientSession:
        new = ClientSession(router=gateway.router, settings=gateway.settings, auth=gateway.auth,
                            flusher=gateway.flusher, sessions=gateway.sessions,
                            index=gateway.next_index())
        new.late = gateway.closing  # a late connection of a draining gateway: told at once
        return new

    return await loop.create_server(session, host, port, reuse_address=True)
