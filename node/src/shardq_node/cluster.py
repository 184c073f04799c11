"""A node in a cluster: which slots it owns, and the internal commands of slot moves.

The node keeps the newest topology it was given (persisted as
``topology.json`` in its data directory) and answers ``MOVED <epoch>`` for a
slot it does not own and ``TRYAGAIN`` for a slot it is moving away. A node
that was never given a topology owns every slot (standalone).

In a topology with shards (DESIGN §9) the node serves the slots of its shard only
while it is the shard's primary; a follower answers ``MOVED <epoch> NOTPRIMARY
<primary>``. The role itself (primary, follower, learner) is ``replication.py``'s.

Internal commands need the cluster token (``--cluster-token``), never a client
token: a node with client tokens and no cluster token refuses them all, and only
a node with no token of either kind (an open node, trusting its network) runs
them for anyone.

  SETTOPOLOGY {topology}   adopt a newer topology (older epochs are ignored)
  EXPORT {slots}           the slots' whole state as records (blob payloads inline)
  IMPORT {slots, records}  replace the slots' state with these records, durably
  DROPSLOTS {slots}        forget the slots (after the new owner has them)
  STATUS                   role, term, log position, followers' lag (the controller's probe)
  FENCE {term}             promise never to follow a primary of an older term; answers the
                           last (term, LSN) of this log (the controller's election)
  FOLLOW {shard, term, primary}   a primary starts streaming its log on this connection
  HANDOFF {to}             a planned switchover: refuse writes with TRYAGAIN until the
                           controller moves the primary to ``to`` ("" = resume)

Must not: decide anything about moves; the coordinator (shardq_operator.rebalance) does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from shardq.errors import AuthenticationRequired, InvalidRequest, Moved, TryAgain, Unavailable
from shardq.wire import commands as C
from shardq.wire import protocol as P
from shardq.wire.slots import SLOTS, SlotCache
from shardq.wire.topology import Topology
from shardq_server.auth import Auth

from . import records as R
from . import replication as RP
from . import slotmove
from .jobs import BlobRef
from .wal import decode, frame

if TYPE_CHECKING:
    from .commands import Answer, Caller
    from .engine import Engine
    from .membership import Membership
    from .payloads import Payloads
    from .settings import NodeSettings
    from .storage import Storage

log = logging.getLogger("shardq_node.cluster")

OWNED = 1
FROZEN = 2
FOLLOWING = 3  # a slot of this node's shard while another member is its primary

#: How each command names its slot (shardq.wire.commands): by "queue", by "id", by "ids".
QUEUE_COMMANDS = C.QUEUE_ROUTED
ID_COMMANDS = C.ID_ROUTED
IDS_COMMANDS = C.IDS_ROUTED
INTERNAL = C.INTERNAL
#: Internal commands a client token may run too: they only read.
READ_BY_CLIENTS = frozenset({"STATUS"})
#: What a node that is not its shard's primary still answers itself.
NOT_PRIMARY_OK = C.FOLLOWER_OK
#: What a primary handing its role over still answers (nothing it must confirm).
HANDOFF_OK = NOT_PRIMARY_OK | C.READ_ONLY


def check_slots(req: P.Request) -> list[int]:
    v = req.get("slots")
    if type(v) is not list or not v:
        raise InvalidRequest("field 'slots' must be a non-empty array of slot numbers")
    for s in v:
        if type(s) is not int or not 0 <= s < SLOTS:
            raise InvalidRequest(f"field 'slots' holds {s!r}: slots are 0 to {SLOTS - 1}")
    return sorted(set(v))


class ClusterHost(Protocol):
    """What ownership and the internal commands need of their node (the runtime is one)."""

    @property
    def settings(self) -> NodeSettings: ...

    @property
    def replication(self) -> RP.Replication: ...

    @property
    def membership(self) -> Membership: ...

    @property
    def engine(self) -> Engine: ...

    @property
    def log(self) -> Any: ...

    @property
    def storage(self) -> Storage | None: ...

    @property
    def payloads(self) -> Payloads: ...

    def after_batch(self) -> None: ...

    def topology_changed(self) -> None: ...


class Cluster:
    def __init__(self, node: ClusterHost) -> None:
        self.node = node
        self.name = node.settings.name
        self.topology: Topology | None = None
        self.state = bytearray([OWNED]) * SLOTS
        self.standalone = True
        data_dir = node.settings.storage.data_dir
        self.path = os.path.join(data_dir, "topology.json") if data_dir else None
        token = node.settings.cluster_token
        #: AUTH: the client tokens, and the cluster token that also runs internal commands
        self.auth = Auth(node.settings.tokens, token)
        #: Neither client nor cluster tokens: every caller may run internal commands.
        self.open = self.auth.open
        #: the token this node uses with its peers (a primary with its followers)
        self.token = token
        #: the slot of a queue name (remembered for the names seen lately)
        self.slot_of_queue: Callable[[str], int] = SlotCache().slot_of


    def load(self) -> None:
        if self.path and os.path.exists(self.path):
            with open(self.path, "rb") as f:
                self._adopt(Topology.from_wire(orjson.loads(f.read())))

    # -- roles (DESIGN §9) ------------------------------------------------------------------------

    def my_shard(self) -> tuple[str, Any] | None:
        topo = self.topology
        return topo.shard_of_node(self.name) if topo is not None and topo.shards else None

    def replicated_member(self) -> bool:
        found = self.my_shard()
        return found is not None and len(found[1].members) + len(found[1].learners) > 1

    def take_role(self) -> None:
        """Tell replication what the topology makes this node. A member of a replicated shard
        leads a term once only: restarted, it never leads the term it led before (it may have
        lost records its followers hold at the same positions); the controller sees it and
        gives the shard a new term."""
        repl = self.node.replication
        topo = self.topology
        if topo is None or not topo.shards:
            repl.set_role(RP.STANDALONE, "", None)
            return
        found = self.my_shard()
        if found is None:
            repl.set_role(RP.NONE, "", None)
            return
        name, shard = found
        if shard.primary == self.name:
            single = len(shard.members) == 1 and not shard.learners
            leading = repl.role == RP.PRIMARY and repl.term == shard.term
            if single or leading or shard.term > self.node.membership.led_term:
                repl.set_role(RP.PRIMARY, name, shard)
            else:
                repl.set_role(RP.NONE, name, shard)
        elif self.name in shard.learners:
            repl.set_role(RP.LEARNER, name, shard)
        else:
            repl.set_role(RP.FOLLOWER, name, shard)
        self._adopt(topo)

    # -- ownership ----------------------------------------------------------------------------

    def _adopt(self, topo: Topology) -> None:
        self.topology = topo
        self.standalone = False
        me = self.name
        serving = True
        if topo.shards:
            found = topo.shard_of_node(me)
            me = found[0] if found is not None else ""
            serving = self.node.replication.role == RP.PRIMARY
        state = bytearray(SLOTS)
        for s, owner in enumerate(topo.owners):
            if owner == me and me:
                state[s] = OWNED if serving else FOLLOWING
        for s, move in topo.moving.items():
            if move.get("from") == me and state[s] == OWNED:
                state[s] = FROZEN
        self.state = state

    def check(self, cmd: str, req: P.Request) -> None:
        """Raise Moved/TryAgain if this node may not serve ``cmd`` now."""
        if self.standalone:
            return
        repl = self.node.replication
        if repl.role is not RP.STANDALONE:
            self._check_role(repl, cmd)
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

    def _check_role(self, repl: RP.Replication, cmd: str) -> None:
        if repl.role is RP.PRIMARY:
            if repl.handing_off and cmd not in HANDOFF_OK:
                raise TryAgain()
            if (repl.no_quorum_since is not None and cmd not in NOT_PRIMARY_OK
                    and repl.quorum_lost_for() > self.node.settings.failure_timeout):
                raise Unavailable(f"shard {repl.shard_name} has no quorum")
            return
        if cmd not in NOT_PRIMARY_OK:
            raise self._moved()

    def _moved(self) -> Moved:
        epoch = self.topology.epoch if self.topology else 0
        if self.topology is not None and self.topology.shards:
            return Moved(epoch, self.node.replication.primary)
        return Moved(epoch)

    def _check_slot(self, slot: int) -> None:
        st = self.state[slot]
        if st == OWNED:
            return
        if st == FROZEN:
            raise TryAgain()
        if st == FOLLOWING:
            raise self._moved()
        raise Moved(self.topology.epoch if self.topology else 0)

    def serves(self, slot: int) -> bool:
        return self.state[slot] == OWNED

    def check_internal(self, cmd: str, caller: Caller) -> None:
        """Raise AuthenticationRequired unless ``caller`` may run the internal ``cmd``.
        ``STATUS`` only reads (role, term, lag): any authenticated client may (a gateway's
        dashboard shows it with a client token)."""
        if self.open or getattr(caller, "cluster", False):
            return
        if cmd in READ_BY_CLIENTS and caller.authed:
            return
        if not self.auth.cluster:
            raise AuthenticationRequired(
                f"{cmd} is an internal command and this node has client tokens but no "
                "cluster token (--cluster-token), so it runs no internal command")
        raise AuthenticationRequired(f"{cmd} is an internal command: AUTH with the cluster token")

    # -- internal commands ----------------------------------------------------------------------

    def handlers(self) -> dict[str, Callable[[P.Request, Caller], Answer]]:
        """The internal commands of the command table, each this class's method of its name
        (``import_`` for IMPORT)."""
        return {name: getattr(self, handler_name(name)) for name in INTERNAL}

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
            self.topology = topo
            self.take_role()
            self._adopt(topo)
            self.node.topology_changed()
        return {"ok": True, "epoch": max(topo.epoch, current)}

    # -- replication (replication.py) -----------------------------------------------------------

    def status(self, req: P.Request, caller: Caller) -> Answer:
        return {"ok": True, **self.node.replication.status()}

    def handoff(self, req: P.Request, caller: Caller) -> Answer:
        """HANDOFF {to}: stop taking writes for a planned switchover ("" resumes them)."""
        target = req.get("to")
        if type(target) is not str:
            raise InvalidRequest("field 'to' must be a member's name (\"\" to resume)")
        repl = self.node.replication
        if repl.role != RP.PRIMARY:
            raise self._moved()
        repl.handing_off = bool(target)
        if not target:
            self.node.after_batch()
        return {"ok": True, "seq": self.node.log.seq}

    def fence(self, req: P.Request, caller: Caller) -> Answer:
        """FENCE {term}: refuse older terms from now on; answer this log's last (term, LSN)."""
        term = P.check_id(req, "term")
        node = self.node
        repl = node.replication
        node.membership.fence(term)
        if repl.role == RP.PRIMARY and repl.term < term:
            repl.set_role(RP.NONE, repl.shard_name, repl.shard)  # deposed: stop confirming
            self._adopt(self.topology) if self.topology is not None else None
            node.topology_changed()
        if repl.upstream is not None and repl.upstream.term < term:
            repl.upstream.close()
            repl.upstream = None
        node.log.flush_now() if node.storage is not None else None
        return {"ok": True, "term": node.membership.fenced_term,
                "last_term": node.engine.last_term, "lsn": node.log.seq,
                "storage_id": node.membership.storage_id, "voter": repl.voter}

    def follow(self, req: P.Request, caller: Caller) -> Answer:
        """FOLLOW {shard, term, primary}: the primary of ``term`` streams its log here."""
        term = P.check_id(req, "term")
        primary = P.check_str(req, "primary", 256)
        node = self.node
        repl = node.replication
        if node.storage is None:
            raise InvalidRequest("a node without a data directory cannot follow a primary")
        if term < node.membership.fenced_term:
            repl.fence_refusals += 1
            raise InvalidRequest(f"term {term} is older than the term "
                                 f"{node.membership.fenced_term} this node promised")
        node.membership.fence(term)
        if repl.role == RP.PRIMARY:
            if repl.term >= term:
                raise InvalidRequest(f"this node is the primary of term {repl.term}")
            repl.set_role(RP.FOLLOWER, repl.shard_name, repl.shard)
            if self.topology is not None:
                self._adopt(self.topology)
            node.topology_changed()
        if repl.upstream is not None:
            repl.upstream.close()
        repl.primary = primary
        node.log.flush_now()
        start = getattr(caller, "start_stream", None)
        if start is None:
            raise InvalidRequest("FOLLOW needs a TCP connection")
        repl.upstream = start(term, primary)
        return {"ok": True, "lsn": node.log.seq, "durable": node.log.durable,
                "base": node.storage.retained_from() - 1,
                "terms": [list(t) for t in node.engine.terms],
                "storage_id": node.membership.storage_id}

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

    def _writable(self) -> None:
        if not self.node.replication.writable:
            raise self._moved()

    def export(self, req: P.Request, caller: Caller) -> Answer:
        self._writable()
        slots = check_slots(req)
        engine = self.node.engine
        out = []
        for rec in slotmove.export(engine, slots):
            if rec[0] == R.JOB and rec[3][18]:  # a blob payload travels inline
                row = list(rec[3])
                row[1] = self.node.payloads.read_blob(row[0])
                row[18] = 0
                rec = (rec[0], rec[1], rec[2], row)
            out.append(rec)
        return {"ok": True, "records": orjson.Fragment(orjson.dumps(out, default=_raw_json))}

    def import_(self, req: P.Request, caller: Caller) -> Answer:
        self._writable()
        slots = check_slots(req)
        recs = req.get("records")
        if type(recs) is not list:
            raise InvalidRequest("field 'records' must be an array of records")
        engine = self.node.engine
        allowed = {R.SLOT, R.QUEUE, R.JOB, R.CJOBS, R.FINISHED, R.CRON, R.WATCH}
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
        self._writable()
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


def handler_name(cmd: str) -> str:
    name = cmd.lower()
    return name + "_" if name in ("import",) else name


_missing = sorted(n for n in INTERNAL if not hasattr(Cluster, handler_name(n)))
if _missing:  # a row of the command table without its handler: fail at import, not at run time
    raise ImportError(f"internal commands without a handler in Cluster: {_missing}")
