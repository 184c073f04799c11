"""The cluster topology: which shard owns each of the 1024 slots, and what is moving.

``{epoch, nodes: [{name, tcp, http, state}], owners: [1024 names], moving: {slot: {from, to}},
shards: {name: {term, primary, members, learners, ids, state}}}``.

An owner is a *shard* (DESIGN §9): ``members`` are the node processes holding its copies,
at most one of them ``primary`` in each ``term`` (``""`` while a failover chooses one),
``learners`` catch up without a vote, and ``ids`` names the data directory (storage id)
each of them had when it was counted. A topology without ``shards`` is the single-copy
form: each owner is a node's own name. One writer (the coordinator) changes it, every
change bumps ``epoch``, and every node keeps the newest copy it was given. Where each
slot *should* live is the coordinator's business (``shardq_operator.ring``); this module
only reads the map. Shared by every process; no I/O, no dependency beyond the standard
library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shardq.wire.slots import SLOTS, slot_of, slot_of_id

ACTIVE = "active"
LEAVING = "leaving"


@dataclass
class NodeInfo:
    name: str
    tcp: str  # host:port of its TCP server
    http: str = ""  # host:port of its HTTP server ("" = none)
    state: str = ACTIVE  # active | leaving

    def wire(self) -> dict[str, Any]:
        return {"name": self.name, "tcp": self.tcp, "http": self.http, "state": self.state}


@dataclass
class Shard:
    """One owner of slots with ``R`` copies (DESIGN §9)."""

    members: list[str]
    primary: str = ""
    term: int = 1
    learners: list[str] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)
    state: str = ACTIVE  # active | leaving (a scale-down moves its slots away)

    def majority(self) -> int:
        return len(self.members) // 2 + 1

    def wire(self) -> dict[str, Any]:
        return {
            "term": self.term, "primary": self.primary, "members": list(self.members),
            "learners": list(self.learners), "ids": dict(sorted(self.ids.items())),
            "state": self.state,
        }

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Shard:
        return cls(
            members=[str(m) for m in obj["members"]], primary=str(obj.get("primary") or ""),
            term=int(obj.get("term", 1)), learners=[str(m) for m in obj.get("learners") or ()],
            ids={str(k): str(v) for k, v in (obj.get("ids") or {}).items()},
            state=str(obj.get("state", ACTIVE)),
        )


@dataclass
class Topology:
    epoch: int = 0
    nodes: list[NodeInfo] = field(default_factory=list)
    owners: list[str] = field(default_factory=lambda: [""] * SLOTS)
    moving: dict[int, dict[str, str]] = field(default_factory=dict)
    shards: dict[str, Shard] = field(default_factory=dict)

    # -- lookups -------------------------------------------------------------------------------

    def node(self, name: str) -> NodeInfo | None:
        for n in self.nodes:
            if n.name == name:
                return n
        return None

    def primary_of(self, owner: str) -> str:
        """The node that serves ``owner``'s slots now ("" while its shard has no primary)."""
        if not self.shards:
            return owner
        shard = self.shards.get(owner)
        return shard.primary if shard is not None else ""

    def primary_node(self, owner: str) -> NodeInfo | None:
        name = self.primary_of(owner)
        return self.node(name) if name else None

    def shard_of_node(self, name: str) -> tuple[str, Shard] | None:
        """The shard ``name`` is a member or learner of, with its name."""
        for shard_name, shard in self.shards.items():
            if name in shard.members or name in shard.learners:
                return shard_name, shard
        return None

    def owner_names(self) -> list[str]:
        """Every owner: the shards, or the nodes of a single-copy topology."""
        return list(self.shards) if self.shards else [n.name for n in self.nodes]

    def owner_of_slot(self, slot: int) -> str:
        return self.owners[slot]

    def owner_of_queue(self, queue: str) -> str:
        return self.owners[slot_of(queue)]

    def owner_of_id(self, job_id: int) -> str:
        return self.owners[slot_of_id(job_id)]

    def active_names(self) -> list[str]:
        """The owners that keep slots (the ring's names): shards, or nodes without shards."""
        if self.shards:
            return [name for name, s in self.shards.items() if s.state == ACTIVE]
        return [n.name for n in self.nodes if n.state == ACTIVE]

    # -- wire ------------------------------------------------------------------------------------

    def wire(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "nodes": [n.wire() for n in self.nodes],
            "owners": list(self.owners),
            "moving": {str(s): dict(m) for s, m in sorted(self.moving.items())},
            **({"shards": {name: sh.wire() for name, sh in sorted(self.shards.items())}}
               if self.shards else {}),
        }

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Topology:
        owners = list(obj["owners"])
        if len(owners) != SLOTS:
            raise ValueError(f"topology has {len(owners)} owners, not {SLOTS}")
        return cls(
            epoch=int(obj["epoch"]),
            nodes=[NodeInfo(n["name"], n["tcp"], n.get("http", ""), n.get("state", ACTIVE))
                   for n in obj["nodes"]],
            owners=owners,
            moving={int(s): dict(m) for s, m in (obj.get("moving") or {}).items()},
            shards={str(name): Shard.from_wire(sh)
                    for name, sh in (obj.get("shards") or {}).items()},
        )

    def copy(self) -> Topology:
        return Topology.from_wire(self.wire())
