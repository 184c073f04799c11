"""The cluster topology: which node owns each of the 1024 slots, and what is moving.

``{epoch, nodes: [{name, tcp, http, state}], owners: [1024 names], moving: {slot: {from, to}}}``.
One writer (the coordinator) changes it, every change bumps ``epoch``, and every
node keeps the newest copy it was given. Where each slot *should* live is the
coordinator's business (``shardq_operator.ring``); this module only reads the
map. Shared by every process; no I/O, no dependency beyond the standard library.
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
class Topology:
    epoch: int = 0
    nodes: list[NodeInfo] = field(default_factory=list)
    owners: list[str] = field(default_factory=lambda: [""] * SLOTS)
    moving: dict[int, dict[str, str]] = field(default_factory=dict)

    # -- lookups -------------------------------------------------------------------------------

    def node(self, name: str) -> NodeInfo | None:
        for n in self.nodes:
            if n.name == name:
                return n
        return None

    def owner_of_slot(self, slot: int) -> str:
        return self.owners[slot]

    def owner_of_queue(self, queue: str) -> str:
        return self.owners[slot_of(queue)]

    def owner_of_id(self, job_id: int) -> str:
        return self.owners[slot_of_id(job_id)]

    def slots_of(self, name: str) -> list[int]:
        return [s for s, owner in enumerate(self.owners) if owner == name]

    def active_names(self) -> list[str]:
        return [n.name for n in self.nodes if n.state == ACTIVE]

    # -- wire ------------------------------------------------------------------------------------

    def wire(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "nodes": [n.wire() for n in self.nodes],
            "owners": list(self.owners),
            "moving": {str(s): dict(m) for s, m in sorted(self.moving.items())},
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
        )

    def copy(self) -> Topology:
        return Topology.from_wire(self.wire())
