"""``GET /shards``: each replicated shard with every member's role and replication lag.

The web dashboard's Nodes panel shows this when the topology has shards (DESIGN §9). The
gateway asks every member and learner for ``STATUS`` (the controller's probe: role, term,
log position; on a primary each follower link's lag), each on a connection of its own
(``probe_timeout``), so a slow or dead node neither holds the answer up nor counts as
an upstream error of the routing links; requests that arrive while a round of probes
runs (several dashboards open) share its answer. ``shard_rows`` merges the topology with the
answers: a member's role is what it says itself; its lag and whether it is in sync are
what its shard's primary says about it. A member that did not answer has ``role: null``
and the reason in ``error``.

Must not: route requests, or change the topology.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from shardq.connection import Connection
from shardq.errors import ShardqError
from shardq.wire.topology import Topology

Status = dict[str, Any]


class StatusProbe:
    """STATUS of nodes by address, over connections kept between calls."""

    def __init__(self, token: str | None, timeout: float = 1.0) -> None:
        self.token = token
        self.timeout = timeout
        self._conns: dict[str, Connection] = {}
        self._round: asyncio.Task[list[dict[str, Any]]] | None = None

    async def status(self, address: str) -> Status | str:
        """The node's STATUS answer, or why there is none."""
        conn = self._conns.get(address)
        try:
            if conn is None or conn.closed:
                conn = self._conns[address] = await Connection(address, self.token).open(
                    self.timeout)
            return await asyncio.wait_for(conn.call({"cmd": "STATUS"}), self.timeout)
        except (ShardqError, OSError, TimeoutError) as exc:
            dead = self._conns.pop(address, None)
            if dead is not None:
                await dead.close()
            if isinstance(exc, TimeoutError):
                return f"no answer within {self.timeout:g}s"
            return str(exc) or type(exc).__name__

    async def shards(self, topo: Topology) -> list[dict[str, Any]]:
        """Every shard of ``topo`` with its members' status (shard_rows)."""
        if self._round is None or self._round.done():
            self._round = asyncio.get_running_loop().create_task(self._ask_all(topo))
        return await asyncio.shield(self._round)

    async def _ask_all(self, topo: Topology) -> list[dict[str, Any]]:
        names = [n for shard in topo.shards.values() for n in [*shard.members, *shard.learners]]
        addresses = {n.name: n.tcp for n in topo.nodes}
        found = await asyncio.gather(*(self.status(addresses[n]) for n in names
                                       if n in addresses))
        statuses = dict(zip([n for n in names if n in addresses], found, strict=True))
        for gone in set(self._conns) - set(addresses.values()):
            with contextlib.suppress(Exception):
                await self._conns.pop(gone).close()
        return shard_rows(topo, statuses)

    async def close(self) -> None:
        if self._round is not None:
            self._round.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._round
        for conn in self._conns.values():
            await conn.close()
        self._conns.clear()


def shard_rows(topo: Topology, statuses: dict[str, Status | str]) -> list[dict[str, Any]]:
    """One object per shard (by name): the topology's view and each node's, merged."""
    slots: dict[str, int] = {}
    for owner in topo.owners:
        slots[owner] = slots.get(owner, 0) + 1
    nodes = {n.name: n for n in topo.nodes}
    out = []
    for name, shard in sorted(topo.shards.items()):
        primary = statuses.get(shard.primary) if shard.primary else None
        leading = (isinstance(primary, dict) and primary.get("role") == "primary"
                   and primary.get("term") == shard.term)
        links = {f["name"]: f for f in primary.get("followers", [])} \
            if isinstance(primary, dict) and leading else {}
        members = []
        for member in [*shard.members, *shard.learners]:
            status = statuses.get(member, "not asked: the topology has no address for it")
            info = nodes.get(member)
            row: dict[str, Any] = {
                "name": member, "tcp": info.tcp if info else "", "http": info.http if info else "",
                "voter": member in shard.members, "role": None, "term": None, "lsn": None,
                "error": None, "in_sync": None, "lag_records": None, "lag_seconds": None,
            }
            if isinstance(status, dict):
                row.update(role=status.get("role"), term=status.get("term"),
                           lsn=status.get("lsn"))
            else:
                row["error"] = status
            if member == shard.primary and leading:
                row.update(in_sync=True, lag_records=0, lag_seconds=0.0)
            elif member in links:
                link = links[member]
                row.update(in_sync=bool(link.get("live")), lag_records=link.get("lag_records"),
                           lag_seconds=link.get("lag_seconds"))
            elif leading:
                row["in_sync"] = False  # the primary has no link to it
            members.append(row)
        out.append({
            "name": name, "term": shard.term, "primary": shard.primary, "state": shard.state,
            "slots": slots.get(name, 0), "members": len(shard.members),
            "primary_answered": leading,
            "members_in_sync": primary.get("members_in_sync") if isinstance(primary, dict)
            and leading else None,
            "quorum_lost_seconds": primary.get("quorum_lost_s") if isinstance(primary, dict)
            and leading else None,
            "nodes": members,
        })
    return out
