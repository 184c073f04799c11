"""What routing and the requests in flight ask of the client that sent a request: a TCP
session (server_tcp.py) or an in-process HTTP call (server_http.py).

routes.py, inflight.py and subscriptions.py take a ``Client`` (never the whole
session or the ``Gateway``), so the HTTP API runs the same routing as TCP without a
connection of its own.

Must not: hold behaviour; these are types only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from shardq_server.auth import Auth

    from .inflight import Pending
    from .leases import Leases
    from .router import Router
    from .settings import GatewaySettings
    from .subscriptions import Subscriptions
    from .upstream import NodeLink, Upstream


class Client(Protocol):
    """The sender of requests, as routing and the calls in flight see it."""

    router: Router
    settings: GatewaySettings
    auth: Auth
    authed: bool
    #: which of a node's shared connections this client's requests take
    index: int
    #: the jobs this client holds, with their lease tokens
    leases: Leases

    #: the gateway is draining (docs/protocol.md): a pull that would wait is cut short
    draining: bool

    @property
    def closing(self) -> bool:
        """The client left: nothing more is sent for it."""
        ...

    def add(self, call: Pending) -> None:
        """A new request (or a local answer): it is answered in this place of the order."""

    def ready(self, call: Pending) -> None:
        """``call`` has its answer."""

    def dedicated(self, link: NodeLink) -> Upstream | None:
        """This client's own connection to ``link``'s node, for pulls that may wait."""

    def took(self, answer: bytes) -> None:
        """A pull over a shared connection answered: its jobs are this client's."""

    def pull_begin(self) -> None:
        """A pull that may wait was sent: later requests of this client wait for it."""

    def pull_done(self) -> None:
        """A pull that may wait has its answer."""

    def retry_begin(self) -> None:
        """A request waits to be sent again (MOVED, TRYAGAIN): later ones wait for it."""

    def retry_end(self) -> None:
        """It was answered."""

    def farewell(self) -> None:
        """A draining gateway answered a request with ``GatewayDraining``: nothing after it
        on this client's connection runs, and the connection ends once it is written."""

    def subscriptions(self) -> Subscriptions:
        """This client's subscriptions (created on first use)."""
        ...

    def event(self, line: bytes) -> None:
        """An event line from a node, for a subscribed client."""
