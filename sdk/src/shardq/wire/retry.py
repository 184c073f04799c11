"""The retry policy for requests a node refused because their slot is moving: ``MOVED``,
``TRYAGAIN`` (PROTOCOL.md), used by the gateway's requests in flight and the SDK's
direct mode.

- ``MOVED <epoch>``: the slot has a new owner. Read the topology again and send there:
  at once the first time, after the pause from then on (a topology still behind must
  not make it spin).
- ``TRYAGAIN``, and ``MOVED <epoch> NOTPRIMARY <name>`` (a follower answered: a
  failover is under way or just done): wait a short pause, then send again.

Pauses start at ``FIRST_DELAY`` and grow by ``GROWTH`` up to ``MAX_DELAY``; once the
request has been retried for its ``budget`` (seconds) the caller gives up with the
refusal (``Unavailable: slot N is moving, try again`` on a gateway). Whether a request
may be sent again at all (never one that may have been delivered when its connection
dropped) is the caller's to know, not this module's.

Must not: sleep, or do I/O: it only says when.
"""

from __future__ import annotations

import time

from shardq.errors import Moved

#: Refusal kinds.
MOVED = 1
TRYAGAIN = 2
FIRST_DELAY = 0.01
MAX_DELAY = 0.2
GROWTH = 1.5

#: How a node writes an error answer (``protocol.error_answer``): ok, error, then reqId.
ERROR_PREFIX = b'{"ok":false,"error":"'
_AT = len(ERROR_PREFIX)


def refusal(answer: bytes) -> tuple[int, int] | None:
    """``(MOVED, epoch)`` or ``(TRYAGAIN, 0)`` when the answer line refused for a slot move
    (a follower's ``MOVED <epoch> NOTPRIMARY <name>`` counts as TRYAGAIN); else None."""
    if answer.startswith(b"MOVED ", _AT):
        end = answer.find(b'"', _AT + 6)
        word = answer[_AT + 6 : end]
        if b" NOTPRIMARY" in word:
            return TRYAGAIN, 0
        try:
            return MOVED, int(word)
        except ValueError:
            return None
    if answer.startswith(b'TRYAGAIN"', _AT):
        return TRYAGAIN, 0
    return None


def kind_of(exc: Exception) -> int:
    """The refusal kind of a raised ``Moved`` or ``TryAgain`` (as ``refusal`` reads a line)."""
    if isinstance(exc, Moved) and exc.primary is None:
        return MOVED
    return TRYAGAIN


class Retry:
    """The retry budget of one request: when its retries began, and the next pause."""

    __slots__ = ("budget", "delay", "sent", "since")

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.restart()

    def restart(self) -> None:
        """Start the budget over (a request that had been accepted and waited)."""
        self.since = self.sent = time.monotonic()
        self.delay = FIRST_DELAY

    @property
    def first(self) -> bool:
        """No pause taken yet since the budget (re)started."""
        return self.delay == FIRST_DELAY

    def spent(self) -> bool:
        return time.monotonic() - self.since > self.budget

    def pause(self) -> float | None:
        """The pause before the next attempt (each one longer, up to ``MAX_DELAY``); None
        once the budget is spent."""
        if self.spent():
            return None
        delay = self.delay
        self.delay = min(delay * GROWTH, MAX_DELAY)
        return delay

    def moved_pause(self) -> float | None:
        """After ``MOVED`` (the topology re-read): 0 the first time, else ``pause()``."""
        if self.first and not self.spent():
            self.delay = min(FIRST_DELAY * GROWTH, MAX_DELAY)
            return 0.0
        return self.pause()
