"""The history of a fault round: every client operation and every fault, with times.

In the spirit of Jepsen's histories: an operation is an ``invoke`` entry, then one
completion entry with the same ``index``: ``ok`` (it happened), ``fail`` (it
certainly did not) or ``info`` (unknown: a timeout, a lost connection, an answer
that does not say). An invoke that never got a completion is ``info`` too.

Operations (``f``), with their ``value``:

- ``push``  invoke ``{"payload": P}``; ok ``{"payload": P, "id": ID}``
- ``pull``  invoke ``{}``; ok ``{"jobs": [{"id", "payload", "lease"}, ...]}`` (each job
  in an ok pull is one *delivery*; an empty list is a successful pull of nothing)
- ``ack``   invoke and completions ``{"id", "payload", "lease"}``

Faults are entries of ``type`` ``fault`` with ``f`` ``start`` or ``end`` and ``value``
``{"kind", "target", "queues"}`` (the queues the fault affects); a ``meta`` entry
describes the round. Times are seconds since the history began (monotonic clock).
Written and read as JSON lines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

INVOKE = "invoke"
OK = "ok"
FAIL = "fail"
INFO = "info"
FAULT = "fault"
META = "meta"

#: Refusals that mean the node did not apply the request: a push answered so is ``fail``.
#: Everything else (timeouts, lost connections, ``Unavailable`` in general, unknown texts)
#: is ``info``: the request may have been applied before the answer was lost.
#: ``no quorum`` is here because DESIGN §9 says a shard without a majority *refuses* writes:
#: the checker then holds the cluster to it (a delivered push that failed is ``unexpected``).
DEFINITE_REFUSALS = (
    "Invalid:", "Duplicate job with key:", "Payload too large:", "Queue full:",
    "Rate limited", "Storage failed:", "Authentication required", "Invalid token",
    "Job ", "Lease expired for job ",
)
DEFINITE_UNAVAILABLE = ("has no quorum",)


#: Said of a write the node ran but could not confirm: it may or may not have happened.
MAYBE_APPLIED = "may have been applied"


def outcome_of_error(text: str) -> str:
    """``fail`` when an error text says the request was not applied, else ``info``."""
    if text.startswith(DEFINITE_REFUSALS):
        return FAIL
    if MAYBE_APPLIED in text:
        return INFO
    if text.startswith("Unavailable:") and any(s in text for s in DEFINITE_UNAVAILABLE):
        return FAIL
    return INFO


@dataclass
class History:
    entries: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    _next: int = 0
    _open: dict[int, dict[str, Any]] = field(default_factory=dict)

    def now(self) -> float:
        return round(time.monotonic() - self.started, 6)

    # -- operations -----------------------------------------------------------------------------

    def invoke(self, process: str, f: str, queue: str | None, value: dict[str, Any]) -> int:
        index = self._next
        self._next += 1
        entry = {"index": index, "type": INVOKE, "f": f, "process": process, "time": self.now(),
                 "queue": queue, "value": value}
        self.entries.append(entry)
        self._open[index] = entry
        return index

    def complete(self, index: int, kind: str, value: dict[str, Any] | None = None,
                 error: str | None = None) -> None:
        invoke = self._open.pop(index)
        entry: dict[str, Any] = {
            "index": index, "type": kind, "f": invoke["f"], "process": invoke["process"],
            "time": self.now(), "queue": invoke["queue"],
            "value": invoke["value"] if value is None else value,
        }
        if error is not None:
            entry["error"] = error
        self.entries.append(entry)

    def ok(self, index: int, value: dict[str, Any] | None = None) -> None:
        self.complete(index, OK, value)

    def failed(self, index: int, error: str) -> None:
        """Complete with the outcome the error text implies (``fail`` or ``info``)."""
        self.complete(index, outcome_of_error(error), error=error)

    def info(self, index: int, error: str) -> None:
        self.complete(index, INFO, error=error)

    def close_open(self, why: str = "no answer before the round ended") -> int:
        """Complete every operation still in flight as ``info``; returns how many."""
        open_ops = list(self._open)
        for index in open_ops:
            self.info(index, why)
        return len(open_ops)

    # -- faults and metadata --------------------------------------------------------------------

    def fault(self, f: str, kind: str, target: str, queues: list[str],
              **more: Any) -> None:
        self.entries.append({"type": FAULT, "f": f, "time": self.now(),
                             "value": {"kind": kind, "target": target, "queues": queues,
                                       **more}})

    def meta(self, **value: Any) -> None:
        self.entries.append({"type": META, "time": self.now(), "value": value})

    # -- files ----------------------------------------------------------------------------------

    def dump(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for entry in self.entries:
                f.write(orjson.dumps(entry) + b"\n")
        return path

    @classmethod
    def load(cls, path: Path) -> History:
        with open(path, "rb") as f:
            return cls([orjson.loads(line) for line in f if line.strip()])
