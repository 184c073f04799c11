"""The one error tree of shardq, and the mapping between it and wire texts.

Every refusal a node or gateway sends is ``{"ok":false,"error":TEXT}``; TEXT
is produced here (``str(error)``) and parsed back here (``error_from_text``),
so the server and the SDK can never disagree on a text. This module must not
import anything from the server side.
"""

from __future__ import annotations

import re
from collections.abc import Callable


class ShardqError(Exception):
    """Base of every error shardq raises or sends over the wire."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class InvalidRequest(ShardqError):
    """A line that does not parse or does not fit the protocol's types."""

    def __init__(self, what: str) -> None:
        super().__init__(f"Invalid: {what}")
        self.what = what


class JobNotFound(ShardqError):
    """The id is unknown or not in a state the command applies to."""

    def __init__(self, job_id: int, text: str | None = None) -> None:
        super().__init__(text or f"Job {job_id} not found")
        self.job_id = job_id


class JobNotActive(JobNotFound):
    """PROGRESS/TOUCH of a job that is not active."""

    def __init__(self, job_id: int) -> None:
        super().__init__(job_id, f"Job {job_id} not found in processing")


class LeaseExpired(ShardqError):
    """The lease token is not the job's current attempt (shardq addition)."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"Lease expired for job {job_id}")
        self.job_id = job_id


class DuplicateJob(ShardqError):
    def __init__(self, key: str) -> None:
        super().__init__(f"Duplicate job with key: {key}")
        self.key = key


class CronNotFound(ShardqError):
    def __init__(self) -> None:
        super().__init__("Cron job not found")


class AuthenticationRequired(ShardqError):
    """No (or not enough) authentication for the command; ``reason`` says what is missing
    (an internal command without the cluster token)."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__("Authentication required" + (f": {reason}" if reason else ""))
        self.reason = reason


class InvalidToken(ShardqError):
    def __init__(self) -> None:
        super().__init__("Invalid token")


class PayloadTooLarge(ShardqError):
    """A value over its size limit: ``what`` names it (``Payload``, ``Result``, ``Message``,
    ``Error``: a job's data, an ACK's result, a PROGRESS message, a FAIL error)."""

    def __init__(self, size: int, limit: int, what: str = "Payload") -> None:
        super().__init__(f"{what} too large: {size} bytes (max {limit})")
        self.size = size
        self.limit = limit
        self.what = what


class LimitReached(ShardqError):
    """A node holds as many of something clients create (queues, crons) as it may; ``what``
    says which limit, and the setting that raises it."""

    def __init__(self, what: str) -> None:
        super().__init__(f"Limit reached: {what}")
        self.what = what


class QueueFull(ShardqError):
    def __init__(self) -> None:
        super().__init__("Queue full: memory and disk budget spent")


class RateLimited(ShardqError):
    def __init__(self) -> None:
        super().__init__("Rate limited")


class StorageFailed(ShardqError):
    """The node could not persist a write (disk full, I/O error); nothing was changed."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"Storage failed: {reason}")
        self.reason = reason


class Moved(ShardqError):
    """The slot is owned by another node; the topology has this epoch or newer. From a
    follower of a replicated shard: ``MOVED <epoch> NOTPRIMARY <primary>`` (the primary's
    node name, empty while a failover chooses one)."""

    def __init__(self, epoch: int, primary: str | None = None) -> None:
        text = f"MOVED {epoch}" if primary is None else f"MOVED {epoch} NOTPRIMARY {primary}"
        super().__init__(text.rstrip())
        self.epoch = epoch
        self.primary = primary


class TryAgain(ShardqError):
    """The slot is frozen by a move; retry after a short pause."""

    def __init__(self) -> None:
        super().__init__("TRYAGAIN")


class Unavailable(ShardqError):
    """A node (or the whole cluster) cannot answer for this request now."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"Unavailable: {reason}")
        self.reason = reason


class GatewayDraining(Unavailable):
    """A gateway that is shutting down (SIGTERM) did not run this request, nor any request
    sent after it on the same connection, and closes that connection: send them again on a
    new one (through the same Service address: another gateway). The one ``Unavailable``
    that is always safe to resend (docs/protocol.md, "A gateway that drains")."""

    REASON = "gateway draining, request not executed: send it again on a new connection"

    def __init__(self) -> None:
        super().__init__(self.REASON)


class InternalError(ShardqError):
    """A server failed on one request for a reason of its own (a bug); it logged the cause.
    The request's outcome is unknown, as after a lost connection."""

    def __init__(self, what: str) -> None:
        super().__init__(f"Internal: {what}")
        self.what = what


class ShardqConnectionError(ShardqError):
    """The client lost or could not open its connection (client-side only)."""


class NotSent(ShardqConnectionError):
    """The connection could not be opened, or was closed before the request was written:
    nothing was sent, so the SDK may send it again (client-side only)."""


_PATTERNS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], ShardqError]]] = [
    (re.compile(r"^Invalid: (.*)$", re.S), lambda m: InvalidRequest(m[1])),
    (re.compile(r"^Job (\d+) not found in processing$"), lambda m: JobNotActive(int(m[1]))),
    (re.compile(r"^Job (\d+) not found$"), lambda m: JobNotFound(int(m[1]))),
    (re.compile(r"^Lease expired for job (\d+)$"), lambda m: LeaseExpired(int(m[1]))),
    (re.compile(r"^Duplicate job with key: (.*)$", re.S), lambda m: DuplicateJob(m[1])),
    (re.compile(r"^Cron job not found$"), lambda m: CronNotFound()),
    (re.compile(r"^Authentication required(?:: (.*))?$", re.S),
     lambda m: AuthenticationRequired(m[1])),
    (re.compile(r"^Invalid token$"), lambda m: InvalidToken()),
    (
        re.compile(r"^(Payload|Result|Message|Error) too large: (\d+) bytes \(max (\d+)\)$"),
        lambda m: PayloadTooLarge(int(m[2]), int(m[3]), m[1]),
    ),
    (re.compile(r"^Limit reached: (.*)$", re.S), lambda m: LimitReached(m[1])),
    (re.compile(r"^Queue full: memory and disk budget spent$"), lambda m: QueueFull()),
    (re.compile(r"^Rate limited$"), lambda m: RateLimited()),
    (re.compile(r"^Storage failed: (.*)$", re.S), lambda m: StorageFailed(m[1])),
    (re.compile(r"^MOVED (\d+)$"), lambda m: Moved(int(m[1]))),
    (re.compile(r"^MOVED (\d+) NOTPRIMARY ?(\S*)$"), lambda m: Moved(int(m[1]), m[2])),
    (re.compile(r"^TRYAGAIN$"), lambda m: TryAgain()),
    (re.compile(r"^Unavailable: gateway draining, request not executed"),
     lambda m: GatewayDraining()),
    (re.compile(r"^Unavailable: (.*)$", re.S), lambda m: Unavailable(m[1])),
    (re.compile(r"^Internal: (.*)$", re.S), lambda m: InternalError(m[1])),
]


def error_from_text(text: str) -> ShardqError:
    """Map a wire error text back to its exception class (ShardqError if unknown)."""
    for pattern, build in _PATTERNS:
        match = pattern.match(text)
        if match:
            return build(match)
    return ShardqError(text)
