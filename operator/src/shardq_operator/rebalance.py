"""The coordinator's slot moves: bring the topology to its target, one batch at a time.

Used by ``shardq up``/``shardq scale`` locally, ``shardq rebalance``, and the
Kubernetes operator. The coordinator is the topology's only writer. Moving a
batch of slots from A to B (DESIGN §5), each step recorded in the topology's
``moving`` map and published to every node before the next, so a coordinator
that dies anywhere resumes from the topology the nodes hold:

  1. freeze:  ``moving[s] = {from: A, to: B}`` (A answers TRYAGAIN for s)
  2. copy:    A ``EXPORT``s the slots, B ``IMPORT``s them (durably; a repeat starts clean)
  3. switch:  ``owners[s] = B`` (published to B first; A now answers MOVED)
  4. drop:    A ``DROPSLOTS`` (forgets them), then the ``moving`` entries go
              (with the next batch's freeze, to save a round of publishing)

Every step is idempotent: redoing 2 replaces what B has, redoing 4 drops nothing.

With replicated shards (DESIGN §9) the owners are shards and each step talks to the
shard's primary of the moment; the topology's truth is the store (``store.py``), which
the failover controller writes too: every publish is a compare-and-swap that keeps the
controller's part (terms, primaries, members) and writes the rebalancer's (owners,
moves, shards' states), and a step whose primary changed under it is tried again on the
new one.
Must not: hold state of its own beyond one call; the nodes' topology (or the store) is the
record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from shardq.connection import Connection
from shardq.errors import ShardqConnectionError, ShardqError
from shardq.wire.topology import ACTIVE, LEAVING, NodeInfo, Topology

from .controller import open_bounded
from .ring import initial, pending_moves
from .store import TopologyStore, update

log = logging.getLogger("shardq.rebalance")

Progress = Callable[[int, int], None]


class RebalanceError(ShardqError):
    pass


class Rebalancer:
    def __init__(
        self,
        token: str | None = None,
        batch: int = 4,
        on_progress: Progress | None = None,
        retry_for: float = 60.0,
        store: TopologyStore | None = None,
    ) -> None:
        self.token = token
        self.store = store
        self.batch = batch
        self.on_progress = on_progress or (lambda done, total: None)
        self.retry_for = retry_for
        self._conns: dict[str, Connection] = {}

    async def close(self) -> None:
        for conn in self._conns.values():
            await conn.close()
        self._conns.clear()

    # -- talking to nodes -------------------------------------------------------------------------

    async def call(self, address: str, req: dict[str, Any]) -> dict[str, Any]:
        """One request to a node, retried (with a fresh connection) until ``retry_for``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_for
        delay = 0.05
        while True:
            try:
                conn = self._conns.get(address)
                if conn is None or conn.closed:
                    conn = self._conns[address] = await open_bounded(address, self.token, 5)
                return await asyncio.wait_for(conn.call(req), 120)
            except (TimeoutError, ShardqConnectionError, OSError) as exc:
                self._conns.pop(address, None)
                if loop.time() + delay > deadline:
                    raise RebalanceError(f"node at {address} unreachable: {exc}") from None
                log.warning("node at %s: %s; retrying", address, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def current(self, addresses: Iterable[str]) -> Topology | None:
        """The newest topology any of ``addresses`` holds (None if none has one)."""
        return (await self._newest(addresses))[0]

    async def _newest(self, addresses: Iterable[str]) -> tuple[Topology | None, set[str]]:
        """The newest topology any of ``addresses`` holds, and the addresses that did not
        answer."""
        best: Topology | None = None
        silent: set[str] = set()
        for address in addresses:
            try:
                answer = await asyncio.wait_for(self.call(address, {"cmd": "TOPOLOGY"}), 10)
            except (TimeoutError, RebalanceError) as exc:
                log.warning("no topology from %s: %s", address, exc)
                silent.add(address)
                continue
            raw = answer.get("topology")
            if raw is not None:
                topo = Topology.from_wire(raw)
                if best is None or topo.epoch > best.epoch:
                    best = topo
        return best, silent

    async def publish(self, topo: Topology, first: str | None = None) -> None:
        """SETTOPOLOGY on every node (``first``'s nodes before the others); with a store, the
        store first (compare-and-swap, keeping what the controller wrote meanwhile)."""
        if self.store is not None:
            await self._store(topo)
        req = {"cmd": "SETTOPOLOGY", "topology": topo.wire()}
        nodes = list(topo.nodes)
        if first is not None and topo.shards and first in topo.shards:
            sh = topo.shards[first]
            head = [n for n in nodes if n.name in sh.members or n.name in sh.learners]
            nodes = [n for n in nodes if n not in head]
            for n in head:
                await self.call(n.tcp, req)
        elif first is not None:
            head = [n for n in nodes if n.name == first]
            nodes = [n for n in nodes if n.name != first]
            for n in head:
                await self.call(n.tcp, req)
        await asyncio.gather(*(self.call(n.tcp, req) for n in nodes))

    async def _store(self, topo: Topology) -> None:
        """Write the rebalancer's fields of ``topo`` into the store; take the controller's."""
        assert self.store is not None
        mine = topo.copy()

        def merge(fresh: Topology) -> bool:
            fresh.owners = list(mine.owners)
            fresh.moving = {s: dict(m) for s, m in mine.moving.items()}
            fresh.nodes = list(mine.nodes)
            shards = {}
            for name, sh in mine.shards.items():
                have = fresh.shards.get(name)
                if have is not None:
                    have.state = sh.state
                    shards[name] = have
                else:
                    shards[name] = sh
            fresh.shards = shards
            fresh.epoch = max(fresh.epoch, mine.epoch - 1)
            return True

        written = await update(self.store, merge)
        assert written is not None
        topo.epoch, topo.shards = written.epoch, written.shards

    async def call_owner(self, owner: str, req: dict[str, Any], topo: Topology
                         ) -> dict[str, Any]:
        """``req`` to the node serving ``owner`` now: a shard's primary changes under a
        failover, so a refusal (MOVED, TRYAGAIN) or a silent node is tried again on the
        primary the store names, until ``retry_for``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_for
        while True:
            if self.store is not None:
                _, fresh = await self.store.read()
                if fresh is not None:
                    topo.shards = fresh.shards
                    topo.nodes = fresh.nodes if not topo.nodes else topo.nodes
            node = topo.primary_node(owner)
            answer: dict[str, Any] = {"ok": False, "error": f"{owner} has no primary"}
            if node is not None:
                try:
                    answer = await self.call(node.tcp, req)
                except ShardqError as exc:  # RebalanceError, and the refusals call raises
                    answer = {"ok": False, "error": str(exc)}
            error = str(answer.get("error", ""))
            # every step of a move may be repeated (EXPORT reads, IMPORT starts clean,
            # DROPSLOTS of what is gone drops nothing): a shard in a failover or without its
            # quorum for a moment is asked again, until retry_for
            if answer.get("ok") or not (error.startswith(("MOVED", "TRYAGAIN", "Unavailable"))
                                        or "has no primary" in error or "unreachable" in error):
                return answer
            if loop.time() > deadline:
                return answer
            await asyncio.sleep(0.1)

    # -- converging -------------------------------------------------------------------------------

    async def converge(self, wanted: list[NodeInfo], seeds: Iterable[str] = (),
                       known: Iterable[NodeInfo] = ()) -> Topology:
        """Make ``wanted`` the active nodes and move every slot to its ring owner.

        ``known``: the current addresses of other nodes that still exist (leaving ones of a
        scale-down whose pods moved), so slots are fetched from where they are now."""
        addresses = [n.tcp for n in wanted] + list(seeds)
        topo, silent = await self._newest(dict.fromkeys(addresses))
        if topo is None:
            if silent:  # a topology may live on a node that did not answer: never start over
                raise RebalanceError(
                    f"no topology found and {len(silent)} node(s) did not answer "
                    f"({', '.join(sorted(silent))}); not starting a new one")
            topo = initial(wanted)
            await self.publish(topo)
            self.on_progress(0, 0)
            return topo
        topo = await self._readdress(topo, known)
        topo = await self.resume(topo)
        topo = await self._set_members(topo, wanted)
        return await self._finish(topo, await self._move_all(topo))

    async def _move_all(self, topo: Topology) -> list[int]:
        """Every pending move, batch by batch; the slots whose ``moving`` entries can go."""
        moves = pending_moves(topo)
        done = 0
        self.on_progress(0, len(moves))
        clear: list[int] = []
        for src, dst, slots in _batches(moves, self.batch):
            clear = await self.move(topo, slots, src, dst, clear)
            done += len(slots)
            self.on_progress(done, len(moves))
        return clear

    async def converge_shards(self, wanted: list[str]) -> Topology:
        """Replicated shards (the store's topology): make ``wanted`` the shards that keep
        slots, move every slot to its ring owner, then drop the shards that left (their
        nodes with them). The shards themselves are the caller's to create."""
        assert self.store is not None
        _, topo = await self.store.read()
        if topo is None:
            raise RebalanceError("the store holds no topology")
        topo = await self.resume(topo)
        changed = False
        for name, shard in topo.shards.items():
            state = ACTIVE if name in wanted else LEAVING
            if shard.state != state:
                shard.state = state
                changed = True
        if changed:
            topo.epoch += 1
            await self.publish(topo)
        clear = await self._move_all(topo)
        for slot in clear:
            topo.moving.pop(slot, None)
        gone = [name for name, sh in topo.shards.items() if sh.state == LEAVING]
        if clear or gone:
            members = {m for name in gone for m in [*topo.shards[name].members,
                                                    *topo.shards[name].learners]}
            for name in gone:
                del topo.shards[name]
            topo.nodes = [n for n in topo.nodes if n.name not in members]
            topo.epoch += 1
            await self.publish(topo)
        return topo

    async def _readdress(self, topo: Topology, known: Iterable[NodeInfo]) -> Topology:
        """New addresses of nodes that are not wanted any more but still hold slots (a leaving
        pod recreated mid scale-down): their state stays, their address follows the pod."""
        changed = False
        for info in known:
            have = topo.node(info.name)
            if have is not None and (have.tcp != info.tcp or have.http != info.http):
                have.tcp, have.http = info.tcp, info.http
                changed = True
        if changed:
            topo.epoch += 1
            await self.publish(topo)
        return topo

    async def _set_members(self, topo: Topology, wanted: list[NodeInfo]) -> Topology:
        names = {n.name for n in wanted}
        changed = False
        for node in topo.nodes:
            if node.name not in names and node.state != LEAVING:
                node.state = LEAVING
                changed = True
        for want in wanted:
            have = topo.node(want.name)
            if have is None:
                topo.nodes.append(NodeInfo(want.name, want.tcp, want.http, ACTIVE))
                changed = True
            elif have.state != ACTIVE or have.tcp != want.tcp or have.http != want.http:
                have.state, have.tcp, have.http = ACTIVE, want.tcp, want.http
                changed = True
        if changed:
            topo.epoch += 1
            await self.publish(topo)
        return topo

    async def _finish(self, topo: Topology, clear: list[int]) -> Topology:
        for slot in clear:
            topo.moving.pop(slot, None)
        leaving = [n for n in topo.nodes if n.state == LEAVING]
        if clear or leaving:
            topo.nodes = [n for n in topo.nodes if n.state != LEAVING]
            topo.epoch += 1
            await self.publish(topo)
        return topo

    async def move(
        self, topo: Topology, slots: list[int], src: str, dst: str, clear: list[int]
    ) -> list[int]:
        """Move ``slots`` from ``src`` to ``dst``; returns the slots whose entries can go."""
        for slot in clear:  # the previous batch's entries go with this batch's freeze
            topo.moving.pop(slot, None)
        for slot in slots:
            topo.moving[slot] = {"from": src, "to": dst}
        topo.epoch += 1
        await self.publish(topo)
        await self._copy(topo, slots, src, dst)
        await self._switch_and_drop(topo, slots, src, dst)
        return slots

    async def _copy(self, topo: Topology, slots: list[int], src: str, dst: str) -> None:
        if src not in topo.owner_names() or dst not in topo.owner_names():
            raise RebalanceError(f"move of {slots} names an owner not in the topology")
        exported = await self.call_owner(src, {"cmd": "EXPORT", "slots": slots}, topo)
        if not exported.get("ok"):
            raise RebalanceError(f"EXPORT {slots} from {src}: {exported.get('error')}")
        imported = await self.call_owner(dst, {
            "cmd": "IMPORT", "slots": slots, "records": exported["records"],
        }, topo)
        if not imported.get("ok"):
            raise RebalanceError(f"IMPORT {slots} into {dst}: {imported.get('error')}")

    async def _switch_and_drop(
        self, topo: Topology, slots: list[int], src: str, dst: str
    ) -> None:
        for slot in slots:
            topo.owners[slot] = dst
        topo.epoch += 1
        await self.publish(topo, first=dst)
        if src in topo.owner_names():
            dropped = await self.call_owner(src, {"cmd": "DROPSLOTS", "slots": slots}, topo)
            if not dropped.get("ok"):
                raise RebalanceError(f"DROPSLOTS {slots} on {src}: {dropped.get('error')}")

    async def resume(self, topo: Topology) -> Topology:
        """Finish the moves a previous coordinator left in ``moving``."""
        if not topo.moving:
            return topo
        log.info("resuming %d slot moves left by a previous coordinator", len(topo.moving))
        groups: dict[tuple[str, str, bool], list[int]] = {}
        for slot, mv in sorted(topo.moving.items()):
            switched = topo.owners[slot] == mv["to"]
            groups.setdefault((mv["from"], mv["to"], switched), []).append(slot)
        for (src, dst, switched), slots in groups.items():
            if not switched:
                await self._copy(topo, slots, src, dst)
                await self._switch_and_drop(topo, slots, src, dst)
            else:
                await self._switch_and_drop(topo, slots, src, dst)
        topo.moving.clear()
        topo.epoch += 1
        await self.publish(topo)
        return topo


def _batches(moves: list[tuple[int, str, str]], size: int) -> list[tuple[str, str, list[int]]]:
    """Moves grouped by (from, to), cut into batches of ``size`` slots."""
    groups: dict[tuple[str, str], list[int]] = {}
    for slot, src, dst in moves:
        groups.setdefault((src, dst), []).append(slot)
    out = []
    for (src, dst), slots in groups.items():
        for i in range(0, len(slots), size):
            out.append((src, dst, slots[i : i + size]))
    return out
