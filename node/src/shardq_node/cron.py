"""Cron schedules: MagicQueue's ``*/N`` (every N seconds) and 5/6-field cron expressions.

A six-field expression has seconds first (``*/10 * * * * *``), as in Quartz and
node-cron. Times are UTC. The table only computes times; the engine decides
when to fire (one CRONFIRE record per tick, see records.py) so a cron fires
exactly once per tick and, after downtime, once for all the ticks it missed.
No I/O here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shardq.errors import InvalidRequest, LimitReached
from shardq.wire.protocol import JobSpec

from . import records as R

if TYPE_CHECKING:
    from .engine import Engine

MIN_INTERVAL_S = 1
MAX_INTERVAL_S = 10 * 365 * 24 * 3600
#: next_run of a cron whose expression has no further tick
NEVER = 2**62


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


class Crons:
    """The node's crons: named schedules, each with the job it pushes and its next run."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.entries: dict[str, dict[str, Any]] = {}  # name -> CRONSPEC (records.py)
        self.skipped = 0  # ticks that pushed nothing: the memory budget was spent

    def add(self, name: str, queue: str, data: bytes, schedule: str, priority: int) -> None:
        """Create or replace a cron (at most ``max_crons``)."""
        e = self.engine
        now = e.clock()
        limit = e.config.max_crons
        if name not in self.entries and len(self.entries) >= limit:
            raise LimitReached(f"this node holds {limit} crons (max_crons, --max-crons)")
        validate(schedule)
        try:
            next_run = next_after(schedule, now)
        except (ValueError, ArithmeticError) as exc:  # croniter: e.g. "0 0 31 2 *" never comes
            raise InvalidRequest(f"schedule '{schedule}' never runs ({exc})") from None
        spec = {
            "queue": queue, "data": data, "schedule": schedule, "priority": priority,
            "next_run": next_run,
        }
        e.log_apply((R.CRON, now, name, spec))

    def delete(self, name: str) -> bool:
        if name not in self.entries:
            return False
        self.engine.log_apply((R.CRONDEL, self.engine.clock(), name))
        return True

    def apply_set(self, rec: R.Record) -> None:
        _, _now, name, spec = rec
        self.entries[name] = dict(spec)
        self.engine.timers.dirty = True

    def apply_delete(self, rec: R.Record) -> None:
        self.entries.pop(rec[2], None)

    def fire_due(self, now: int) -> None:
        """Fire every cron that is due, once: one record holds the new next run and the job.
        Past the node's memory budget a tick pushes nothing (counted in ``skipped``): a
        cron's jobs cannot spill to disk as a client's pushes do."""
        e = self.engine
        budget = e.memory_budget
        for name, entry in [(n, c) for n, c in self.entries.items() if c["next_run"] <= now]:
            try:
                next_run = next_after(entry["schedule"], now)
            except (ValueError, ArithmeticError):
                next_run = NEVER
            queue, data = entry["queue"], entry["data"]
            rows: list[Any] = []
            if budget is None or e.payload_bytes + len(data) <= budget:
                spec = JobSpec(None, entry["priority"])
                rows = e.job_rows(e.queue(queue), [spec], [data], now)
            else:
                self.skipped += 1
            e.log_apply((R.CRONFIRE, now, name, next_run, queue, rows))

    def apply_fire(self, rec: R.Record) -> None:
        _, now, name, next_run, queue, rows = rec
        entry = self.entries.get(name)
        if entry is not None:
            entry["next_run"] = next_run
        if rows:
            self.engine.apply((R.PUSH, now, queue, rows))

    def next_due(self) -> int | None:
        if not self.entries:
            return None
        return min(int(e["next_run"]) for e in self.entries.values())
