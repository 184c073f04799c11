"""What the node asks of whoever sent a request: a TCP session, an in-process HTTP call, an SSE
stream (server_tcp.py, http_backend.py).

Each room types its callers with the narrowest of these Protocols: group commit sends
answers to a ``Recipient``, event delivery to a ``Subscriber``, a blocked pull waits
on a ``Puller``; a command handler gets a ``Caller``, which is all of them (so a
handler passes its caller on without a cast).

Must not: hold behaviour; these are types only.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .pulls import Waiter


class Recipient(Protocol):
    """Gets answers and event lines, tagged with the log position they wait for."""

    @property
    def transport(self) -> asyncio.WriteTransport | None: ...

    @property
    def closing(self) -> bool: ...

    def send(self, lines: list[bytes], tag: int) -> None: ...


class Subscriber(Recipient, Protocol):
    """Gets the events of the queues it subscribed to (``"*"``: all)."""

    @property
    def subscriptions(self) -> dict[str, frozenset[str]]: ...

    def push_event(self, line: bytes) -> bool:
        """Room for one more event line? False drops it (and may drop the subscriber)."""
        ...


class Puller(Recipient, Protocol):
    """Waits in a blocked PULL: the jobs go to its ``owner``, the answer carries its request id."""

    waiter: Waiter | None

    @property
    def owner(self) -> int: ...

    @property
    def pending_rid(self) -> str | int | None: ...

    def resume(self) -> None:
        """Its blocked PULL was answered: run what queued up behind it."""
        ...


class Caller(Subscriber, Puller, Protocol):
    """The connection that sent a command, as a handler sees it."""

    owner: int
    authed: bool
    subscriptions: dict[str, frozenset[str]]
    pending_rid: str | int | None
    cluster: bool
