"""The lease tokens of the jobs a client pulled through the gateway.

The nodes see a gateway's shared connections, not its clients, so the gateway
remembers, per client, the token (the ``started_at`` of the attempt) of every job
it pulled until the client acks, fails, cancels or releases it: a lease-less
ACK/FAIL/PROGRESS/TOUCH/ACKB/RELEASE then carries that token (routes.py), and a
TCP client that leaves gets its jobs sent back with ``RELEASE``, each with its
token, so a lease that expired meanwhile never hands back another worker's later
attempt. The HTTP clients of one gateway are one such holder (docs/decisions.md).

Must not: grow without bound (the oldest are forgotten past ``limit``: they time out
instead).
"""

from __future__ import annotations

from typing import Any

import orjson

#: Leases a client holder remembers (one PULLB's worth): the oldest are forgotten past it.
MAX_LEASES = 100_000


class Leases:
    """Job id -> lease token, for the jobs one client holds."""

    __slots__ = ("limit", "tokens")

    def __init__(self, limit: int = MAX_LEASES) -> None:
        self.tokens: dict[int, int] = {}
        self.limit = limit

    def __bool__(self) -> bool:
        return bool(self.tokens)

    def took(self, answer: bytes) -> None:
        """A pull answered: remember the leased jobs and their tokens."""
        decoded: dict[str, Any] = orjson.loads(answer)
        jobs = decoded.get("jobs")
        if jobs is None:
            job = decoded.get("job")
            jobs = [job] if job is not None else []
        tokens = self.tokens
        for job in jobs:
            if type(job) is dict and type(job.get("id")) is int:
                started = job.get("started_at")
                tokens[job["id"]] = started if type(started) is int and started >= 0 else 0
        while len(tokens) > self.limit:
            del tokens[next(iter(tokens))]

    def get(self, job_id: int) -> int:
        """The token this client holds ``job_id`` with (0, which no attempt has, if none)."""
        return self.tokens.get(job_id, 0)

    def pop(self, job_id: int) -> int:
        """As ``get``, and the job is no longer this client's to hand back."""
        return self.tokens.pop(job_id, 0)

    def settled(self, ids: list[int]) -> list[int]:
        """ACKB or RELEASE: those jobs are no longer this client's; the tokens it held them
        with (0 for a job it holds no lease of)."""
        pop = self.tokens.pop
        return [pop(job_id, 0) for job_id in ids]

    def take_all(self) -> list[tuple[int, int]]:
        """Every (id, token) held, by id; forgotten here."""
        held = sorted(self.tokens.items())
        self.tokens.clear()
        return held
