"""Reads a fault round's history and counts what went wrong (a total-queue checker).

In the spirit of Jepsen's total-queue checker, for a history that ends with the
cluster healed and every queue drained (history.py has the format). Jobs are
followed by their *payload* (each push carries a payload no other push carries), so
a job is recognised whatever id it is given or re-given.

Must be 0:
- **lost**: pushes answered ok whose payload was never delivered;
- **resurrected**: deliveries of a payload whose pull was invoked after an ack of that
  payload had been answered ok (an acknowledged ack came back);
- **duplicate ids**: ids that stand for two different payloads (two pushes answered with
  the same id, or a delivery whose payload is not the one its id was issued for);
- **unexpected**: deliveries of a payload that was never pushed or whose every push was
  refused (``fail``: certainly not applied).

Reported: redeliveries (deliveries past the first of a payload; allowed: a lease that
expired or was lost hands the job out again), pushes of unknown outcome (``info``) and
how many of them were delivered after all, and per fault the unavailability window:
the longest gap between successful operations (any ``ok`` push, pull or ack) on the
fault's queues that overlaps the fault, from the last success before it to the first
after; a fault after which no operation succeeded gets the gap to the end of the
history and ``recovered`` False.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from .history import FAIL, FAULT, INFO, INVOKE, OK, History

MUST_BE_ZERO = ("lost", "resurrected", "duplicate_ids", "unexpected")


@dataclass
class Window:
    kind: str
    target: str
    start: float
    end: float
    queues: list[str]
    seconds: float  # the longest gap between successes on ``queues`` around the fault
    recovered: bool  # some operation on ``queues`` succeeded after the fault ended


@dataclass
class Report:
    pushes: Counter[str] = field(default_factory=Counter)  # ok / fail / info
    pulls: Counter[str] = field(default_factory=Counter)
    acks: Counter[str] = field(default_factory=Counter)
    deliveries: int = 0
    delivered: int = 0  # distinct payloads delivered
    redeliveries: int = 0
    indeterminate_delivered: int = 0
    lost: list[str] = field(default_factory=list)
    resurrected: list[dict[str, Any]] = field(default_factory=list)
    duplicate_ids: list[dict[str, Any]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)

    @property
    def indeterminate(self) -> int:
        return self.pushes[INFO]

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in MUST_BE_ZERO}

    @property
    def ok(self) -> bool:
        return not any(self.counts().values())

    def summary(self) -> str:
        counts = ", ".join(f"{name.replace('_', ' ')} {n}" for name, n in self.counts().items())
        windows = "; ".join(
            f"{w.kind}@{w.target} {w.seconds:.2f} s" + ("" if w.recovered else " (not recovered)")
            for w in self.windows) or "none"
        return (
            f"{counts}; pushes ok {self.pushes[OK]}, failed {self.pushes[FAIL]}, "
            f"indeterminate {self.indeterminate} (delivered {self.indeterminate_delivered}); "
            f"deliveries {self.deliveries} of {self.delivered} payloads, redeliveries "
            f"{self.redeliveries}; acks ok {self.acks[OK]}, failed {self.acks[FAIL]}, "
            f"indeterminate {self.acks[INFO]}; unavailability: {windows}"
        )

    def examples(self, n: int = 3) -> str:
        """A few of each anomaly, for a failure message."""
        parts = []
        for name in MUST_BE_ZERO:
            items = getattr(self, name)
            if items:
                parts.append(f"{name}: {items[:n]}")
        return "; ".join(parts)


def _operations(history: History) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(invoke, completion or None) in invocation order."""
    invokes: dict[int, dict[str, Any]] = {}
    completions: dict[int, dict[str, Any]] = {}
    for entry in history.entries:
        if entry["type"] == INVOKE:
            invokes[entry["index"]] = entry
        elif entry["type"] in (OK, FAIL, INFO):
            completions[entry["index"]] = entry
    return [(invokes[i], completions.get(i)) for i in sorted(invokes)]


