"""Job dependencies: children in ``waiting-children`` until every parent completed.

Two kinds of link, so that slot moves never split one:

* **Same slot** (parent and child in one slot, which always move together): the
  ``dependents`` index, resolved inside the record that ends the parent.
* **Across slots** (maybe across nodes): a *watch*. The child's node asks the
  parent's owner to ``WATCH`` the parent for the child (a WATCH record there,
  kept with the parent's slot, exported with it); when the parent ends, its
  owner tells the child's owner (a ``PARENTEND`` record there, routed by the
  child's id, so it follows the child's slot) and forgets the watch (NOTIFIED).
  Both messages are retried until acknowledged and are harmless to repeat.
  ``to_watch`` and ``outbox`` hold what still has to be said; both are rebuilt
  from the state after a restart or an import, so nothing is lost in between.

A parent that dies, is cancelled or expires sends the child (and its own
children) to the DLQ with an error that names the parent. No I/O here: the
runtime (shardq_node.runtime) carries the messages.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any

from shardq.errors import InvalidRequest
from shardq.wire.job import State
from shardq.wire.slots import SLOTS

from . import records as R
from . import transitions as T
from .jobs import CANCELLED, COMPLETED, DEAD, EXPIRED, WAITING, WAITING_CHILDREN, Job

if TYPE_CHECKING:
    from .engine import Engine

#: How a parent's end reads in its children's DLQ error ("Parent job 7 failed").
OUTCOME = {DEAD: "failed", CANCELLED: "was cancelled", EXPIRED: "expired",
           "unknown": "not found"}
_FINAL = {s.value: s for s in (COMPLETED, DEAD, CANCELLED, EXPIRED)}


class Dependencies:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.children: dict[int, set[int]] = {}  # waiting-children: child -> pending parents
        self.dependents: dict[int, list[int]] = {}  # same-slot parent -> children
        self.watchers: dict[int, set[int]] = {}  # parent here -> children in other slots
        self.to_watch: set[tuple[int, int]] = set()  # (parent, child): WATCH still to send
        self.outbox: dict[tuple[int, int], str] = {}  # (parent, child) -> final state to tell

    # -- push ---------------------------------------------------------------------------------

    def check_parent(self, parent: int, child_slot: int) -> None:
        """Refuse a push whose same-slot parent this node never issued (other slots are
        checked where they live: by the gateway, and by the WATCH answer)."""
        if parent % SLOTS != child_slot:
            return
        e = self.engine
        if parent in e.finished or e.has_job(parent):
            return
        seq = parent // SLOTS
        if 0 < seq <= e.seqs[child_slot]:
            return  # finished before the retention window: counts as completed
        raise InvalidRequest(f"depends_on: job {parent} not found")

    def wait_for_parents(self, job: Job, parents: Iterable[int], now: int) -> bool:
        """Put ``job`` in waiting-children if some parent is unfinished; True if it went
        anywhere but ready (waiting-children, or the DLQ because a parent already died)."""
        e = self.engine
        pending = set()
        slot = job.queue.slot
        for parent in parents:
            if parent % SLOTS != slot:
                pending.add(parent)  # decided by its owner: WATCH
                continue
            pjob = e.jobs.get(parent)
            if pjob is not None or e.has_job(parent):  # live (compact ones are waiting)
                if pjob is not None and pjob.state is DEAD:
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
            if parent % SLOTS == slot:
                self.dependents.setdefault(parent, []).append(job.id)
            else:
                self.to_watch.add((parent, job.id))
        return True

    def _kill(self, job: Job, now: int, parent: int, state: Any) -> None:
        job.own_opts().error = f"Parent job {parent} {OUTCOME[state]}"
        T.to_dlq(self.engine, job, now)

    def forget(self, job_id: int) -> None:
        """A waiting child left by other means (cancelled, expired)."""
        pending = self.children.pop(job_id, None)
        for parent in pending or ():
            self.to_watch.discard((parent, job_id))

    # -- a parent ends ---------------------------------------------------------------------------

    def parent_ended(self, parent: int, now: int, state: Any) -> None:
        """A parent here finished in ``state``: same-slot children now, watchers by message."""
        children = self.watchers.get(parent)
        if children:
            for child in children:
                self.outbox[(parent, child)] = state.value
        if parent in self.dependents:
            self._release(self.dependents.pop(parent), parent, now, state)

    def _release(self, child_ids: Iterable[int], parent: int, now: int, state: Any) -> None:
        """Release or kill ``child_ids`` for ``parent``'s end, and their children in turn."""
        e = self.engine
        todo = [(parent, state, list(child_ids))]
        while todo:
            pid, pstate, kids = todo.pop()
            for child_id in kids:
                pending = self.children.get(child_id)
                child = e.jobs.get(child_id)
                if pending is None or child is None or child.state is not WAITING_CHILDREN:
                    continue
                if pstate is COMPLETED:
                    pending.discard(pid)
                    if pending:
                        continue
                self.forget(child_id)
                child.queue.n_children -= 1
                if pstate is COMPLETED:
                    T.make_ready(e, child, now)
                    continue
                child.state = WAITING  # a live job, so to_dlq can take it
                self._kill(child, now, pid, pstate)
                children = self.watchers.get(child_id)
                for grandchild in children or ():
                    self.outbox[(child_id, grandchild)] = DEAD.value
                todo.append((child_id, DEAD, self.dependents.pop(child_id, [])))

    # -- records of the watch protocol ----------------------------------------------------------

    def apply_watch(self, rec: R.Record) -> None:
        """WATCH [18, t, parent, child]: the parent's owner keeps a watch for the child."""
        _, _now, parent, child = rec
        self.watchers.setdefault(parent, set()).add(child)

    def apply_notified(self, rec: R.Record) -> None:
        """NOTIFIED [19, t, parent, child]: the child's owner has the parent's end."""
        _, _now, parent, child = rec
        children = self.watchers.get(parent)
        if children is not None:
            children.discard(child)
            if not children:
                del self.watchers[parent]
        self.outbox.pop((parent, child), None)

    def apply_parent_end(self, rec: R.Record) -> None:
        """PARENTEND [17, t, parent, child, state]: a parent elsewhere ended."""
        _, now, parent, child, state = rec
        self.to_watch.discard((parent, child))
        final = _FINAL.get(state, "unknown")
        self._release([child], parent, now, final)

    def state_of(self, parent: int) -> str:
        """What a WATCH answers about a parent on this node."""
        e = self.engine
        job = e.jobs.get(parent)
        if job is not None:
            return DEAD.value if job.state is DEAD else "pending"
        if e.has_job(parent):  # a compact job: waiting
            return "pending"
        done = e.finished.get(parent)
        if done is not None:
            return str(done.state.value)
        seq, slot = divmod(parent, SLOTS)
        return COMPLETED.value if 0 < seq <= e.seqs[slot] else "unknown"

    # -- after a restart or an import --------------------------------------------------------------

    def rebuild(self) -> None:
        """What still has to be said, recomputed from the state."""
        self.to_watch = {
            (parent, child) for child, pending in self.children.items() for parent in pending
            if parent % SLOTS != child % SLOTS
        }
        self.outbox = {}
        for parent, children in self.watchers.items():
            state = self.state_of(parent)
            if state != "pending":
                for child in children:
                    self.outbox[(parent, child)] = state

    def drop(self, slots: Collection[int]) -> None:
        """Forget the watch state of ``slots`` (they moved away)."""
        for parent in [p for p in self.watchers if p % SLOTS in slots]:
            del self.watchers[parent]
        self.to_watch = {(p, c) for p, c in self.to_watch if c % SLOTS not in slots}
        self.outbox = {k: v for k, v in self.outbox.items() if k[0] % SLOTS not in slots}


def settle(
    engine: Engine, here: Callable[[int], bool]
) -> tuple[list[tuple[int, int]], list[tuple[int, int, str]]]:
    """Carry the watch messages whose other end is in a slot ``here`` serves; return the
    rest, for the runtime to send to the other nodes: (WATCHes, PARENTENDs)."""
    deps = engine.deps
    progress = True
    while progress:
        progress = False
        for parent, child in list(deps.to_watch):
            if here(parent % SLOTS):
                state = engine.watch_parent(parent, child)
                deps.to_watch.discard((parent, child))
                if state != "pending":
                    engine.parent_end(parent, child, state)
                progress = True
        for (parent, child), state in list(deps.outbox.items()):
            if here(child % SLOTS):
                engine.parent_end(parent, child, state)
                engine.notified(parent, child)
                progress = True
    watches = [pc for pc in deps.to_watch if not here(pc[0] % SLOTS)]
    ends = [(p, c, s) for (p, c), s in deps.outbox.items() if not here(c % SLOTS)]
    return watches, ends


__all__ = ["OUTCOME", "Dependencies", "State", "settle"]
