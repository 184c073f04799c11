"""The gateway's view of the cluster: the topology, and which node each slot goes to.

At start the topology is read from the seeds (``{"cmd":"TOPOLOGY"}``, the
highest epoch wins); afterwards it is read again whenever a node answers
``MOVED <epoch>`` with a newer epoch than the gateway's; and, at most once a
second, when a node stops being reachable (the coordinator may have moved its
slots away) or answers ``TRYAGAIN`` (the move's topology may name a new node,
which subscribers then connect to before the move is done). A refresh asks every
known node at once and is done as soon as one has the wanted epoch; concurrent
refreshes share one. ``by_slot`` maps each of the 1024 slots straight to the
``NodeLink`` of its owner, so routing a request is one list lookup.

A single seed without a topology (a standalone node) is taken as the owner of
every slot, at epoch 0.

Must not: forward client requests (inflight.py does), write the topology (the
coordinator is its only writer), or import the node's code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from shardq.errors import ShardqError, Unavailable
from shardq.wire.slots import SLOTS, SlotCache
from shardq.wire.topology import NodeInfo, Topology
from shardq_server.running import Causes

from .metrics import GatewayMetrics
from .settings import GatewaySettings
from .upstream import Flusher, NodeLink, ask

log = logging.getLogger("shardq_gateway.router")

#: Unreachable nodes and TRYAGAIN trigger at most one topology refresh per this many seconds.
DOWN_REFRESH_EVERY = 0.25


class Router:
    def __init__(self, settings: GatewaySettings, flusher: Flusher) -> None:
        self.settings = settings
        self.flusher = flusher
        self.topology = Topology(epoch=-1)
        self.by_slot: list[NodeLink | None] = [None] * SLOTS
        #: The links of the topology's nodes, in its order (fan-out goes to these).
        self.members: list[NodeLink] = []
        self.links: dict[str, NodeLink] = {}  # by address: members and seeds
        self.seeds: list[NodeLink] = []
        #: Called after every topology change (sessions with subscriptions follow new nodes).
        self.listeners: set[Callable[[], None]] = set()
        #: the slot of a queue name (remembered for the names seen lately)
        self.slot_of_queue: Callable[[str], int] = SlotCache().slot_of
        self._refresh: asyncio.Task[None] | None = None
        self._waiters: list[Callable[[], None]] = []
        self._down_refresh_at = 0.0
        #: per slot: its shard has more than one member (a lost primary gets replaced)
        self._replicated = [False] * SLOTS
        #: every node of the topology, primaries and followers (a refresh asks them all)
        self.everyone: list[NodeLink] = []
        self._poller: asyncio.Task[None] | None = None
        self.closing = False
        self.metrics = GatewayMetrics()
        #: unexpected exceptions: one ``Internal: …`` answer each, each cause logged once
        self.causes = Causes(log, "the gateway")

    @property
    def epoch(self) -> int:
        return self.topology.epoch

    def replicated(self, slot: int) -> bool:
        return self._replicated[slot]

    def owner_of_slot(self, slot: int) -> str:
        link = self.by_slot[slot]
        return link.name if link is not None else ""

    # -- links ----------------------------------------------------------------------------------

    def _link(self, address: str, name: str) -> NodeLink:
        link = self.links.get(address)
        if link is None:
            link = self.links[address] = NodeLink(name, address, self.settings, self.flusher)
            link.on_down = self._node_down
            link.on_error = self.metrics.upstream_error
            link.causes = self.causes
        link.name = name
        return link

    def adopt(self, topo: Topology) -> None:
        """Route by ``topo`` from now on (if it is newer than the current one)."""
        if topo.epoch <= self.topology.epoch:
            return
        if self.topology.epoch >= 0:
            self.metrics.refreshes += 1
        names = {n.name: self._link(n.tcp, n.name) for n in topo.nodes}
        primaries = {owner: names.get(topo.primary_of(owner)) for owner in set(topo.owners)}
        self.by_slot = [primaries[owner] for owner in topo.owners]
        if topo.shards:  # cluster-wide reads go to each shard's primary
            self.members = [link for link in primaries.values() if link is not None]
            self._replicated = [len(topo.shards[o].members) > 1 if o in topo.shards else False
                                for o in topo.owners]
        else:
            self.members = list(names.values())
            self._replicated = [False] * SLOTS
        self.everyone = list(names.values())
        self.topology = topo
        keep = {id(link) for link in [*self.everyone, *self.seeds]}
        for address, link in list(self.links.items()):
            if id(link) not in keep:
                del self.links[address]
                link.close()
        log.info("topology epoch %d: %d nodes", topo.epoch, len(topo.nodes))
        for listener in list(self.listeners):
            listener()

    # -- loading --------------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the topology from the seeds, retrying until ``startup_timeout`` passes."""
        self.seeds = [self._link(address, address) for address in self.settings.seeds]
        if not self.seeds:
            raise ShardqError("the gateway needs at least one seed node (--seed host:port)")
        deadline = time.monotonic() + self.settings.startup_timeout
        pause = 0.05
        while True:
            problems = await self._load_once()
            if not problems:
                return
            if time.monotonic() + pause > deadline:
                raise Unavailable("no topology from the seeds: " + "; ".join(problems))
            log.warning("no topology yet (%s); asking again in %.1fs", "; ".join(problems), pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)

    async def _load_once(self) -> list[str]:
        """Ask every seed and adopt the newest topology; what went wrong if none was."""
        found = await asyncio.gather(*(self._topology_of(link) for link in self.seeds),
                                     return_exceptions=True)
        problems: list[str] = []
        standalone: list[NodeLink] = []
        for link, result in zip(self.seeds, found, strict=True):
            if isinstance(result, Topology):
                self.adopt(result)
            elif result is None:
                standalone.append(link)
            else:
                problems.append(str(result) or type(result).__name__)
        if self.epoch >= 1:
            return []
        if standalone and len(self.seeds) == 1:
            link = standalone[0]
            self.adopt(Topology(epoch=0, nodes=[NodeInfo(link.name, link.address)],
                                owners=[link.name] * SLOTS))
            return []
        if len(standalone) > 1:
            problems.append(f"seeds {', '.join(s.address for s in standalone)} are standalone "
                            "nodes (no topology): a gateway fronts one standalone node or a "
                            "cluster")
        return problems

    async def _topology_of(self, link: NodeLink) -> Topology | None:
        """The topology ``link``'s node holds (None: a standalone node); raises if unreachable."""
        try:
            answer = await ask(link, {"cmd": "TOPOLOGY"}, self.settings.connect_timeout)
        except TimeoutError:
            raise Unavailable(f"node {link.name} at {link.address} did not answer TOPOLOGY "
                              f"within {self.settings.connect_timeout:g}s") from None
        if answer.get("ok") is not True:
            raise Unavailable(f"{link.address}: {answer.get('error')}")
        raw = answer.get("topology")
        if raw is None:
            return None
        try:
            return Topology.from_wire(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise Unavailable(f"{link.address} sent a bad topology: {exc}") from None

    # -- refreshing -----------------------------------------------------------------------------

    def refresh(self, want: int, then: Callable[[], None]) -> None:
        """Read the topology again until its epoch is at least ``want``; then call ``then``."""
        if self.epoch >= want:
            then()
            return
        self._waiters.append(then)
        if self._refresh is None:
            self._refresh = asyncio.get_running_loop().create_task(self._refresh_until(want))

    def reread(self, down: NodeLink | None, then: Callable[[], None]) -> bool:
        """Ask the nodes (all but ``down``, which did not answer) for their topology now: it
        may name a new owner, or a new address for ``down`` (a pod that moved); call ``then``
        when that is done. Shares a refresh in flight; at most one per
        ``DOWN_REFRESH_EVERY``. False: none was due."""
        if self._refresh is not None:
            self._waiters.append(then)
            return True
        now = time.monotonic()
        if now < self._down_refresh_at or self.epoch < 1:
            return False
        self._down_refresh_at = now + DOWN_REFRESH_EVERY
        self._waiters.append(then)
        self._refresh = asyncio.get_running_loop().create_task(
            self._refresh_until(self.epoch + 1, down))
        return True

    async def _refresh_until(self, want: int, skip: NodeLink | None = None) -> None:
        try:
            await self._ask_all(want, skip)
        except Exception:  # a refresh must never leave its waiters hanging
            log.exception("topology refresh failed")
        finally:
            self._refresh = None
            waiters, self._waiters = self._waiters, []
            for then in waiters:
                then()

    async def _ask_all(self, want: int, skip: NodeLink | None = None) -> None:
        everyone = [*self.everyone, *self.seeds]
        links = [link for link in {id(link): link for link in everyone}.values()
                 if link is not skip]
        loop = asyncio.get_running_loop()
        pending = {loop.create_task(self._topology_of(link)) for link in links}
        deadline = loop.time() + self.settings.connect_timeout * 2
        try:
            while pending and self.epoch < want:
                done, pending = await asyncio.wait(
                    pending, timeout=max(0.0, deadline - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not done:
                    break
                for task in done:
                    if task.exception() is None:
                        topo = task.result()
                        if topo is not None:
                            self.adopt(topo)
        finally:
            for task in pending:
                task.cancel()

    def _node_down(self, link: NodeLink) -> None:
        """A node is unreachable: the coordinator may have moved its slots, so look again."""
        self.look_again()

    def look_again(self) -> None:
        """Refresh in the background, at most once per ``DOWN_REFRESH_EVERY`` (a node is
        down, or a slot is frozen: the topology of the move may name a node that is new)."""
        self.reread(None, _nothing)

    async def poll(self, every: float) -> None:
        """Look for a newer topology every ``every`` seconds (a slot move the gateway's own
        requests never ran into still changes cluster-wide reads: STATS, LISTQUEUES …)."""
        while not self.closing:
            await asyncio.sleep(every)
            if self._refresh is None and self.epoch >= 1:
                self.refresh(self.epoch + 1, _nothing)

    async def close(self) -> None:
        self.closing = True
        if self._poller is not None:
            self._poller.cancel()
        if self._refresh is not None:
            self._refresh.cancel()
            try:
                await self._refresh
            except (asyncio.CancelledError, Exception):
                pass
        for link in list(self.links.values()):
            link.close()
        self.links.clear()


def _nothing() -> None:
    """A refresh nobody waits for."""
