"""Subscribers and event delivery: SUBSCRIBE's sessions get the events of their queues.

The engine emits an event only for a queue someone watches (``Engine.watch`` counts
subscribers per queue, ``"*"`` for all); after each batch the runtime calls
``deliver``, which encodes each event once and puts its line in the outbox of every
subscriber that asked for that kind, to leave with the batch's group commit. A
subscriber too far behind is dropped by its session (``push_event``).

Must not: change engine state beyond the watch counts, or write to a connection itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from .callers import Recipient, Subscriber
    from .engine import Engine

    Outbox = list[tuple[Recipient, list[bytes]]]


class Events:
    """The subscribers of one node, by queue."""

    def __init__(self, engine: Engine, outbox: Outbox) -> None:
        self.engine = engine  # the runtime's ``use_engine`` replaces it
        self.outbox = outbox
        self.subscribers: dict[str, set[Subscriber]] = {}

    def subscribe(self, caller: Subscriber, queue: str, events: frozenset[str]) -> None:
        if queue not in caller.subscriptions:
            self.engine.watch[queue] = self.engine.watch.get(queue, 0) + 1
            self.subscribers.setdefault(queue, set()).add(caller)
        caller.subscriptions[queue] = events

    def unsubscribe(self, caller: Subscriber, queue: str) -> None:
        if caller.subscriptions.pop(queue, None) is None:
            return
        watch = self.engine.watch
        watch[queue] -= 1
        if not watch[queue]:
            del watch[queue]
        subs = self.subscribers.get(queue)
        if subs is not None:
            subs.discard(caller)
            if not subs:
                del self.subscribers[queue]

    def deliver(self) -> None:
        """The engine's events of the last batch, to every subscriber that wants them."""
        events, self.engine.events = self.engine.events, []
        for event, queue, job in events:
            line = None
            for key in (queue, "*"):
                for session in self.subscribers.get(key, ()):
                    if event in session.subscriptions.get(key, ()):
                        if line is None:
                            line = orjson.dumps({"event": event, "queue": queue, "job": job})
                        if session.push_event(line):
                            self.outbox.append((session, [line + b"\n"]))