def check(history: History) -> Report:
    report = Report()
    push_outcomes: dict[str, set[str]] = defaultdict(set)
    ids: dict[int, set[str]] = defaultdict(set)
    first_ack_ok: dict[str, float] = {}
    deliveries: list[tuple[str, int, float]] = []  # payload, id, time the pull was invoked
    successes: list[tuple[float, str]] = []  # (completion time, queue) of every ok operation

    for invoke, done in _operations(history):
        f = invoke["f"]
        kind = done["type"] if done is not None else INFO
        {"push": report.pushes, "pull": report.pulls, "ack": report.acks}[f][kind] += 1
        if done is not None and kind == OK and invoke.get("queue") is not None:
            successes.append((done["time"], invoke["queue"]))
        if f == "push":
            payload = invoke["value"]["payload"]
            push_outcomes[payload].add(kind)
            if kind == OK:
                ids[done["value"]["id"]].add(payload)  # type: ignore[index]
        elif f == "pull" and kind == OK:
            for job in done["value"]["jobs"]:  # type: ignore[index]
                deliveries.append((job["payload"], job["id"], invoke["time"]))
                ids[job["id"]].add(job["payload"])
        elif f == "ack" and kind == OK:
            payload = invoke["value"]["payload"]
            at = done["time"]  # type: ignore[index]
            if payload not in first_ack_ok or at < first_ack_ok[payload]:
                first_ack_ok[payload] = at

    per_payload = Counter(payload for payload, _, _ in deliveries)
    report.deliveries = len(deliveries)
    report.delivered = len(per_payload)
    report.redeliveries = sum(n - 1 for n in per_payload.values())
    for payload, job_id, pulled_at in deliveries:
        acked_at = first_ack_ok.get(payload)
        if acked_at is not None and pulled_at > acked_at:
            report.resurrected.append({"payload": payload, "id": job_id, "acked_at": acked_at,
                                       "pulled_at": pulled_at})
    for payload, outcomes in push_outcomes.items():
        if OK in outcomes and payload not in per_payload:
            report.lost.append(payload)
        if OK not in outcomes and INFO in outcomes and payload in per_payload:
            report.indeterminate_delivered += 1
    report.unexpected = sorted(
        p for p in per_payload if not ({OK, INFO} & push_outcomes.get(p, set())))
    report.duplicate_ids = [{"id": i, "payloads": sorted(ps)} for i, ps in sorted(ids.items())
                            if len(ps) > 1]
    report.lost.sort()
    end = history.entries[-1]["time"] if history.entries else 0.0
    report.windows = _windows(history, successes, end)
    return report


def _windows(history: History, successes: list[tuple[float, str]], end: float) -> list[Window]:
    started: dict[tuple[str, str], dict[str, Any]] = {}
    windows = []
    for entry in history.entries:
        if entry["type"] != FAULT:
            continue
        value = entry["value"]
        key = (value["kind"], value["target"])
        if entry["f"] == "start":
            started[key] = entry
            continue
        begin = started.pop(key, None)
        if begin is None:
            continue
        queues = set(value["queues"]) | set(begin["value"]["queues"])
        times = sorted(t for t, q in successes if q in queues)
        windows.append(unavailability(value["kind"], value["target"], begin["time"],
                                      entry["time"], sorted(queues), times, end))
    return windows


def unavailability(kind: str, target: str, start: float, stop: float, queues: list[str],
                   times: list[float], end: float) -> Window:
    """The longest gap between consecutive success ``times`` that overlaps [start, stop]."""
    before = [t for t in times if t <= start]
    prev = before[-1] if before else start
    longest = 0.0
    recovered = False
    for t in times:
        if t <= prev:
            continue
        if prev > stop:
            recovered = True
            break
        longest = max(longest, t - prev)
        prev = t
    else:
        if prev > stop:
            recovered = True
        else:
            longest = max(longest, end - prev)
    return Window(kind, target, start, stop, queues, round(longest, 6), recovered)
