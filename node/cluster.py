"""A node in a cluster: which slots it owns, and the internal commands of slot moves.

The node keeps the newest topology it was given (persisted as
``topology.json`` in its data directory) and answers ``MOVED <epoch>`` for a
slot it does not own and ``TRYAGAIN`` for a slot it is moving away. A node
that was never given a topology owns every slot (standalone).

Internal commands need the cluster token (``--cluster-token``), never a client
token: a node with client tokens and no cluster token refuses them all, and only
a node with no token of either kind (an open node, trusting its network) runs
them for anyone.

  SETTOPOLOGY {topology}   adopt a newer topology (older epochs are ignored)
  EXPORT {slots}           the slots' whole state as records (blob payloads inline)
  IMPORT {slots, records}  replace the slots' state with these records, durably
  DROPSLOTS {slots}        forget the slots (after the new owner has them)

Must not: decide anything about moves; the coordinator (operator/rebalance.py) does.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from shardq import protocol as P
from shardq.errors import AuthenticationRequired, InvalidRequest, Moved, TryAgain
from shardq.slots import SLOTS, slot_of
from shardq.topology import Topology

from . import records as R
from . import slotmove
from .jobs import BlobRef
from .wal import decode, frame

if TYPE_CHECKING:
    from .commands import Answer, Caller
    from .runtime import Node

log = logging.getLogger("shardq.node.cluster")

OWNED = 1
FROZEN = 2

#: How each command names its slot: by "queue", by "id", by "ids", or not at all.
QUEUE_COMMANDS = frozenset({
    "PUSH", "PUSHB", "PULL", "PULLB", "DLQ", "RETRYDLQ", "PAUSE", "RESUME", "RATELIMIT",
    "RATELIMITCLEAR", "SETCONCURRENCY", "CLEARCONCURRENCY", "CRON",
})
ID_COMMANDS = frozenset({
    "ACK", "FAIL", "GETRESULT", "CANCEL", "PROGRESS", "GETPROGRESS", "GETJOB", "TOUCH",
})
IDS_COMMANDS = frozenset({"ACKB", "RELEASE"})
INTERNAL = frozenset({"SETTOPOLOGY", "EXPORT", "IMPORT", "DROPSLOTS", "WATCH", "PARENTEND"})


def check_slots(req: P.Request) -> list[int]:
    v = req.get("slots")
    if type(v) is not list or not v:
        raise InvalidRequest("field 'slots' must be a non-empty array of slot numbers")
    for s in v:
        if type(s) is not int or not 0 <= s < SLOTS:
            raise InvalidRequest(f"field 'slots' holds {s!r}: slots are 0 to {SLOTS - 1}")
    return sorted(set(v))


class Cluster:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.name = node.settings.name
        self.topology: Topology | None = None
        self.state = bytearray([OWNED]) * SLOTS
        self.standalone = True
        data_dir = node.settings.storage.data_dir
        self.path = os.path.join(data_dir, "topology.json") if data_dir else None
        token = node.settings.cluster_token
        self.tokens: tuple[str, ...] = (token,) if token else ()
        #: Neither client nor cluster tokens: every caller may run internal commands.
        self.open = not token and not node.settings.tokens
        self._slot_cache: dict[str, int] = {}

    def load(self) -> None:
        if self.path and os.path.exists(self.path):
            with open(self.path, "rb") as f:
                self._adopt(Topology.from_wire(orjson.loads(f.read())))

    # -- ownership ----------------------------------------------------------------------------

    def _adopt(self, topo: Topology) -> None:
        self.topology = topo
        self.standalone = False
        state = bytearray(SLOTS)
        for s, owner in enumerate(topo.owners):
            if owner == self.name:
                state[s] = OWNED
        for s, move in topo.moving.items():
            if move.get("from") == self.name and state[s] == OWNED:
                state[s] = FROZEN
        self.state = state

    def slot_of_queue(self, queue: str) -> int:
        cache = self._slot_cache
        slot = cache.get(queue)
        if slot is None:
            if len(cache) > 100_000:
                cache.clear()
            slot = cache[queue] = slot_of(queue)
        return slot

    def check(self, cmd: str, req: P.Request) -> None:
        """Raise Moved/TryAgain if this node may not serve ``cmd`` now."""
        if self.standalone:
            return
        if cmd in QUEUE_COMMANDS:
            queue = req.get("queue")
            if type(queue) is str:
                self._check_slot(self.slot_of_queue(queue))
        elif cmd in ID_COMMANDS:
            job_id = req.get("id")
            if type(job_id) is int:
                self._check_slot(job_id % SLOTS)
        elif cmd in IDS_COMMANDS:
            ids = req.get("ids")
            if type(ids) is list:
                for job_id in ids:
                    if type(job_id) is int:
                        self._check_slot(job_id % SLOTS)

    def _check_slot(self, slot: int) -> None:
        st = self.state[slot]
        if st == OWNED:
            return
        if st == FROZEN:
            raise TryAgain()
        raise Moved(self.topology.epoch if self.topology else 0)

    def serves(self, slot: int) -> bool:
        return self.state[slot] == OWNED

    def check_internal(self, cmd: str, caller: Caller) -> None:
        """Raise AuthenticationRequired unless ``caller`` may run the internal ``cmd``."""
        if self.open or getattr(caller, "cluster", False):
            return
        if not self.tokens:
            raise AuthenticationRequired(
                f"{cmd} is an internal command and this node has client tokens but no "
                "cluster token (--cluster-token), so it runs no internal command")
        raise AuthenticationRequired(f"{cmd} is an internal command: AUTH with the cluster token")

    def authenticate(self, token: str) -> bool:
        given = token.encode()
        ok = False
        for known in self.tokens:
            ok |= hmac.compare_digest(given, known.encode())
        return ok

    # -- internal commands ----------------------------------------------------------------------

    def handlers(self) -> dict[str, Callable[[P.Request, Caller], Answer]]:
        return {
            "SETTOPOLOGY": self.settopology, "EXPORT": self.export, "IMPORT": self.import_,
            "DROPSLOTS": self.dropslots, "WATCH": self.watch, "PARENTEND": self.parentend,
        }

    def settopology(self, req: P.Request, caller: Caller) -> Answer:
        raw = req.get("topology")
        if type(raw) is not dict:
            raise InvalidRequest("field 'topology' must be an object")
        try:
            topo = Topology.from_wire(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequest(f"topology does not parse: {exc}") from None
        current = self.topology.epoch if self.topology else 0
        if topo.epoch > current:
            self._persist(topo)
            self._adopt(topo)
            self.node.topology_changed()
        return {"ok": True, "epoch": max(topo.epoch, current)}

    def _persist(self, topo: Topology) -> None:
        if self.path is None:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(topo.wire()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def export(self, req: P.Request, caller: Caller) -> Answer:
        slots = check_slots(req)
        engine = self.node.engine
        out = []
        for rec in slotmove.export(engine, slots):
            if rec[0] == R.JOB and rec[3][18]:  # a blob payload travels inline
                row = list(rec[3])
                row[1] = self.node.read_blob(row[0])
                row[18] = 0
                rec = (rec[0], rec[1], rec[2], row)
            out.append(rec)
        return {"ok": True, "records": orjson.Fragment(orjson.dumps(out, default=_raw_json))}

    def import_(self, req: P.Request, caller: Caller) -> Answer:
        slots = check_slots(req)
        recs = req.get("records")
        if type(recs) is not list:
            raise InvalidRequest("field 'records' must be an array of records")
        engine = self.node.engine
        allowed = {R.SLOT, R.QUEUE, R.JOB, R.FINISHED, R.CRON, R.WATCH}
        decoded = []
        for rec in recs:
            if type(rec) is not list or not rec or rec[0] not in allowed:
                raise InvalidRequest(f"record {str(rec)[:80]} cannot be imported")
            decoded.append(_payloads_to_bytes(rec))
        engine.log_apply((R.DROP, engine.clock(), slots))  # a repeated import starts clean
        for rec in decoded:
            engine.log_apply(tuple(rec))
        engine.deps.rebuild()
        return {"ok": True, "records": len(decoded)}

    def watch(self, req: P.Request, caller: Caller) -> Answer:
        """WATCH {parent, child}: the parent's state; kept watched for the child if pending."""
        parent, child = P.check_id(req, "parent"), P.check_id(req, "child")
        self._check_slot(parent % SLOTS)
        return {"ok": True, "state": self.node.engine.watch_parent(parent, child)}

    def parentend(self, req: P.Request, caller: Caller) -> Answer:
        """PARENTEND {parent, child, state}: a parent of a child here ended elsewhere."""
        parent, child = P.check_id(req, "parent"), P.check_id(req, "child")
        state = P.check_str(req, "state", 32)
        self._check_slot(child % SLOTS)
        self.node.engine.parent_end(parent, child, state)
        return {"ok": True}

    def dropslots(self, req: P.Request, caller: Caller) -> Answer:
        slots = check_slots(req)
        if not self.standalone and any(self.state[s] == OWNED for s in slots):
            raise InvalidRequest("cannot drop slots this node still owns")
        self.node.engine.drop_slots(slots)
        return {"ok": True}


def _raw_json(value: Any) -> Any:
    if type(value) is bytes:
        return orjson.Fragment(value)
    if type(value) is BlobRef:
        raise TypeError("blob payloads must be inlined before export")
    raise TypeError(f"cannot export {type(value).__name__}")


def _payloads_to_bytes(rec: list[Any]) -> list[Any]:
    """Parsed records back to the engine's form: payloads and results as raw JSON bytes."""
    return list(decode(frame(rec)[8:]))
