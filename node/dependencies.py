"""Job dependencies: children in ``waiting-children`` until every parent completed.

A parent's end is one call, ``parent_ended(parent, now, state)``: completion
releases a child whose other parents are done; death, cancellation or expiry
sends the child (and, in turn, its own children) to the DLQ with an error that
names the parent. On one node the engine calls it when a parent finishes; in a
cluster a parent on another node reaches it as a message (docs/dependencies.md).
No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from shardq.errors import InvalidRequest
from shardq.slots import SLOTS

from .jobs import CANCELLED, COMPLETED, DEAD, EXPIRED, WAITING, WAITING_CHILDREN, Job

if TYPE_CHECKING:
    from .engine import Engine

#: How a parent's end reads in its children's DLQ error ("Parent job 7 failed").
OUTCOME = {DEAD: "failed", CANCELLED: "was cancelled", EXPIRED: "expired"}


class Dependencies:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.children: dict[int, set[int]] = {}  # waiting-children: child -> pending parents
        self.dependents: dict[int, list[int]] = {}  # parent -> children waiting on it

    def check_parent(self, parent: int) -> None:
        """Refuse a push whose parent this node has never issued."""
        e = self.engine
        if parent in e.jobs or parent in e.finished:
            return
        seq, slot = divmod(parent, SLOTS)
        if 0 < seq <= e.seqs[slot]:
            return  # finished before the retention window: counts as completed
        raise InvalidRequest(f"depends_on: job {parent} not found")

    def wait_for_parents(self, job: Job, parents: Iterable[int], now: int) -> bool:
        """Put ``job`` in waiting-children if some parent is unfinished; True if it went
        anywhere but ready (waiting-children, or the DLQ because a parent already died)."""
        e = self.engine
        pending = set()
        for parent in parents:
            pjob = e.jobs.get(parent)
            if pjob is not None:
                if pjob.state is DEAD:
                    self._kill(job, now, parent, DEAD)
                    return True
                pending.add(parent)
                continue
            done = e.finished.get(parent)
            if done is not None and done.state is not COMPLETED:
                self._kill(job, now, parent, done.state)
                return True
        if not pending:
            return False
        job.state = WAITING_CHILDREN
        job.queue.n_children += 1
        self.children[job.id] = pending
        for parent in pending:
            self.dependents.setdefault(parent, []).append(job.id)
        return True

    def _kill(self, job: Job, now: int, parent: int, state: Any) -> None:
        job.own_opts().error = f"Parent job {parent} {OUTCOME[state]}"
        self.engine.to_dlq(job, now)

    def forget(self, job_id: int) -> None:
        """A waiting child left by other means (cancelled, expired)."""
        self.children.pop(job_id, None)

    def parent_ended(self, parent: int, now: int, state: Any) -> None:
        """A parent finished in ``state``: release or kill the children waiting on it."""
        if parent not in self.dependents:
            return
        e = self.engine
        todo = [(parent, state)]
        while todo:
            pid, pstate = todo.pop()
            for child_id in self.dependents.pop(pid, ()):
                pending = self.children.get(child_id)
                child = e.jobs.get(child_id)
                if pending is None or child is None or child.state is not WAITING_CHILDREN:
                    continue
                if pstate is COMPLETED:
                    pending.discard(pid)
                    if pending:
                        continue
                del self.children[child_id]
                child.queue.n_children -= 1
                if pstate is COMPLETED:
                    e.make_ready(child, now)
                else:
                    child.state = WAITING  # a live job, so to_dlq can take it
                    self._kill(child, now, pid, pstate)
                    todo.append((child_id, DEAD))
