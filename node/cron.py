"""Cron schedules: MagicQueue's ``*/N`` (every N seconds) and 5/6-field cron expressions.

A six-field expression has seconds first (``*/10 * * * * *``), as in Quartz and
node-cron. Times are UTC. The table only computes times; the engine decides
when to fire (one CRONFIRE record per tick, see records.py) so a cron fires
exactly once per tick and, after downtime, once for all the ticks it missed.
No I/O here.
"""

from __future__ import annotations

from typing import Any

from shardq.errors import InvalidRequest

MIN_INTERVAL_S = 1
MAX_INTERVAL_S = 10 * 365 * 24 * 3600


def _interval_s(schedule: str) -> int | None:
    if not schedule.startswith("*/"):
        return None
    digits = schedule[2:]
    if not (digits.isascii() and digits.isdigit()):
        return None
    return int(digits)


def validate(schedule: str) -> None:
    """Raise InvalidRequest naming what is wrong with ``schedule``."""
    seconds = _interval_s(schedule)
    if seconds is not None:
        if not MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S:
            raise InvalidRequest(
                f"schedule '{schedule}': interval must be {MIN_INTERVAL_S} to {MAX_INTERVAL_S} s"
            )
        return
    fields = schedule.split()
    if len(fields) not in (5, 6):
        raise InvalidRequest(
            f"schedule '{schedule}' must be '*/N' (seconds) or a cron expression of 5 or 6 fields"
        )
    from croniter import croniter

    if not croniter.is_valid(schedule, second_at_beginning=len(fields) == 6):
        raise InvalidRequest(f"schedule '{schedule}' is not a valid cron expression")


def next_after(schedule: str, now_ms: int) -> int:
    """The first tick strictly after ``now_ms`` (ms)."""
    seconds = _interval_s(schedule)
    if seconds is not None:
        return now_ms + seconds * 1000
    from croniter import croniter

    six = len(schedule.split()) == 6
    it = croniter(schedule, now_ms / 1000, second_at_beginning=six)
    at: float = it.get_next(float)
    return round(at * 1000)


class CronTable:
    """Named crons with their next run time. Entries are plain dicts (see records.CRON)."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}

    def first_run(self, schedule: str, now: int) -> int:
        validate(schedule)
        try:
            return next_after(schedule, now)
        except (ValueError, ArithmeticError) as exc:  # croniter: e.g. "0 0 31 2 *" never comes
            raise InvalidRequest(f"schedule '{schedule}' never runs ({exc})") from None

    def next_run(self, schedule: str, now: int) -> int:
        return next_after(schedule, now)

    def set(self, name: str, spec: dict[str, Any]) -> None:
        self.entries[name] = dict(spec)

    def due(self, now: int) -> list[tuple[str, dict[str, Any]]]:
        return [(n, e) for n, e in self.entries.items() if e["next_run"] <= now]

    def next_due(self) -> int | None:
        if not self.entries:
            return None
        return min(int(e["next_run"]) for e in self.entries.values())
