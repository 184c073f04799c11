"""The failover controller: watches every member of every shard and moves primaries.

Every ``heartbeat`` it asks each node for its ``STATUS`` (one persistent connection per
node) and publishes the store's topology to any node that holds an older one. A shard's
primary needs replacing when it has not answered for ``failure_timeout``, answers that it
is not the primary of the shard's term (it restarted), or has had no quorum of followers
for ``failure_timeout`` (cut off from them). The failover (DESIGN §9):

  1. CAS the shard to ``term + 1`` with no primary (and publish it);
  2. ``FENCE term`` every member it can reach: each persists the term, refuses records of
     older terms, and reports the last (term, LSN) of its log;
  3. once a majority of voting members answered, CAS the one with the highest
     (term, LSN) in as primary (and publish it); the others follow it, cutting any tail
     it lacks (records that never reached a majority, so no client was told they
     succeeded).

A controller killed anywhere is finished by the next: a shard without a primary is
failed over again (in a new term). ``switchover`` is the planned move of a primary: the
old one stops taking writes (``TRYAGAIN``) until the target holds everything it
confirmed, so no request fails. Learners (members whose data directory is new) are made
members once they have caught up; a member that comes back with a new storage id is made
a learner first.

Must not: move slots (rebalance.py) or start processes (local.py, the operator).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from shardq.connection import Connection
from shardq.errors import ShardqError
from shardq.wire.topology import Shard, Topology

from .store import TopologyStore, update

log = logging.getLogger("shardq_operator.controller")


@dataclass
class ControllerSettings:
    #: A primary silent (or without quorum) this long is replaced.
    failure_timeout: float = 2.0
    #: How often every node is asked for its status.
    heartbeat: float = 0.2
    #: How long one STATUS or FENCE may take.
    probe_timeout: float = 1.0
    #: The cluster token of the nodes' internal commands.
    token: str | None = None
    #: How long a switchover waits for the target to hold everything before it gives up.
    switchover_timeout: float = 15.0


@dataclass
class Seen:
    """What the controller last heard from one node."""

    ok_at: float = 0.0
    status: dict[str, Any] = field(default_factory=dict)


class Controller:
    def __init__(self, store: TopologyStore, settings: ControllerSettings | None = None) -> None:
        self.store = store
        self.settings = settings or ControllerSettings()
        self.seen: dict[str, Seen] = {}
        self._conns: dict[str, Connection] = {}
        self._busy: set[str] = set()  # shards with a failover or switchover running
        self._tasks: set[asyncio.Task[Any]] = set()
        self.started = time.monotonic()
        self.failovers = 0
        self.closing = False

    async def close(self) -> None:
        self.closing = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # a snapshot: a call failing meanwhile pops its connection from ``_conns``
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            await conn.close()

    # -- talking to nodes -------------------------------------------------------------------------

    async def call(self, address: str, req: dict[str, Any], timeout: float | None = None
                   ) -> dict[str, Any]:
        """One request to the node at ``address`` (a fresh connection after any failure)."""
        timeout = timeout or self.settings.probe_timeout
        conn = self._conns.get(address)
        try:
            if conn is None or conn.closed:
                conn = self._conns[address] = await open_bounded(
                    address, self.settings.token, timeout)
            return await asyncio.wait_for(conn.call(req), timeout)
        except BaseException:
            dead = self._conns.pop(address, None)
            if dead is not None:
                asyncio.get_running_loop().create_task(dead.close())
            raise

    async def _probe(self, name: str, address: str, epoch: int, topo: Topology) -> None:
        try:
            status = await self.call(address, {"cmd": "STATUS"})
        except (ShardqError, OSError, TimeoutError):
            return
        seen = self.seen.setdefault(name, Seen())
        seen.ok_at = time.monotonic()
        seen.status = status
        if int(status.get("epoch", 0)) < epoch:
            with contextlib.suppress(ShardqError, OSError, TimeoutError):
                await self.call(address, {"cmd": "SETTOPOLOGY", "topology": topo.wire()})

    async def publish(self, topo: Topology) -> None:
        """SETTOPOLOGY on every node that answers (the rest get it at the next tick)."""
        req = {"cmd": "SETTOPOLOGY", "topology": topo.wire()}

        async def one(address: str) -> None:
            with contextlib.suppress(ShardqError, OSError, TimeoutError):
                await self.call(address, req)

        await asyncio.gather(*(one(n.tcp) for n in topo.nodes))

    # -- the loop ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Watch and act until cancelled."""
        while not self.closing:
            try:
                await self.tick()
            except Exception:  # never stop watching because one tick failed
                log.exception("controller tick failed")
            await asyncio.sleep(self.settings.heartbeat)

    async def tick(self) -> None:
        _, topo = await self.store.read()
        if topo is None or not topo.shards:
            return
        await asyncio.gather(*(self._probe(n.name, n.tcp, topo.epoch, topo) for n in topo.nodes))
        for name, shard in topo.shards.items():
            if name in self._busy:
                continue
            reason = self.needs_failover(shard)
            if reason is not None:
                self._spawn(name, self.failover(name, reason=reason))
            else:
                self._spawn(name, self._members(name, shard))

    def _spawn(self, shard: str, coro: Any) -> None:
        self._busy.add(shard)
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            self._busy.discard(shard)
            if not t.cancelled() and t.exception() is not None:
                log.error("shard %s: %s", shard, t.exception())

        task.add_done_callback(done)

    def silent_for(self, name: str) -> float:
        seen = self.seen.get(name)
        last = seen.ok_at if seen is not None else self.started
        return time.monotonic() - max(last, self.started)

    def needs_failover(self, shard: Shard) -> str | None:
        """Why ``shard``'s primary must be replaced now, or None. Never when the other
        members that answer are too few to elect one: a primary that merely lost its
        quorum then keeps refusing writes with a clear error, and nothing changes hands."""
        timeout = self.settings.failure_timeout
        if len(shard.members) < 2:
            return None
        others = [m for m in shard.members if m != shard.primary
                  and self.silent_for(m) <= timeout
                  and self.seen.get(m, Seen()).status.get("storage_id") == shard.ids.get(m)]
        if len(others) < shard.majority():
            return None
        if not shard.primary:
            return "the shard has no primary"
        if self.silent_for(shard.primary) > timeout:
            return f"primary {shard.primary} silent for {self.silent_for(shard.primary):.1f}s"
        status = self.seen.get(shard.primary, Seen()).status
        if not status or not int(status.get("epoch", 0)):
            # no topology yet (a new node, or one on an empty volume): this tick's probe
            # published it; the next one sees what the node makes of it
            return None
        if status.get("role") != "primary" or status.get("term") != shard.term:
            if self.silent_for(shard.primary) < timeout and status.get("term", 0) > shard.term:
                return None  # it is ahead of the store we read: the next tick sees more
            return (f"primary {shard.primary} says it is {status.get('role')} in term "
                    f"{status.get('term')} (the shard is in term {shard.term})")
        if float(status.get("quorum_lost_s", 0.0)) > timeout:
            return f"primary {shard.primary} has had no quorum for {status['quorum_lost_s']}s"
        return None

    # -- failover ---------------------------------------------------------------------------------

    async def failover(self, name: str, reason: str = "", to: str | None = None) -> Topology:
        """Give shard ``name`` a new primary in a new term (DESIGN §9)."""
        log.warning("failover of %s: %s", name, reason)
        started = time.monotonic()

        def new_term(t: Topology) -> bool:
            sh = t.shards[name]
            sh.term += 1
            sh.primary = ""
            return True

        topo = await update(self.store, new_term)
        assert topo is not None
        shard = topo.shards[name]
        term = shard.term
        await self.publish(topo)
        votes = await self._fence(topo, shard, term)
        chosen = _choose(votes, to)

        def elect(t: Topology) -> bool:
            sh = t.shards[name]
            if sh.term != term or sh.primary:
                return False  # someone else moved on
            sh.primary = chosen
            return True

        topo = await update(self.store, elect)
        if topo is None:
            raise RuntimeError(f"failover of {name}: the shard moved past term {term}")
        self.failovers += 1
        await self.publish(topo)
        log.warning("shard %s: %s is primary in term %d (%.2fs after the decision)",
                    name, chosen, term, time.monotonic() - started)
        return topo

    async def _fence(self, topo: Topology, shard: Shard, term: int) -> dict[str, tuple[int, int]]:
        """FENCE ``term`` on the members until a majority of voters answered; their last
        (term, LSN)."""
        need = shard.majority()
        votes: dict[str, tuple[int, int]] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(10.0, 5 * self.settings.failure_timeout)
        while len(votes) < need:
            if loop.time() > deadline or self.closing:
                raise RuntimeError(f"only {len(votes)} of {need} voters answered FENCE {term}")
            pending = [m for m in shard.members if m not in votes]
            results = await asyncio.gather(*(self._fence_one(topo, m, shard, term)
                                             for m in pending))
            for member, vote in zip(pending, results, strict=True):
                if vote is not None:
                    votes[member] = vote
            if len(votes) < need:
                await asyncio.sleep(self.settings.heartbeat)
        return votes

    async def _fence_one(self, topo: Topology, member: str, shard: Shard, term: int
                         ) -> tuple[int, int] | None:
        info = topo.node(member)
        if info is None:
            return None
        try:
            answer = await self.call(info.tcp, {"cmd": "FENCE", "term": term})
        except (ShardqError, OSError, TimeoutError):
            return None
        if not answer.get("ok") or int(answer.get("term", 0)) != term:
            return None
        if shard.ids.get(member, answer.get("storage_id")) != answer.get("storage_id"):
            return None  # a new data directory: it may have forgotten what it acknowledged
        return int(answer.get("last_term", 0)), int(answer.get("lsn", 0))

    # -- planned switchover -----------------------------------------------------------------------

    async def switchover(self, name: str, to: str | None = None) -> Topology:
        """Move shard ``name``'s primary with no failed request: the primary stops taking
        writes (TRYAGAIN), the target catches up with everything, then a failover to it."""
        self._busy.add(name)
        try:
            _, topo = await self.store.read()
            if topo is None or name not in topo.shards:
                raise ShardqError(f"no shard {name}")
            shard = topo.shards[name]
            target = to or next(m for m in shard.members if m != shard.primary)
            if target not in shard.members or target == shard.primary:
                raise ShardqError(f"{target} is not a follower of {name}")
            old = topo.node(shard.primary)
            if old is None:
                raise ShardqError(f"shard {name} has no primary to hand over from")
            await self._drain_to(old.tcp, target)
            return await self.failover(name, reason=f"switchover to {target}", to=target)
        finally:
            self._busy.discard(name)

    async def _drain_to(self, primary: str, target: str) -> None:
        """HANDOFF: the primary refuses new writes with TRYAGAIN; wait until everything it
        has is committed and held by ``target``."""
        await self.call(primary, {"cmd": "HANDOFF", "to": target})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.switchover_timeout
        while loop.time() < deadline:
            status = await self.call(primary, {"cmd": "STATUS"})
            seq = int(status.get("seq", 0))
            acked = {f["name"]: int(f["acked"]) for f in status.get("followers", [])}
            if int(status.get("commit", 0)) >= seq and acked.get(target, -1) >= seq:
                return
            await asyncio.sleep(0.01)
        await self.call(primary, {"cmd": "HANDOFF", "to": ""})
        raise ShardqError(f"{target} did not catch up within "
                          f"{self.settings.switchover_timeout:g}s; switchover cancelled")

    # -- members and learners ---------------------------------------------------------------------

    async def _members(self, name: str, shard: Shard) -> None:
        """Learners that caught up become members; members with a new data directory become
        learners; ids of members first seen are recorded."""
        record, demote, promote = self._membership_changes(shard)
        if not (demote or record or promote):
            return

        def change(t: Topology) -> bool:
            sh = t.shards.get(name)
            if sh is None or sh.term != shard.term or sh.primary != shard.primary:
                return False
            for member, sid in record.items():
                sh.ids.setdefault(member, sid)
            for member, sid in demote.items():
                if member in sh.members and member != sh.primary:
                    sh.members.remove(member)
                    sh.learners.append(member)
                    sh.ids[member] = sid
                    log.warning("%s came back with a new data directory: a learner of %s",
                                member, name)
            for member, sid in promote.items():
                if member in sh.learners:
                    sh.learners.remove(member)
                    sh.members.append(member)
                    sh.ids[member] = sid
                    log.info("%s caught up: a member of %s again", member, name)
            return True

        topo = await update(self.store, change)
        if topo is not None:
            await self.publish(topo)

    def _membership_changes(
        self, shard: Shard
    ) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
        """(ids to record, members to demote, learners to promote), by storage id."""
        primary = self.seen.get(shard.primary, Seen()).status
        followers = {f["name"]: f for f in primary.get("followers", [])}
        commit = int(primary.get("commit", 0))
        record: dict[str, str] = {}
        demote: dict[str, str] = {}
        promote: dict[str, str] = {}
        for member in [*shard.members, *shard.learners]:
            sid = self.seen.get(member, Seen()).status.get("storage_id")
            if not sid or self.silent_for(member) > self.settings.failure_timeout:
                continue
            known = shard.ids.get(member)
            if member in shard.members:
                if known is None:
                    record[member] = sid
                elif known != sid:
                    demote[member] = sid
                continue
            f = followers.get(member)
            if f is not None and f["live"] and int(f["acked"]) >= commit > 0 \
                    and f.get("storage_id") == sid:
                promote[member] = sid
        return record, demote, promote


async def open_bounded(address: str, token: str | None, timeout: float) -> Connection:
    """A connection to a node, opened (connect and AUTH) within ``timeout`` as a whole: a
    stopped node accepts the TCP connection (the kernel does) but never answers the AUTH;
    the transport of a connection given up on is closed."""
    conn = Connection(address, token)
    try:
        await asyncio.wait_for(conn.open(timeout), timeout)
    except BaseException:
        await conn.close()
        raise
    return conn


def _choose(votes: dict[str, tuple[int, int]], prefer: str | None) -> str:
    """The voter with the highest (term, LSN); ``prefer`` wins a tie."""
    best = max(votes.values())
    if prefer is not None and votes.get(prefer) == best:
        return prefer
    return sorted(m for m, v in votes.items() if v == best)[0]
