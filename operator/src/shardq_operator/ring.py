"""Where every slot should live: ketama (``uhashring``) over the active nodes' names.

Adding or removing one node moves only about 1/N of the slots. The coordinator
(the rebalancer, the operator, ``shardq up``) plans with this; routers and
nodes only read the topology it publishes (``shardq.wire.topology``).
Must not: talk to anyone; plans only.
"""

from __future__ import annotations

from uhashring import HashRing

from shardq.wire.slots import SLOTS
from shardq.wire.topology import NodeInfo, Topology

#: Points per node on the ring; more points, more even shares (ketama's default is 40).
VNODES = 160


def ring_owners(names: list[str]) -> list[str]:
    """The owner of each slot on a ketama ring over ``names`` (empty: no owners)."""
    if not names:
        return [""] * SLOTS
    ring = HashRing(nodes={n: {"vnodes": VNODES} for n in names}, hash_fn="ketama")
    return [str(ring.get_node(f"slot-{s}")) for s in range(SLOTS)]


def target_owners(topo: Topology) -> list[str]:
    """Where every slot of ``topo`` should live: the ring over its active nodes."""
    return ring_owners(topo.active_names())


def pending_moves(topo: Topology) -> list[tuple[int, str, str]]:
    """(slot, from, to) for every slot whose owner is not its target yet."""
    target = target_owners(topo)
    return [(s, topo.owners[s], t) for s, t in enumerate(target) if topo.owners[s] != t]


def initial(nodes: list[NodeInfo]) -> Topology:
    """Epoch 1: every slot on its ring owner."""
    topo = Topology(epoch=1, nodes=list(nodes))
    topo.owners = target_owners(topo)
    return topo
