"""Requests that do not come from a TCP connection: the gateway's HTTP routes and SSE streams,
routed in-process as a node runs its own (node's http_backend.py).

``HttpRequests.call(req)`` runs one protocol request through the gateway's routes
(routes.py) and the requests in flight (inflight.py), exactly as a TCP line takes
them (validation, routing, retries after MOVED/TRYAGAIN, leases, fan-out and merge),
and returns its answer object. Each request is an ``HttpCall``, a ``Client`` of its
own that waits for its one answer: HTTP requests do not wait for each other.

HTTP has no connection to hold a lease: the HTTP clients of one gateway are one
holder (one ``Leases``, docs/decisions.md), so a lease-less ACK, FAIL, PROGRESS,
TOUCH, ACKB or RELEASE over HTTP carries the token of a job HTTP pulled, and never
settles an attempt a TCP client holds. A pull that may wait goes on connections of
its own to the node (a ``Puller``'s, kept for the next such pull, at most
``MAX_IDLE_PULLERS`` idle); if the HTTP client leaves first they are closed and the
node hands back what was leased on them. ``/events`` subscribes on every node with
an ``EventStream``, dropped when more than ``MAX_STREAM_EVENTS`` lines wait unread.

Must not: route anything itself, or open a connection to its own gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from time import perf_counter
from typing import TYPE_CHECKING, Any

import orjson

from shardq.errors import InvalidRequest, ShardqError
from shardq_server.auth import Auth

from .inflight import Pending, error_line, local
from .leases import Leases
from .routes import ROUTES, command_name, unknown
from .subscriptions import Subscriptions
from .upstream import CLOSED, NodeLink, Upstream

if TYPE_CHECKING:
    from .router import Router
    from .settings import GatewaySettings

#: Pullers (connections of their own for pulls that may wait) kept idle for the next pull.
MAX_IDLE_PULLERS = 16
#: Event lines an SSE subscriber may have unread before it is dropped.
MAX_STREAM_EVENTS = 10_000


class Puller:
    """Connections of its own to each node, for one HTTP pull that may wait at a time."""

    def __init__(self) -> None:
        self.conns: dict[NodeLink, Upstream] = {}

    def dedicated(self, link: NodeLink) -> Upstream | None:
        conn = self.conns.get(link)
        if conn is None or conn.state == CLOSED:
            conn = link.open_dedicated()
            if conn is None:
                return None
            self.conns[link] = conn
        return conn

    def close(self) -> None:
        """The node hands back what was leased on these connections."""
        conns, self.conns = self.conns, {}
        for conn in conns.values():
            conn.close()


class HttpClient:
    """What every HTTP request of one gateway shares: routing, and the one lease holder."""

    authed = True

    def __init__(self, router: Router, settings: GatewaySettings, index: int) -> None:
        self.router = router
        self.settings = settings
        self.auth = Auth()  # the HTTP API checked the token
        self.index = index
        self.leases = Leases()


class HttpCall:
    """One request routed in-process: a ``Client`` (clients.py) with one answer to wait for."""

    authed = True
    draining = False

    def __init__(self, host: HttpClient, puller: Puller | None = None) -> None:
        self.router = host.router
        self.settings = host.settings
        self.auth = host.auth
        self.index = host.index
        self.leases = host.leases
        self.puller = puller
        self.closing = False
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def start(self, req: dict[str, Any]) -> str | None:
        """Route ``req`` (its answer comes to ``answer``); its command once routed (None if
        refused before: not counted in the request metrics, as on TCP)."""
        cmd = req.get("cmd")
        try:
            route = ROUTES.get(cmd) if type(cmd) is str else None
            if route is None:
                raise unknown(req)
            route(self, req, orjson.dumps(req), None)
            return cmd if type(cmd) is str else None
        except ShardqError as exc:
            local(self, error_line(exc.text, None))
        except Exception as exc:  # a bug: this request gets an answer, the gateway goes on
            local(self, error_line(self.router.causes.error(command_name(cmd), exc).text, None))
        return None

    # -- Client ---------------------------------------------------------------------------------

    def add(self, call: Pending) -> None:
        """Nothing to order: the request's one call answers it."""

    def ready(self, call: Pending) -> None:
        if not self.answer.done() and call.answer is not None:
            self.answer.set_result(call.answer)

    def dedicated(self, link: NodeLink) -> Upstream | None:
        if self.puller is None:  # routes send only pulls that may wait here: they have one
            self.puller = Puller()
        return self.puller.dedicated(link)

    def took(self, answer: bytes) -> None:
        self.leases.took(answer)

    def pull_begin(self) -> None:
        """No request of this caller waits behind it."""

    def pull_done(self) -> None:
        """No request of this caller waits behind it."""

    def retry_begin(self) -> None:
        """No request of this caller waits behind it."""

    def retry_end(self) -> None:
        """No request of this caller waits behind it."""

    def farewell(self) -> None:
        """HTTP calls are not drained one by one (the HTTP server stops as a whole)."""

    def subscriptions(self) -> Subscriptions:
        raise InvalidRequest("SUBSCRIBE over HTTP: use GET /events")

    def event(self, line: bytes) -> None:
        """Never subscribed."""


