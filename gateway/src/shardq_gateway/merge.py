"""Merging the answers of a cluster-wide read into the one answer a single node would give.

Each function takes ``[(node name, decoded answer), …]`` (one per node, in
topology order) and returns the merged answer without ``reqId``; it raises the
first node's error (``ShardqError``) if any node refused or was unreachable,
so a cluster-wide count is never silently partial.

- STATS: every counter summed.
- METRICS: totals and ``jobs_per_second`` (every number) summed; ``avg_latency_ms`` is the mean
  of the nodes' averages weighted by their ``jobs_per_second`` (each node's
  recent completions), 0.0 when nothing completed; ``queues`` concatenated.
- LISTQUEUES, CRONLIST: concatenated and sorted by name; LISTQUEUES is a page (``after``,
  ``count``, ``next``) like a node's.
- CRONDELETE: ok if any node had the cron, else ``Cron job not found``.

During a slot move a queue (or cron) exists on two nodes for a moment; lists keep
the copy of the node that owns its slot. Counters cannot tell, so STATS and the
METRICS totals may count a moving slot twice for that moment.

Must not: do I/O or keep state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shardq.errors import CronNotFound, error_from_text
from shardq.wire.slots import slot_of

if TYPE_CHECKING:
    from .router import Router

Parts = list[tuple[str, dict[str, Any]]]


def oks(parts: Parts) -> list[tuple[str, dict[str, Any]]]:
    """The answers, or the first refusal raised."""
    for _, answer in parts:
        if answer.get("ok") is not True:
            raise error_from_text(str(answer.get("error")))
    return parts


def stats(parts: Parts, router: Router) -> dict[str, Any]:
    total: dict[str, Any] = {"ok": True}
    for _, answer in oks(parts):
        answer.pop("reqId", None)
        _add_numbers(total, answer)
    return total


def metrics(parts: Parts, router: Router) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    rows: list[tuple[str, dict[str, Any]]] = []
    rate = weighted = 0.0
    for name, answer in oks(parts):
        m = answer.get("metrics") or {}
        jps = float(m.get("jobs_per_second", 0.0))
        rate += jps
        weighted += jps * float(m.get("avg_latency_ms", 0.0))
        rows.extend((name, q) for q in m.get("queues") or [])
        _add_numbers(merged, m)
    merged["avg_latency_ms"] = weighted / rate if rate else 0.0
    merged["queues"] = _owned(rows, router, "name")
    return {"ok": True, "metrics": merged}


def _add_numbers(total: dict[str, Any], more: dict[str, Any]) -> None:
    """Sum the numbers of ``more`` into ``total``; anything else keeps its first value."""
    for key, value in more.items():
        if type(value) in (int, float) and type(total.get(key, 0)) in (int, float):
            total[key] = total.get(key, 0) + value
        else:
            total.setdefault(key, value)


def listqueues(parts: Parts, router: Router, count: int | None = None) -> dict[str, Any]:
    """One page: a node that cut its list (``next``) may hold queues after its cut that
    others listed, so the page ends at the first cut, or after ``count`` queues."""
    rows = [(name, q) for name, answer in oks(parts) for q in answer.get("queues") or []]
    queues = _owned(rows, router, "name")
    cuts = [str(answer["next"]) for _, answer in parts if answer.get("next") is not None]
    more = False
    if cuts:
        cut = min(cuts)
        more = True
        queues = [q for q in queues if str(q.get("name")) <= cut]
    if count is not None and len(queues) > count:
        queues, more = queues[:count], True
    if more and queues:
        return {"ok": True, "queues": queues, "next": queues[-1]["name"]}
    return {"ok": True, "queues": queues}


def cronlist(parts: Parts, router: Router) -> dict[str, Any]:
    rows = [(name, c) for name, answer in oks(parts) for c in answer.get("crons") or []]
    return {"ok": True, "crons": _owned(rows, router, "queue")}


def crondelete(parts: Parts, router: Router) -> dict[str, Any]:
    missing = CronNotFound().text
    first_error: str | None = None
    for _, answer in parts:
        if answer.get("ok") is True:
            return {"ok": True}
        text = str(answer.get("error"))
        if text != missing and first_error is None:
            first_error = text
    if first_error is not None:  # some node could not say whether it had the cron
        raise error_from_text(first_error)
    raise CronNotFound()


def _owned(
    rows: list[tuple[str, dict[str, Any]]], router: Router, queue_field: str
) -> list[dict[str, Any]]:
    """Rows sorted by name; a row found on two nodes (a slot being moved) is kept once,
    from the node that owns the slot of its queue."""
    chosen: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
    for node, row in rows:
        queue = str(row.get(queue_field))
        key = (str(row.get("name")), queue)
        seen = chosen.get(key)
        if seen is None or router.owner_of_slot(slot_of(queue)) == node:
            chosen[key] = (node, row)
    return [chosen[key][1] for key in sorted(chosen)]