class EventStream(HttpCall):
    """An SSE subscriber: event lines queue up here until the response sends them."""

    def __init__(self, host: HttpClient) -> None:
        super().__init__(host)
        self.subs = Subscriptions(self)
        self.lines: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.dropped = False

    def subscriptions(self) -> Subscriptions:
        return self.subs

    def event(self, line: bytes) -> None:
        if self.dropped or self.closing:
            return
        if self.lines.qsize() > MAX_STREAM_EVENTS:
            self.dropped = True
            self.lines.put_nowait(None)
            return
        self.lines.put_nowait(line)

    def close(self) -> None:
        self.closing = True
        self.subs.close()


class HttpRequests:
    """The requests and event streams of a gateway's HTTP API, routed in-process."""

    def __init__(self, router: Router, settings: GatewaySettings, index: int) -> None:
        self.router = router
        self.host = HttpClient(router, settings, index)
        self.idle: list[Puller] = []

    @property
    def leases(self) -> Leases:
        return self.host.leases

    async def call(self, req: dict[str, Any]) -> dict[str, Any]:
        waits = req.get("cmd") in ("PULL", "PULLB") and req.get("timeout") != 0
        puller = (self.idle.pop() if self.idle else Puller()) if waits else None
        call = HttpCall(self.host, puller)
        started = perf_counter()
        cmd = call.start(req)
        try:
            raw = await asyncio.shield(call.answer)
        except BaseException:
            call.closing = True  # the HTTP client left: nothing more is sent for it
            if puller is not None:
                puller.close()
            raise
        if cmd is not None:
            self.router.metrics.request(cmd, raw.startswith(b'{"ok":true'), started)
        if puller is not None:
            if len(self.idle) < MAX_IDLE_PULLERS:
                self.idle.append(puller)
            else:
                puller.close()
        answer: dict[str, Any] = orjson.loads(raw)
        return answer

    async def events(self, queue: str, names: frozenset[str]) -> AsyncIterator[bytes]:
        stream = EventStream(self.host)
        try:
            stream.start({"cmd": "SUBSCRIBE", "queue": queue, "events": sorted(names)})
            answer = orjson.loads(await stream.answer)
            if not answer.get("ok"):
                yield orjson.dumps({"event": "error", "error": answer.get("error")})
                return
            while True:
                line = await stream.lines.get()
                if line is None:
                    return
                yield line
        finally:
            stream.close()

    def close(self) -> None:
        """Close the pullers' connections (the nodes hand back what was leased on them)."""
        idle, self.idle = self.idle, []
        for puller in idle:
            puller.close()
